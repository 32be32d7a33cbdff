"""Run the app under uvicorn: bind the socket first (so `--port 0` gets a free port we can name),
then serve until SIGINT/SIGTERM, when uvicorn stops accepting, gives in-flight requests
`graceful_shutdown_s` to finish, and the app's shutdown stops the batcher."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading

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


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server whose SIGINT/SIGTERM mean: stop accepting, let in-flight requests finish
        (up to graceful_shutdown_s), run the app's shutdown, return. uvicorn's own re-raises the
        signal afterwards, so a server that drained cleanly would still die of it; `apet serve`
        exits 0 instead."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    return Server


def make_server(cfg: ServeConfig, sock: socket.socket, pipe=None, on_ready=None, log_level: str = "info"):
    """A uvicorn.Server for the app on an already bound socket (also what the tests run in a thread)."""
    import uvicorn

    from .access import header_deadline_protocol
    from .app import create_app

    app = create_app(cfg, pipe=pipe, on_ready=on_ready)
    config = uvicorn.Config(
        app,
        http=header_deadline_protocol(cfg.header_timeout_s),  # h11 with a deadline for request headers
        log_level=log_level,
        access_log=False,  # the app logs one line per request, with its id
        timeout_graceful_shutdown=cfg.graceful_shutdown_s,
        lifespan="on",
    )
    return _server_class()(config)


def serve(cfg: ServeConfig) -> int:
    """The `apet serve` command: the pipeline loads before the port opens (a bad engine directory is
    a one-line error, not a server that fails its first request)."""
    from .app import load_pipeline

    cfg.validate()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    pipe = load_pipeline(cfg)
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    if not cfg.loopback and cfg.api_key is None:
        log.warning(
            "listening on %s, not a loopback address, without --api-key (or APET_API_KEY): anyone who reaches "
            "it can use it",
            host,
        )

    def ready(state) -> None:
        log.info("apet serve: ready on http://%s:%d (OpenAI API at /v1, /health, /metrics)", host, port)

    server = make_server(cfg, sock, pipe=pipe, on_ready=ready)
    server.run(sockets=[sock])
    log.info("apet serve: stopped")
    return 0 if server.started else 1
