"""gunicorn configuration: `gunicorn -c gunicorn.conf.py` is the whole command.

Everything comes from fileproxy's settings (environment variables); a bad value
stops gunicorn here with one line naming the variable, exit code 2.
"""

import math
import sys

from fileproxy.lifecycle import CUT_OFF_MARGIN_S
from fileproxy.settings import ConfigError, Settings

try:
    _settings = Settings.from_env()
except ConfigError as exc:
    print(f"fileproxy: {exc}", file=sys.stderr)
    sys.exit(2)

try:
    import uvloop  # noqa: F401

    worker_class = "fileproxy.gunicorn_worker.DrainingUVLoopWorker"
except ImportError:  # the daemon still runs; /health reports uvloop_enabled: false
    worker_class = "fileproxy.gunicorn_worker.DrainingWorker"

wsgi_app = "fileproxy.app:gunicorn_app"
bind = [str(_settings.bind)]
workers = _settings.workers
# Idle client connections: above nginx's upstream keepalive_timeout, or nginx may
# reuse a connection we are closing (sporadic 502 "upstream prematurely closed").
keepalive = math.ceil(_settings.client_keepalive_timeout)
# After SIGTERM / HUP a worker drains (FILEPROXY_DRAIN_DELAY, /ready 503), then
# in-flight downloads get FILEPROXY_GRACEFUL_TIMEOUT; the worker then cuts what is
# left itself (logs each, removes its spool) and exits. The master SIGKILLs a worker
# still there graceful_timeout after its SIGTERM: CUT_OFF_MARGIN_S later than that.
graceful_timeout = math.ceil(_settings.drain_delay + _settings.graceful_timeout) + CUT_OFF_MARGIN_S
# Worker heartbeat: the aiohttp worker notifies the arbiter every second.
timeout = 30
# No periodic worker restarts: they would cut long downloads.
max_requests = 0
backlog = 2048
proc_name = "fileproxy"
# gunicorn >= 25 opens a control socket under $HOME; a sandboxed service has no
# writable home, and several instances on one host would share the path.
control_socket_disable = True
