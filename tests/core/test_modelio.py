"""Bad input: one clear line on stderr, exit code 2, no traceback."""

import json
import shutil
import subprocess
import sys

import pytest


def _run(*args):
    return subprocess.run([sys.executable, "-m", "mixq", *args], capture_output=True, text=True, timeout=120)


def _broken_copy(src, dst, how):
    shutil.copytree(src, dst)
    if how == "config-not-json":
        (dst / "config.json").write_text("{not json")
    elif how == "unknown-type":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["model_type"] = "no_such_arch"
        (dst / "config.json").write_text(json.dumps(cfg))
    elif how == "truncated":
        f = dst / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    elif how == "no-weights":
        (dst / "model.safetensors").unlink()
    return dst


@pytest.mark.parametrize("how,needle", [
    ("config-not-json", "not valid JSON"),
    ("unknown-type", "no_such_arch"),
    ("truncated", "truncated safetensors"),
    ("no-weights", "no model*.safetensors"),
])
def test_broken_models_give_one_line(nemotron_dense, tmp_path, how, needle):
    d = _broken_copy(nemotron_dense, tmp_path / how, how)
    r = _run("inspect", str(d))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_missing_dir(tmp_path):
    r = _run("inspect", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such model directory" in r.stderr


def test_hub_id_offline_is_one_line():
    r = _run("inspect", "nobody-here/not-a-model")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "hub" in r.stderr


def test_bad_arguments_exit_2():
    r = _run("inspect")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_fingerprint_sees_weight_values(nemotron_dense, tmp_path):
    import mlx.core as mx

    from mixq.core.modelio import fingerprint

    other = tmp_path / "other"
    shutil.copytree(nemotron_dense, other)
    assert fingerprint(other) == fingerprint(nemotron_dense)
    w = mx.load(str(other / "model.safetensors"))
    # same shapes and dtypes, different values: a fine-tune must not reuse another model's measurements
    w = {k: (v * 1.5 if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in w.items()}
    mx.save_safetensors(str(other / "model.safetensors"), w, metadata={"format": "mlx"})
    assert fingerprint(other) != fingerprint(nemotron_dense)
