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


def test_build_never_worse_than_a_uniform_that_fits(nemotron_moe, tmp_path):
    """The shipped config measures no worse on the calibration windows than any uniform width in budget."""
    from mixq.kvcache.build import build_kv_config

    out = build_kv_config(str(nemotron_moe), target_bits=6.0, candidates="4,5,6,8", samples=2, seq_len=32,
                          output=tmp_path / "kv.json")
    cfg = out["config"]
    note = cfg["refinement"]
    assert note["calibration_kl_uniform"], "at least one uniform width fits a 6-bit budget"
    if note["applied"]:
        assert len({(l["k_bits"], l["v_bits"]) for l in cfg["layers"]}) == 1
        assert min(note["calibration_kl_uniform"].values()) < note["calibration_kl_mixed"]
    else:
        assert note["calibration_kl_mixed"] <= min(note["calibration_kl_uniform"].values())
    assert cfg["bytes_per_token"] <= cfg["allocation"]["budget_bytes_per_token"]
    import json
    assert json.loads((tmp_path / "kv.json").read_text())["refinement"] == note
