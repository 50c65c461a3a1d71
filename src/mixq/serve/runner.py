"""Running the app: uvicorn in the foreground (the CLI) or on a background thread (tests, benchmarks)."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from typing import Optional


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit this: without it a keep-alive client waits out delayed ACKs (~40 ms a
    # request) on every response that goes out in two writes
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _config(app, log_level: str):
    import uvicorn

    from mixq.serve.middleware import JsonH11Protocol

    return uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=3,
                          timeout_keep_alive=30, access_log=log_level == "debug", http=JsonH11Protocol)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGINT/SIGTERM after its graceful stop, which would kill the process before the
        engine is stopped; here the stop is the end of it (and `mixq serve` exits 0). At the start of the
        stop `on_shutdown` runs (the engine stops), so a stream still running ends with an error event and
        its terminator instead of being cut off when the grace period runs out."""

        on_shutdown = None

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()

        async def shutdown(self, sockets=None):
            if self.on_shutdown is not None:
                import asyncio

                await asyncio.to_thread(self.on_shutdown)
            await super().shutdown(sockets=sockets)

    return Server


def run_foreground(app, host: str, port: int, log_level: str = "info", on_ready=None, on_shutdown=None) -> None:
    """Serve until SIGINT/SIGTERM, which stop uvicorn gracefully and return here."""
    sock = bind_socket(host, port)
    server = _server_class()(_config(app, log_level))
    server.on_shutdown = on_shutdown
    if on_ready is not None:
        threading.Thread(target=_notify_when_started, args=(server, on_ready, sock), daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def _notify_when_started(server, callback, sock) -> None:
    for _ in range(6000):
        if server.started:
            callback(sock.getsockname()[1])
            return
        time.sleep(0.01)


class ServerThread:
    """`with ServerThread(app) as s: ... s.url ...`: uvicorn on a free loopback port, always shut down."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout: float = 30.0, on_shutdown=None):
        self.app, self.host, self.port, self.log_level, self.start_timeout = app, host, port, log_level, start_timeout
        self.on_shutdown = on_shutdown
        self.server = None
        self.thread: Optional[threading.Thread] = None
        self.sock: Optional[socket.socket] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.sock = bind_socket(self.host, self.port)
        self.port = self.sock.getsockname()[1]
        self.server = _server_class()(_config(self.app, self.log_level))
        self.server.on_shutdown = self.on_shutdown
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="mixq-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)
            if self.thread.is_alive() and self.server is not None:
                self.server.force_exit = True
                self.thread.join(5)
        if self.sock is not None:
            self.sock.close()
