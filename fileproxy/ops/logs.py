"""Logging: JSON lines (production) or text; access log on stdout, the rest on stderr.

The access lines do not go through the logging module: ``http/access_log.py`` builds
and buffers them and writes them in batches (see there); ``configure`` only tells it
where. Everything else is ordinary logging, one line at a time.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import Any

import orjson

from fileproxy.http import access_log

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class _FormatOnce(logging.Formatter):
    """A formatter that formats a record once, however many handlers write it.

    A log line goes to stderr and, with FILEPROXY_LOG_DIR, to error.log too: two
    handlers sharing this formatter. The text is kept on the record under a "_" name,
    which neither format outputs.
    """

    def format(self, record: logging.LogRecord) -> str:
        cached = record.__dict__.get("_formatted")
        if cached is not None and cached[0] is self:
            text: str = cached[1]
            return text
        text = self.format_record(record)
        record._formatted = (self, text)
        return text

    def format_record(self, record: logging.LogRecord) -> str:
        return super().format(record)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields passed with ``extra=``, in their order."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _STANDARD and not key.startswith("_")
    }


class JsonFormatter(_FormatOnce):
    def format_record(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_extras(record))
        if record.exc_info and record.levelno >= logging.ERROR:
            line["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(line, default=str).decode()
        except TypeError:  # bytes from the wire that are not UTF-8: as the access log does
            escaped = {
                k: access_log.escape(v) if isinstance(v, str) else v for k, v in line.items()
            }
            return orjson.dumps(escaped, default=str).decode()


class TextFormatter(_FormatOnce):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format_record(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        text = super().format_record(record)
        return f"{text} {extras}" if extras else text


def reopen_files() -> None:
    """access.log and error.log reopened now if logrotate moved or removed them (HUP,
    USR1); without a signal they are reopened at their next line."""
    access_log.ACCESS.reopen_files()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.handlers.WatchedFileHandler):
            handler.reopenIfNeeded()


def configure(level: str, fmt: str, log_dir: str = "") -> None:
    """Access lines to stdout, everything else to stderr; both also to files in log_dir."""
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    access_sinks: list[access_log.Sink] = [access_log.StreamSink(access_log.stdout_fd())]
    error_handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        # Both reopen the file after logrotate moves it (no signal, no copytruncate).
        access_sinks.append(access_log.WatchedFileSink(f"{log_dir}/access.log"))
        error_handlers.append(logging.handlers.WatchedFileHandler(f"{log_dir}/error.log"))
    for handler in error_handlers:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = error_handlers
    root.setLevel(level.upper())
    access_log.ACCESS.configure(access_sinks, text=fmt != "json")
    # Nothing logs to the access logger through logging; should something, it goes to
    # stderr with the rest rather than interleave with the batches on stdout.
    access = logging.getLogger(access_log.ACCESS_LOGGER)
    access.handlers[:] = []
    access.propagate = True
    # aiohttp's own loggers go through ours.
    for name in ("aiohttp.access", "aiohttp.server", "aiohttp.web", "aiohttp.client"):
        logging.getLogger(name).handlers[:] = []
