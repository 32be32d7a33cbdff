"""Run the app under uvicorn: bind the socket first (so `--port 0` gets a free port we can name),
then serve until SIGINT/SIGTERM, when uvicorn stops accepting, gives in-flight requests
`graceful_shutdown_s` to finish, and the app's shutdown stops the batcher."""

from __future__ import annotations

import logging
import socket
import sys

from .config import ServeConfig

log = logging.getLogger("apet.serve")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def make_server(cfg: ServeConfig, sock: socket.socket, pipe=None, on_ready=None, log_level: str = "info"):
    """A uvicorn.Server for the app on an already bound socket (also what the tests run in a thread)."""
    import uvicorn

    from .app import create_app

    app = create_app(cfg, pipe=pipe, on_ready=on_ready)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,  # the app logs one line per request, with its id
        timeout_graceful_shutdown=cfg.graceful_shutdown_s,
        lifespan="on",
    )
    return uvicorn.Server(config)


def serve(cfg: ServeConfig) -> int:
    cfg.validate()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    if not cfg.loopback:
        log.warning("listening on %s, not a loopback address: put authentication in front of this server", host)

    def ready(state) -> None:
        log.info("apet serve: ready on http://%s:%d (OpenAI API at /v1, /health, /metrics)", host, port)

    server = make_server(cfg, sock, on_ready=ready)
    server.run(sockets=[sock])
    return 0 if server.started else 1
