"""`mixq serve` as a user runs it: refusals, a real process on a free loopback port, clean shutdown."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "mixq", "serve", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_refuses_a_public_bind_without_a_key():
    r = run_cli("fixture:qwen3", "--host", "0.0.0.0")
    assert r.returncode == 2 and "refusing to listen on 0.0.0.0 without --api-key" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", [["--max-concurrency", "0"], ["--port", "70000"], ["--max-queue", "-1"]])
def test_bad_flags_are_one_line_errors(flag):
    r = run_cli("fixture:qwen3", *flag)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_missing_model_is_a_user_error(tmp_path):
    r = run_cli(str(tmp_path / "nope"))
    assert r.returncode == 2 and "no such model directory" in r.stderr


def _start(args):
    """Start `mixq serve ... --port 0`; return (process, base url) once it says where it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "mixq", "serve", *args, "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 60
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    proc.wait(10)
    raise AssertionError(f"the server did not start: {''.join(seen)[-2000:]}")


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


def test_serves_and_shuts_down_cleanly(qwen3):
    proc, url = _start([str(qwen3), "--served-model-name", "tiny", "--max-concurrency", "2"])
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=30) as h:
            assert h.get("/health").json()["status"] == "ok"
            assert h.get("/v1/models").json()["data"][0]["id"] == "tiny"
            r = h.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 3, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        rc = _stop(proc)
    assert rc == 0


def test_kv_config_serves_with_mixed_precision_caches(nemotron_dense, tmp_path):
    import mixq.kvcache as kv
    import mixq  # noqa: F401

    from mixq.core.modelio import load

    cfg = kv.uniform_config(load(str(nemotron_dense)), 8)
    path = tmp_path / "kv_config.json"
    path.write_text(json.dumps(cfg))
    proc, url = _start([str(nemotron_dense), "--kv-config", str(path), "--served-model-name", "m"])
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=30) as h:
            assert h.get("/health").json()["batched"] is False  # quantized KV slots: the fair round-robin
            r = h.post("/v1/completions", json={"model": "m", "prompt": "hello", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        assert _stop(proc) == 0
    bad = run_cli(str(nemotron_dense), "--kv-config", str(tmp_path / "missing.json"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_7f_a_stream_cut_by_shutdown_ends_with_an_error_and_done(qwen3):
    """SIGTERM while a stream runs: the stream gets an error event and `data: [DONE]`, the process exits 0."""
    proc, url = _start([str(qwen3), "--served-model-name", "m"])
    lines = []
    try:
        body = {"model": "m", "prompt": "go", "max_tokens": 3000, "temperature": 0, "stream": True,
                "logit_bias": {"5": -100}}
        with httpx.Client(trust_env=False, timeout=30) as h, h.stream("POST", url + "/v1/completions", json=body) as r:
            it = r.iter_lines()
            for line in it:
                if line.startswith("data: {"):
                    break
            proc.send_signal(signal.SIGTERM)
            lines = [line for line in it if line.startswith("data: ")]
    finally:
        rc = _stop(proc)
    assert lines and lines[-1] == "data: [DONE]"
    errors = [json.loads(x[6:]) for x in lines[:-1] if '"error"' in x]
    assert errors and "shutting down" in errors[-1]["error"]["message"]
    assert rc == 0
