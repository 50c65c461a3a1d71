"""Run untrusted generated code (HumanEval programs) in a separate, confined Python process, and say whether
the benchmark's own `check(candidate)` ran to its end.

A pass is a proof, not an exit status: the parent hands the child a random nonce through a pipe; the
guard (trusted code that runs first) reads it and closes the pipe, runs the program (prompt + completion),
then the test code (with the builtins as they were before the program ran), calls `check(entry_point)`,
and only when that returns writes the nonce to a result file and ends with `os._exit`. So `sys.exit(0)`,
`os._exit(0)`, `raise SystemExit`, `unittest.main()`, excepthooks and atexit handlers all fail: none of them
can print a nonce the program never saw. What keeps the nonce out of reach, in layers:

* a fresh interpreter (`python -I -S`: no site-packages, no user site, no PYTHON* variables) in a new
  temporary directory that is its working directory, HOME and TMPDIR, deleted afterwards; a minimal
  environment; stdout and stderr go to files that are never read back (nothing the program prints reaches
  the results: a record says passed, failed with an exception's type name, exit code or timeout);
* resource limits (memory, CPU seconds, file size, no core dumps, no new processes by RLIMIT_NPROC) and
  a wall-clock timeout after which the whole process group is killed;
* on Linux (x86_64, aarch64) a seccomp filter, installed before the program runs and irrevocable, that
  refuses fork, vfork, clone, clone3, execve, execveat and socket: no process and no network by any route
  (`_posixsubprocess.fork_exec`, ctypes, os.fork...);
* an audit hook (sys.addaudithook, which the program cannot remove) that refuses: opening, listing or
  changing anything outside the temporary directory (the standard library stays readable, read-only);
  frame, traceback-frame and garbage-collector introspection (the routes to the guard's locals); tracing
  and profiling hooks; ctypes; sockets; starting or signalling processes.

Where no seccomp filter can be installed, `confinement()` says so and mixq refuses to run the task.
It is built against programs that try to pass without passing; it does not make a wrong answer right
(a candidate returning an object whose `__eq__` is always true passes `assert f(x) == y`, as it does in
every HumanEval harness).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MEMORY_BYTES = 1 << 30
FILE_BYTES = 16 << 20

# Runs first in the child: argv = [-c, nonce fd, result file, entry point].
GUARD = r'''
def _guard():
    import os, sys, sysconfig, builtins
    # everything used after the program runs is bound here, so patching builtins or os cannot reach it
    exec_, compile_, type_, dict_, BaseExc = exec, compile, type, dict, BaseException
    write, exit_ = os.write, os._exit
    nonce = os.read(int(sys.argv[1]), 64)
    os.close(int(sys.argv[1]))
    entry = sys.argv[3]
    res = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    root = os.path.realpath(os.getcwd())
    readable = tuple(os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib"))
    with open("prog.py", encoding="utf-8") as f:
        prog = f.read()
    with open("test.py", encoding="utf-8") as f:
        test = f.read()
    pristine = dict(builtins.__dict__)
    kind = _confine()
    write(res, nonce + b" confined " + kind.encode() + b"\n")
    if kind == "none":
        exit_(3)
    hook, inside = _make_hook(root, readable)
    sys.path[:] = [p for p in sys.path if inside(p, (root,) + readable)]
    sys.addaudithook(hook)
    del hook
    try:
        ns = {"__name__": "__main__", "__builtins__": builtins}
        exec_(compile_(prog, "prog.py", "exec"), ns)
        tns = {"__name__": "__test__", "__builtins__": dict_(pristine)}
        exec_(compile_(test, "test.py", "exec"), tns)
        tns["check"](ns[entry])
    except BaseExc as e:
        try:
            name = type_(e).__name__
            name = name if type_(name) is str else "?"
        except BaseExc:
            name = "?"
        clean = "".join([c for c in name[:60] if c.isalnum() or c == "_"])
        write(res, nonce + b" failed " + clean.encode() + b"\n")
        exit_(1)
    write(res, nonce + b" passed\n")
    exit_(0)


def _make_hook(root, readable):
    """The audit hook, with its own bindings of everything it calls (made before the program runs)."""
    import os, sys
    type_, len_, any_ = type, len, any
    str_, bytes_, int_, BaseExc, PermErr = str, bytes, int, BaseException, PermissionError
    fsdecode = os.fsdecode
    o_write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def norm(p):
        # lexical: no library call the program could have replaced; symlinks out are refused when made
        if not p.startswith("/"):
            p = root + "/" + p
        parts = []
        for seg in p.split("/"):
            if seg == "..":
                if parts:
                    parts.pop()
            elif seg not in ("", "."):
                parts.append(seg)
        return "/" + "/".join(parts)

    def inside(p, dirs):
        t = type_(p)
        if t is int_:
            return True
        if t is bytes_:
            try:
                p = fsdecode(p)
            except BaseExc:
                return False
        elif t is not str_:
            return False
        p = norm(p)
        return any_(p == d or p.startswith(d + "/") for d in dirs)

    deny = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
            "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "sys._current_frames",
            "sys._current_exceptions", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace",
            "sys.setprofile", "os.chroot", "os.chdir", "os.fchdir", "sys.remote_exec",
            "sys.monitoring.register_callback"}
    frames = ("tb_frame", "gi_frame", "cr_frame", "ag_frame")
    # the only callers allowed a frame: stdlib code that reads the caller's module name from it and keeps
    # nothing (typing's TypeVar, namedtuple, the Enum functional API) - compared by code object identity
    import typing, collections, enum
    getframe = sys._getframe
    allowed = (typing._caller.__code__, collections.namedtuple.__code__, enum.EnumType._create_.__code__)
    busy = [False]
    paths = {"os.remove", "os.rmdir", "os.rename", "os.link", "os.symlink", "os.truncate", "os.chmod", "os.chown",
             "os.mkdir", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.removexattr",
             "os.setxattr", "sqlite3.connect"}
    listing = {"os.listdir", "os.scandir", "glob.glob", "os.listxattr"}
    rw, ro = (root,), (root,) + readable

    def caller_allowed():
        busy[0] = True
        try:
            code = getframe(2).f_code  # 0: this function, 1: the hook, 2: who called sys._getframe
        finally:
            busy[0] = False
        return any_(code is c for c in allowed)

    def hook(event, args):
        if busy[0]:
            return
        if event in deny or event.startswith(("socket.", "ctypes.")):
            raise PermErr("sandbox: " + event + " is not allowed")
        if event == "sys._getframe" and not caller_allowed():
            raise PermErr("sandbox: frames are not available")
        if event == "object.__getattr__" and len_(args) > 1 and args[1] in frames:
            raise PermErr("sandbox: frames are not available")
        if event == "object.__setattr__" and len_(args) > 1 and args[1] in ("__code__", "__globals__"):
            raise PermErr("sandbox: replacing code is not allowed")
        if event in paths:
            for a in args[:2]:
                if a is not None and not inside(a, rw):
                    raise PermErr("sandbox: " + event + " outside the working directory")
        elif event in listing:
            if args and args[0] is not None and not inside(args[0], ro):
                raise PermErr("sandbox: " + event + " outside the working directory")
        elif event == "open" and args and args[0] is not None:
            mode = args[1] if len_(args) > 1 else None
            flags = args[2] if len_(args) > 2 else 0
            writing = (type_(mode) is str_ and any_(c in mode for c in "wax+")) or (
                type_(flags) is int_ and flags & o_write)
            if not inside(args[0], rw if writing else ro):
                raise PermErr("sandbox: files outside the working directory are not allowed")

    return hook, inside


def _confine():
    """Install the seccomp filter (Linux x86_64 / aarch64); else rely on RLIMIT_NPROC when it binds."""
    import os, platform, struct, sys
    if sys.platform.startswith("linux"):
        arch = {"x86_64": (0xC000003E, dict(fork=57, vfork=58, clone=56, clone3=435, execve=59, execveat=322,
                                             socket=41)),
                "aarch64": (0xC00000B7, dict(clone=220, clone3=435, execve=221, execveat=281, socket=198))}
        spec = arch.get(platform.machine())
        if spec is None:
            return "none"
        import ctypes
        audit, nrs = spec
        ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
        allow, kill, errno = 0x7FFF0000, 0x80000000, 0x00050000
        prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit), (ret, 0, 0, kill), (ld, 0, 0, 0)]
        if audit == 0xC000003E:  # the x32 ABI's numbers
            prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, errno | 1)]
        for name, nr in nrs.items():
            prog += [(jeq, 0, 1, nr), (ret, 0, 0, errno | (38 if name == "clone3" else 1))]
        prog.append((ret, 0, 0, allow))
        buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))

        class Fprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        fp = Fprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.addressof(fp), 0, 0) != 0:
            return "none"
        return "seccomp"
    return "nproc" if os.getuid() != 0 else "none"


_guard()
'''


@dataclass
class RunResult:
    status: str          # passed | failed | timeout | error
    detail: str          # exception type name, exit code or why it stopped (never the program's output)
    confinement: str     # seccomp | nproc | none


def _limits(cpu_seconds: int, memory: int):
    def apply():  # runs in the child between fork and exec
        import resource

        os.setsid()
        for lim, val in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_FSIZE, FILE_BYTES), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NPROC, 0)):
            try:
                resource.setrlimit(lim, (val, val))
            except (ValueError, OSError):
                pass

    return apply


def _read_result(path: str, nonce: bytes) -> tuple[str | None, str | None]:
    """(confinement, outcome line) from the guard's result file; lines without the nonce are ignored."""
    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
    except OSError:
        return None, None
    conf, outcome = None, None
    for line in raw.splitlines():
        if not line.startswith(nonce + b" "):
            continue
        rest = line[len(nonce) + 1:].decode("ascii", "replace")
        if rest.startswith("confined "):
            conf = rest.split(" ", 1)[1]
        else:
            outcome = rest
    return conf, outcome


def run_check(program: str, test: str, entry_point: str, timeout: float = 10.0,
              memory: int = MEMORY_BYTES) -> RunResult:
    """Run `program`, then `test`, then `check(<entry_point>)`; passed only if check returned."""
    if not re.fullmatch(r"[A-Za-z_]\w*", entry_point):
        raise ValueError(f"entry point {entry_point!r} is not a Python name")
    nonce = secrets.token_hex(16).encode()
    with tempfile.TemporaryDirectory(prefix="mixq-sandbox-") as tmp:
        for name, text in (("prog.py", program), ("test.py", test)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        result = os.path.join(tmp, ".result")
        r, w = os.pipe()
        os.write(w, nonce)
        os.close(w)
        cmd = [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", GUARD, str(r), result, entry_point]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        try:
            with open(os.path.join(tmp, ".out"), "wb") as out:
                proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, pass_fds=(r,),
                                        preexec_fn=_limits(int(timeout) + 1, memory))
        finally:
            os.close(r)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            conf, _ = _read_result(result, nonce)
            return RunResult("timeout", f"killed after {timeout:g} s", conf or "none")
        conf, outcome = _read_result(result, nonce)
    rc = proc.returncode
    if conf in (None, "none"):
        return RunResult("error", "the sandbox could not confine the program", conf or "none")
    if outcome == "passed" and rc == 0:
        return RunResult("passed", "", conf)
    if outcome and outcome.startswith("failed "):
        return RunResult("failed", outcome[len("failed "):] or "exception", conf)
    why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
    return RunResult("failed", f"{why} before check() finished", conf)


_CONFINEMENT: str | None = None


def confinement() -> str:
    """How this machine confines generated code (probed once): "seccomp", "nproc", or "none"."""
    global _CONFINEMENT
    if _CONFINEMENT is None:
        res = run_check("def f():\n    return 1\n", "def check(c):\n    assert c() == 1\n", "f", timeout=30)
        _CONFINEMENT = res.confinement if res.status == "passed" else "none"
    return _CONFINEMENT
