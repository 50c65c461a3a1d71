"""Reading a JSON file the user gave us: a missing file or bad JSON is one MixqError line, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixq.core.errors import MixqError


def read_json(path: Path, missing: str) -> Any:
    """The parsed file; `missing` is the message when it does not exist."""
    if not path.is_file():
        raise MixqError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MixqError(f"{path}: not valid JSON ({e})") from e
