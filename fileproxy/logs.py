"""Logging: JSON lines (production) or text, and the access log."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .proxy_handler import EXCHANGE, Exchange

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info and record.levelno >= logging.ERROR:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}"
            for k, v in vars(record).items()
            if k not in _STANDARD and not k.startswith("_")
        )
        text = super().format(record)
        return f"{text} {extras}" if extras else text


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # gunicorn's own loggers keep their handlers; aiohttp's go through ours.
    for name in ("aiohttp.access", "aiohttp.server", "aiohttp.web", "aiohttp.client"):
        logging.getLogger(name).handlers[:] = []


class AccessLogger(AbstractAccessLogger):
    """One line per request, with what the proxy knows about it."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_s: float) -> None:
        exchange = request.get(EXCHANGE)
        fields: dict[str, Any] = {
            "remote": request.remote,
            "method": request.method,
            "path": request.raw_path,
            "status": response.status,
            "response_bytes": response.body_length,
            "duration_ms": round(time_s * 1000, 3),
            "user_agent": request.headers.get("User-Agent"),
        }
        if isinstance(exchange, Exchange):
            fields.update(
                request_id=exchange.request_id,
                upstream_status=exchange.upstream_status,
                outcome=exchange.outcome,
            )
            if exchange.error:
                fields["error"] = exchange.error
        self.logger.info("request", extra=fields)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
