"""The `fileproxy` command: serve, sample-upstream, config, check."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import orjson

from fileproxy.settings import ConfigError, Settings, env_file_template, markdown_table

EXIT_CONFIG = 2


def _settings_or_exit() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        print(f"fileproxy: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _cmd_serve(args: argparse.Namespace) -> int:
    from fileproxy.server import ListenError, serve

    settings = _settings_or_exit()
    try:
        serve(settings)
    except ListenError as exc:  # a port in use, a socket path that cannot be bound
        print(f"fileproxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _cmd_sample_upstream(args: argparse.Namespace) -> int:
    from fileproxy.sample_upstream import run

    host, _, port = args.bind.rpartition(":")
    if not host or not port.isdigit():
        print(f"fileproxy: invalid --bind {args.bind!r}: expected HOST:PORT", file=sys.stderr)
        return EXIT_CONFIG
    if args.exit_with_parent:
        _exit_with_parent()
    run(host.strip("[]"), int(port), seed=args.seed)
    return 0


def _exit_with_parent() -> None:
    """Stop (SIGTERM to ourselves) once the process that started us is gone."""
    import os
    import signal
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _cmd_config(args: argparse.Namespace) -> int:
    if args.format == "markdown":
        print(markdown_table())
        return 0
    if args.format == "env-template":
        print(env_file_template(), end="")
        return 0
    settings = _settings_or_exit()
    if args.format == "json":
        print(orjson.dumps(settings.public_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        for spec, value in settings.public_items():
            source = settings.sources.get(spec.env, "default")
            print(f"{spec.env}={value}  # {source}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from fileproxy.ops.check import run_checks

    return run_checks(_settings_or_exit())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fileproxy",
        description="Adaptive streaming reverse proxy for file delivery. "
        "Configured by environment variables: see `fileproxy config`.",
        epilog="Documentation (in the source tree): README.md to start; "
        "docs/configuration.md, docs/deployment.md, docs/operations.md, "
        "docs/how-it-works.md, docs/performance.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "serve",
        help="run the daemon in one process",
        description="Run the daemon in one process (production: gunicorn, see "
        "docs/deployment.md). SIGTERM drains and stops it; SIGHUP reopens its log files. "
        "Its endpoints and logs: docs/operations.md.",
    ).set_defaults(func=_cmd_serve)
    sample = sub.add_parser(
        "sample-upstream",
        help="run the bundled sample backend",
        description="Run the bundled sample backend: generated files with ETag and Range, "
        "/sse, /slow, /echo. A first session with it: README.md.",
    )
    sample.add_argument("--bind", default="127.0.0.1:27804", help="HOST:PORT (default %(default)s)")
    sample.add_argument("--seed", type=int, default=0, help="content seed (default %(default)s)")
    sample.add_argument(
        "--exit-with-parent", action="store_true", help="stop when the parent process exits"
    )
    sample.set_defaults(func=_cmd_sample_upstream)
    config = sub.add_parser(
        "config",
        help="print the effective configuration (secrets redacted)",
        description="Print the effective configuration (secrets redacted). "
        "Every setting: docs/configuration.md.",
    )
    config.add_argument(
        "--format", choices=("env", "json", "markdown", "env-template"), default="env"
    )
    config.set_defaults(func=_cmd_config)
    check = sub.add_parser(
        "check",
        help="diagnose this machine and configuration",
        description="Diagnose this machine and configuration: one PASS/WARN/FAIL line "
        "per check, exit 0 when nothing FAILs. What each line means: docs/operations.md.",
    )
    check.set_defaults(func=_cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
