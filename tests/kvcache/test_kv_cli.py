"""`mixq kv-cache`: writes kv_config.json; user errors are one line and exit 2."""

import json

from mixq.cli import main


def test_cli_writes_config(nemotron_dense, tmp_path, capsys):
    out = tmp_path / "kv.json"
    rc = main(["kv-cache", str(nemotron_dense), "-o", str(out), "--target-bits", "5.5", "--candidates", "4,8",
               "--samples", "1", "--seq-len", "32", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["output"] == str(out)
    cfg = json.loads(out.read_text())
    assert cfg["format"] == "mixq-kv-config" and cfg["achieved_bits"] <= 5.5


def test_cli_user_errors(nemotron_dense, capsys):
    for argv in (["--target-bits", "2"], ["--candidates", "4,7"], ["--samples", "0"]):
        rc = main(["kv-cache", str(nemotron_dense), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("mixq kv-cache: error:") and err.count("\n") == 1
    assert main(["kv-cache", "/no/such/model"]) == 2
