"""HumanEval's sandbox: a pass needs the task's check() to return; exit tricks, hooks, process spawning,
reads outside the temp dir and frame introspection all fail; nothing the program prints reaches a record."""

import pytest

from mixq.eval.lmeval.code import estimate_pass_at_k, pass_at_k, split_reference
from mixq.eval.sandbox import confinement, run_check

PROMPT = 'def add(a, b):\n    """Add two numbers."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
# the six ways a program can exit 0 without passing (each with a wrong function where it matters)
TRICKS = {
    "sys.exit": "    return 0\nimport sys\nsys.exit(0)\n",
    "os._exit": "    return 0\nimport os\nos._exit(0)\n",
    "SystemExit": "    return 0\nraise SystemExit(0)\n",
    "unittest.main": "    return 0\nimport unittest\nunittest.main()\n",
    "atexit": "    return a * b\nimport atexit, os\natexit.register(lambda: os._exit(0))\n",
    "fork_exec": ("    return 0\nimport _posixsubprocess, os\nr, w = os.pipe()\ntry:\n"
                  "    _posixsubprocess.fork_exec([b'/bin/sh', b'-c', b'echo x > {marker}; exit 0'], [b'/bin/sh'], True,"
                  " (), None, None, -1, -1, -1, -1, -1, -1, r, w, True, False, 0, None, None, None, -1, None, False)\n"
                  "except BaseException:\n    pass\nos._exit(0)\n"),
}


def test_confined_here():
    assert confinement() in ("seccomp", "nproc")


def test_correct_passes_and_wrong_fails():
    assert run_check(PROMPT + "    return a + b\n", TEST, "add").status == "passed"
    bad = run_check(PROMPT + "    return a * b\n", TEST, "add")
    assert bad.status == "failed" and bad.detail == "AssertionError"


@pytest.mark.parametrize("name", sorted(TRICKS))
def test_exit_zero_tricks_fail(name, tmp_path):
    marker = tmp_path / "spawned"
    res = run_check(PROMPT + TRICKS[name].replace("{marker}", str(marker)), TEST, "add", timeout=10)
    assert res.status == "failed", (name, res)
    assert not marker.exists()  # no process ran


@pytest.mark.parametrize("code", [
    "    return a + b\nimport os\nos.fork()\n",
    "    return a + b\nimport subprocess\nsubprocess.run(['true'])\n",
    "    return a + b\nimport socket\nsocket.socket()\n",
    "    return a + b\nimport threading\nthreading.Thread(target=print).start()\n",
    "    return a + b\nimport sys\nsys.excepthook = None\nsys._getframe(1)\n",
    "    return a + b\ntry:\n    1 / 0\nexcept ZeroDivisionError as e:\n    e.__traceback__.tb_frame\n",
    "    return a + b\nimport inspect\ninspect.currentframe()\n",
    "    return a + b\nimport builtins\nbuiltins.exec = lambda c, ns: ns.update(check=lambda f: None)\n",
    "    return a + b\nimport os\nos.listdir('/')\n",
    "    return a + b\nimport os\nos.symlink('/etc', 'etc')\n",
])
def test_escapes_are_refused(code):
    res = run_check(PROMPT + code, TEST, "add")
    if "builtins.exec" in code:  # the patched exec never reaches check: the pristine one runs the test
        assert res.status == "passed"
    else:
        assert res.status == "failed" and res.detail in ("PermissionError", "RuntimeError"), res


def test_files_only_in_the_temp_dir_and_no_output_in_results(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    leak = (f"    return a + b\nimport sys\nprint(open({str(secret)!r}).read(), file=sys.stderr)\n")
    res = run_check(PROMPT + leak, TEST, "add")
    assert res.status == "failed" and "TOPSECRET" not in res.detail
    noisy = "    return a + b\nimport sys\nprint('TOPSECRET', file=sys.stderr)\nraise ValueError('TOPSECRET')\n"
    res = run_check(PROMPT + noisy, TEST, "add")
    assert res == res.__class__("failed", "ValueError", res.confinement)
    outside = tmp_path / "written"
    res = run_check(PROMPT + f"    return a + b\nopen({str(outside)!r}, 'w').write('x')\n", TEST, "add")
    assert res.status == "failed" and not outside.exists()
    inside = PROMPT + ("    return a + b\nopen('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n"
                       "from typing import List\nimport collections, enum, dataclasses, fractions, statistics\n"
                       "P = collections.namedtuple('P', 'x y')\n")
    assert run_check(inside, TEST, "add").status == "passed"


def test_timeout_and_memory():
    assert run_check(PROMPT + "    while True:\n        pass\n", TEST, "add", timeout=1).status == "timeout"
    hog = PROMPT + "    return a + b\nx = bytearray(4 << 30)\n"
    assert run_check(hog, TEST, "add").detail == "MemoryError"


def test_pass_at_k_metric():
    ref = TEST + "\ncheck(add)"
    assert split_reference(ref) == (TEST, "add")
    good, bad = PROMPT + "    return a + b\n", PROMPT + "    return a - b\n"
    assert pass_at_k([ref], [[good]], k=[1]) == {"pass@1": 1.0}
    assert pass_at_k([ref], [[bad]], k=[1]) == {"pass@1": 0.0}
    assert pass_at_k([ref], [[good, bad]], k=[1]) == {"pass@1": 0.5}
    assert estimate_pass_at_k(10, 3, 1) == pytest.approx(0.3) and estimate_pass_at_k(5, 5, 2) == 1.0
    with pytest.raises(ValueError):
        split_reference("def check(c): pass\n")
    with pytest.raises(ValueError):
        run_check(good, TEST, "add; import os")
