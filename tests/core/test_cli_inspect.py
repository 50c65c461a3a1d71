import json

from mixq.cli import main


def test_inspect_table(nemotron_moe, capsys):
    assert main(["inspect", str(nemotron_moe)]) == 0
    out = capsys.readouterr().out
    assert "pattern M-M*EM*-E" in out
    rows = [l.split() for l in out.splitlines() if l.strip()[:1].isdigit() and len(l.split()) >= 7]
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("0", "ssm", "0"), ("1", "mlp", "-"), ("2", "ssm", "1"), ("3", "attention", "2"), ("4", "moe", "-"),
        ("5", "ssm", "3"), ("6", "attention", "4"), ("7", "mlp", "-"), ("8", "moe", "-")]
    assert "conv1d x6" in out and "MoE router gate x2" in out


def test_inspect_json(qwen3, capsys):
    assert main(["inspect", str(qwen3), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model_type"] == "qwen3"
    assert [l["cache_slot"] for l in data["layers"]] == [0, 1, 2]
    assert data["total_params"] == sum(t["params"] for t in data["tensors"])
    assert data["blas"]["status"] in ("fast", "reference", "disabled", "platform")


def test_inspect_tensors_listing(nemotron_dense, capsys):
    assert main(["inspect", str(nemotron_dense), "--tensors", "--group-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "backbone.layers.0.mixer.A_log" in out and "no: SSM decay A_log" in out
    assert "not divisible by group size 128" in out
