"""Running the application with uvicorn: in the foreground (``mlxeff serve``) or in a thread.

The listening socket is bound here, before uvicorn starts, so ``--port 0`` picks a free port and
the address printed is the one in use. ``ServerThread`` runs the server on a background thread
(tests, notebooks) and stops it -- worker included -- when its context ends.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Optional

import uvicorn


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        from ..errors import MlxeffError

        raise MlxeffError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def make_server(app, log_level: str = "warning") -> uvicorn.Server:
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                            lifespan="on")
    return uvicorn.Server(config)


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def serve(app, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info",
          announce: Callable[[str], None] = print) -> None:
    """Serve ``app`` until interrupted (Ctrl-C stops uvicorn, then the worker)."""
    sock = bind(host, port)
    announce(f"mlxeff serve: listening on {url(sock)} (OpenAI API under /v1)")
    make_server(app, log_level).run(sockets=[sock])


class ServerThread:
    """``with ServerThread(app) as base_url:`` serves ``app`` on a free loopback port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.sock = bind(host, port)
        self.url = url(self.sock)
        self.server = make_server(app, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="mlxeff-http", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> Optional[bool]:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        worker = getattr(getattr(self.app, "state", None), "worker", None)
        if worker is not None:  # normally stopped by the app's shutdown already
            worker.stop()
        return None
