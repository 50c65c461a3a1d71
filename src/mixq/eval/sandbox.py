"""Run untrusted generated code (HumanEval programs) in a separate, confined Python process.

Confinement, in layers:

* a fresh interpreter (`python -I`: no user site, no PYTHON* variables, cwd not on sys.path) in a new
  temporary directory that is its working directory and HOME, deleted afterwards; a minimal environment;
* resource limits set in the child before exec (resource.setrlimit): address space (memory, default
  1 GiB), CPU seconds, file size (16 MiB), no core dumps; and a wall-clock timeout after which the whole
  process group is killed;
* no network: a network namespace with no interfaces (`unshare -rn`) where the kernel allows one, and
  in every case an audit hook (sys.addaudithook, which the program cannot remove) that refuses every
  socket operation;
* the same hook refuses starting processes (subprocess, os.system / exec* / spawn* / fork / posix_spawn),
  signalling other processes, loading native libraries through ctypes, and writing, deleting or renaming
  anything outside the temporary directory.

It is a guard against accidents and obvious misbehaviour of generated code, not a security boundary
against a determined adversary (use a container or VM for that).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MEMORY_BYTES = 1 << 30
FILE_BYTES = 16 << 20
OUTPUT_CHARS = 2000

# Runs first in the child: installs the audit hook, then runs prog.py as __main__.
GUARD = r'''
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_BLOCKED = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
            "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym",
            "ctypes.call_function", "os.putenv", "os.unsetenv", "os.chroot", "winreg.OpenKey"}
_PATHS = {"os.remove", "os.rmdir", "os.rename", "os.link", "os.symlink", "os.truncate", "os.chmod", "os.chown",
          "os.mkdir", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.removexattr",
          "os.setxattr"}
def _inside(p):
    try:
        p = os.fsdecode(p) if not isinstance(p, int) else None
    except Exception:
        return False
    if p is None:
        return True
    real = os.path.realpath(p)
    return real == _ROOT or real.startswith(_ROOT + os.sep)
def _hook(event, args):
    if event.startswith("socket.") or event in _BLOCKED:
        raise PermissionError(f"mixq sandbox: {event} is not allowed")
    if event in _PATHS:
        paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        if not all(_inside(a) for a in paths):
            raise PermissionError(f"mixq sandbox: {event} outside the working directory")
    if event == "open" and len(args) >= 3:
        path, mode, flags = args[0], args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        if writing and isinstance(path, (str, bytes, os.PathLike)) and not _inside(path):
            raise PermissionError("mixq sandbox: writing outside the working directory")
sys.addaudithook(_hook)
del _hook
import runpy
runpy.run_path("prog.py", run_name="__main__")
'''


@dataclass
class RunResult:
    status: str          # passed | failed | timeout
    returncode: int | None
    detail: str          # the last line of stderr (the exception), or why it stopped
    network_namespace: bool


_NETNS: bool | None = None


def netns_available() -> bool:
    """Whether `unshare -rn` can give the child an empty network namespace here (probed once)."""
    global _NETNS
    if _NETNS is None:
        exe = shutil.which("unshare")
        ok = False
        if exe and sys.platform.startswith("linux"):
            try:
                ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
        _NETNS = ok
    return _NETNS


def _limits(cpu_seconds: int, memory: int):
    def apply():  # runs in the child between fork and exec
        import resource

        os.setsid()
        for lim, val in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_FSIZE, FILE_BYTES), (resource.RLIMIT_CORE, 0)):
            try:
                resource.setrlimit(lim, (val, val))
            except (ValueError, OSError):
                pass

    return apply


def run_program(code: str, timeout: float = 10.0, memory: int = MEMORY_BYTES) -> RunResult:
    """Run `code` as a script under the confinement above; passed when it exits 0 within the time."""
    use_ns = netns_available()
    with tempfile.TemporaryDirectory(prefix="mixq-sandbox-") as tmp:
        with open(os.path.join(tmp, "prog.py"), "w", encoding="utf-8") as f:
            f.write(code)
        cmd = [sys.executable, "-I", "-B", "-X", "utf8", "-c", GUARD]
        if use_ns:
            cmd = [shutil.which("unshare") or "unshare", "-rn", *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        # output goes to files (capped by RLIMIT_FSIZE), never into this process's memory
        with open(os.path.join(tmp, ".stdout"), "wb") as out, open(os.path.join(tmp, ".stderr"), "wb") as err:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    preexec_fn=_limits(int(timeout) + 1, memory))
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                return RunResult("timeout", None, f"killed after {timeout:g} s", use_ns)
        with open(os.path.join(tmp, ".stderr"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * OUTPUT_CHARS))
            err_tail = f.read()
    rc = proc.returncode
    if rc == 0:
        return RunResult("passed", 0, "", use_ns)
    text = err_tail.decode("utf-8", "replace").strip()
    last = text.splitlines()[-1] if text else ""
    if rc < 0:
        last = f"killed by signal {-rc}" + (f" ({last})" if last else "")
    return RunResult("failed", rc, last[-OUTPUT_CHARS:], use_ns)
