"""Running the app: uvicorn with a shutdown that drains the engine, and the request log.

On SIGINT / SIGTERM uvicorn stops accepting connections and waits for the open ones. Meanwhile
the engine takes no new requests and lets the running ones finish for shutdown_grace_s; what is
still running then ends with "shutdown" (a 503 body, or an error event in a stream), so every
client gets an answer and every connection closes before the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import uvicorn

from armodal.checkpoint import LoadedRun
from armodal.serve.app import LOGGER, create_app, model_name
from armodal.serve.engine import Engine
from armodal.serve.settings import ServerSettings

__all__ = ["DrainingServer", "build_server", "serve"]


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown also drains `engine` (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, engine: Engine, grace_s: float):
        super().__init__(config)
        self.engine, self.grace_s = engine, grace_s

    async def shutdown(self, sockets=None) -> None:
        drain = asyncio.create_task(asyncio.to_thread(self.engine.stop, self.grace_s))
        await super().shutdown(sockets)
        await drain


def build_server(run: LoadedRun, settings: ServerSettings, log_level: str = "info",
                 engine: Engine | None = None) -> DrainingServer:
    """The uvicorn server for `run` (not started): server.run() serves until a signal."""
    engine = engine or Engine(run.model, settings.max_batch, settings.max_queue)
    app = create_app(run, settings, engine=engine)
    # uvicorn's own limit is a backstop only: the engine ends every request by the grace.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            access_log=False,
                            timeout_graceful_shutdown=settings.shutdown_grace_s + 5)
    return DrainingServer(config, engine, settings.shutdown_grace_s)


def serve(run: LoadedRun, settings: ServerSettings, log_level: str = "info") -> None:
    """Serve `run` until SIGINT / SIGTERM, request logs as JSON lines on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    key = "API key required" if settings.api_key else "no API key"
    print(f"armodal serve: {model_name(run, settings)} ({run.path}) on "
          f"http://{settings.host}:{settings.port} ({key}; Ctrl-C stops)", file=sys.stderr)
    try:
        build_server(run, settings, log_level).run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it drained for; we are done
        pass
