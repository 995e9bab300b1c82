"""gunicorn workers that drain before they stop.

On SIGTERM (a stop, or the old workers of a HUP reload) the worker first turns
/ready to 503 and keeps serving for ``FILEPROXY_DRAIN_DELAY`` seconds, then
closes its listener and lets in-flight downloads finish within the graceful
timeout, their last buffered bytes handed to the kernel (``server.DrainingRunner``),
then exits. What the graceful timeout cuts is logged (cause ``shutdown``) and the
worker exits before the master's own graceful timeout (gunicorn.conf.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from types import FrameType

from aiohttp import web
from aiohttp.worker import GunicornUVLoopWebWorker, GunicornWebWorker

from fileproxy.app_keys import LIFECYCLE, LISTEN_SOCKETS, SETTINGS
from fileproxy.http.aiohttp_server import wake_worker
from fileproxy.server import DrainingRunner
from fileproxy.upstream.tcp_options import apply_to_listeners

log = logging.getLogger("fileproxy")


class _DrainingWorker(GunicornWebWorker):
    _app: web.Application | None = None

    def load_wsgi(self) -> None:
        super().load_wsgi()
        factory: Callable[[], Awaitable[web.Application]] = self.wsgi  # type: ignore[has-type]

        async def keep_app() -> web.AppRunner:
            self._app = app = await factory()
            settings = app[SETTINGS]
            apply_to_listeners(self.sockets, settings, app[LISTEN_SOCKETS])
            # aiohttp's worker runs a runner the factory returns instead of building
            # its own AppRunner, whose cleanup returns with the last bytes of finished
            # downloads still buffered (see DrainingRunner). The arguments aiohttp's
            # worker passes, but the access log (the app's handler_args set it, and
            # win over the runner's) and shutdown_timeout: aiohttp takes 95% of
            # gunicorn's graceful_timeout, which includes the drain delay already spent.
            return DrainingRunner(
                app,
                logger=self.log,
                keepalive_timeout=self.cfg.keepalive,
                shutdown_timeout=settings.graceful_timeout,
            )

        self.wsgi = keep_app

    def notify(self) -> None:
        """The heartbeat (every second, the first time just after the listeners start).

        aiohttp's worker starts its listeners with ``SockSite``'s default backlog of
        128, which lowers the listen() backlog gunicorn set (``backlog`` in
        gunicorn.conf.py): a burst of new connections (a restart, a load balancer
        reconnecting) then overflows the accept queue and its SYNs are retried after
        1 s, 3 s, ... Listening again with gunicorn's value raises it back; it is
        idempotent, and the listener is the one all workers share.
        """
        for sock in self.sockets:
            sock.listen(self.cfg.backlog)
        super().notify()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self._app
        if app is None or app[LIFECYCLE].draining:
            super().handle_exit(sig, frame)
            return
        delay = app[SETTINGS].drain_delay
        app[LIFECYCLE].start_draining(time.time())
        log.info("draining: /ready is 503, closing the listener soon", extra={"delay_s": delay})
        self.loop.call_later(delay, self._stop, sig, frame)

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        wake_worker(self)  # the worker loop ends now, not at its next 1 s tick


class DrainingWorker(_DrainingWorker):
    """asyncio's event loop (uvloop not installed)."""


class DrainingUVLoopWorker(_DrainingWorker, GunicornUVLoopWebWorker):
    """uvloop's event loop."""
