"""Start-up and shutdown: load the model, listen, compile every program (GET /health says 503 meanwhile, 200
after), serve with uvicorn; on SIGTERM (or Ctrl-C) stop accepting (503), answer what was accepted within
`drain_s`, exit 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from typing import Optional

import uvicorn

from instructor_jax.serve.app import create_app
from instructor_jax.serve.service import EmbeddingService

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain on the first SIGTERM / SIGINT instead of closing the listening socket at once
    (so new requests get a 503 a load balancer understands, while accepted ones are answered)."""

    def __init__(self, config: uvicorn.Config, service: EmbeddingService, drain_s: float):
        super().__init__(config)
        self.service = service
        self.drain_s = drain_s
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.draining = False
        self.drained: Optional[bool] = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # uvicorn's own handler also re-raises the signal after shutdown (exit -15); a drained exit is 0.
        if self.draining:
            log.warning("second signal: exiting without waiting for %d inputs in flight", self.service.in_flight)
            self.force_exit = self.should_exit = True
            return
        self.draining = True
        log.warning("%s: draining: new requests get 503; answering the %d inputs in flight (at most %.0f s)",
                    signal.Signals(sig).name, self.service.in_flight, self.drain_s)
        self.service.begin_drain()
        if self.loop is None:
            self.should_exit = True
        else:
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.drain()))

    async def drain(self) -> None:
        self.drained = await self.service.wait_drained(self.drain_s)
        if self.drained:
            log.warning("drained: every accepted request was answered; exiting")
        else:
            log.error("drain_s=%.0f s passed with %d inputs still in flight; exiting without them", self.drain_s,
                      self.service.in_flight)
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one; the log says which)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def describe(service: EmbeddingService, url: str) -> str:
    info = service.info()
    limits = info["limits"]
    return (f"serving {service.name} at {url}: width {info['dim']}, max_seq_length {info['max_input_length']}, "
            f"pooling rule {info['pooling_rule']}, {info['model_dtype']}, {len(info['devices'])} "
            f"{info['platform']} device(s); batches of at most {limits['max_batch_tokens']} tokens, waiting at most "
            f"{limits['max_wait_ms']:g} ms, run by {len(service.shapes)} programs (packed, at most "
            f"{service.rows_per_batch} rows of {service.shapes[0][1]}, or padded to a bucket, one row per device); "
            f"at most {limits['max_concurrent_requests']} "
            f"inputs in flight, {limits['max_client_batch_size']} per request, {limits['max_body_bytes']} body bytes")


def serve(service: EmbeddingService, host: str, port: int, api_key: Optional[str], drain_s: float) -> int:
    """Listens, warms up in the background, serves until a signal; returns the exit code."""
    sock = bind(host, port)
    url = url_of(sock)
    config = uvicorn.Config(create_app(service, api_key), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5)
    server = DrainingServer(config, service, drain_s)
    log.info("%s", describe(service, url))
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it may use it (--api_key)", host)
    failed = []

    def warm_up():
        try:
            start = time.monotonic()
            service.warm_up()
            log.info("ready at %s: compiled and ran %d programs in %.1f s", url, len(service.shapes),
                     time.monotonic() - start)
        except BaseException as e:  # noqa: BLE001 - reported, then the server exits 1
            log.exception("warm-up failed: %s", e)
            failed.append(e)
            server.should_exit = True

    warming = threading.Thread(target=warm_up, name="instructor-jax-warm-up", daemon=True)
    warming.start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if warming.is_alive():  # a signal during warm-up: nothing to drain, and XLA cannot be interrupted
        log.warning("stopped during warm-up")
        logging.shutdown()
        os._exit(0)
    service.close()
    return 1 if failed else 0
