"""The wall around aiohttp's server internals: every one fileproxy uses is here, and only here.

Client connections are served by fileproxy's own protocol (``data_plane``); aiohttp
still runs the application around it (its startup and cleanup, the ``AppRunner`` and
sites of ``fileproxy serve``, gunicorn's aiohttp worker). Each private name, why, and
what public API would replace it:

``Application._make_handler``
    Where an ``AppRunner`` (``fileproxy serve`` and gunicorn's aiohttp worker alike)
    gets the protocol factory its sites serve with: the one place to put the data
    plane in. aiohttp 4 removes it; replacement: an ``AppRunner`` subclass overriding
    ``_make_server``, or a public factory argument.
``GunicornWebWorker._notify_waiter_done()``
    Wakes aiohttp's gunicorn worker loop at once after ``handle_exit`` (it otherwise
    notices at its next 1 s tick): a drained worker exits when it is done, not up to a
    second later (``wake_worker``). Replacement: none.

``check()`` verifies them against the installed aiohttp and raises ``AiohttpMoved``
naming what moved; the application calls it at startup, and
tests/unit/test_aiohttp_walls.py runs it.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.worker import GunicornWebWorker

from fileproxy.upstream.aiohttp_client import PINNED, AiohttpMoved

# (app, loop, the runner's options) -> the protocol factory the sites serve with
ServerFactory = Callable[[web.Application, asyncio.AbstractEventLoop, dict[str, Any]], Any]


def application_class(make_server: ServerFactory) -> type[web.Application]:
    """A ``web.Application`` whose ``AppRunner`` serves through ``make_server``'s factory."""
    with warnings.catch_warnings():
        # aiohttp discourages subclassing Application; it is the one place that builds
        # the server under both AppRunner users (fileproxy serve and gunicorn's worker).
        warnings.simplefilter("ignore", DeprecationWarning)

        class DataPlaneApplication(web.Application):
            def _make_handler(
                self, *, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any
            ) -> Any:
                return make_server(self, loop or asyncio.get_running_loop(), kwargs)

    return DataPlaneApplication


def wake_worker(worker: GunicornWebWorker) -> None:
    """Wake aiohttp's gunicorn worker loop now (after ``handle_exit``)."""
    worker._notify_waiter_done()


def check() -> None:
    """Raise ``AiohttpMoved`` naming every internal above that is missing or changed."""
    problems = []
    if not callable(getattr(web.Application, "_make_handler", None)):
        problems.append("Application._make_handler")
    if not callable(getattr(GunicornWebWorker, "_notify_waiter_done", None)):
        problems.append("GunicornWebWorker._notify_waiter_done()")
    if problems:
        raise AiohttpMoved(
            f"aiohttp {aiohttp.__version__} moved internals fileproxy relies on "
            f"(checked against {PINNED}): {'; '.join(problems)}"
        )
