"""Imports go one way (core <- quant/kvcache <- eval/serve <- report <- commands <- cli): import-linter."""

import shutil
import subprocess
import sys
from pathlib import Path


def test_import_contracts_kept():
    beside = Path(sys.executable).parent / "lint-imports"
    exe = str(beside) if beside.is_file() else shutil.which("lint-imports")
    assert exe, "import-linter is a dev dependency: pip install -e .[dev]"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([exe], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "broken" in r.stdout and ", 0 broken" in r.stdout
