#!/usr/bin/env bash
# Start fileproxy for production: gunicorn + uvloop workers, configured by environment.
#
#   ./run_optimized.sh [ENV_FILE]      run (ENV_FILE defaults to conf/fileproxy.env if present)
#   ./run_optimized.sh --check         run `fileproxy check` and exit
#
# Variables already set in the environment win over the env file. Without
# FILEPROXY_UPSTREAM the bundled sample backend is started on 127.0.0.1:27804
# (FILEPROXY_SAMPLE_BIND to change it) and proxied.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${FILEPROXY_VENV:-.venv}
PYTHON=${PYTHON:-python3}

log() { printf 'run_optimized: %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/gunicorn" ] || [ ! -x "$VENV/bin/fileproxy" ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
        log "Python >= 3.11 is required (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11"
        exit 1
    }
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || {
        log "the venv module is missing: apt-get install -y python3-venv"
        exit 1
    }
    log "creating $VENV and installing fileproxy (first run only)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet .
fi

check_only=0
env_file=""
for arg in "$@"; do
    case "$arg" in
        --check) check_only=1 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) env_file=$arg ;;
    esac
done
if [ -z "$env_file" ] && [ -f conf/fileproxy.env ]; then
    env_file=conf/fileproxy.env
fi
if [ -n "$env_file" ]; then
    [ -r "$env_file" ] || { log "cannot read env file $env_file"; exit 1; }
    # KEY=VALUE lines; the environment wins over the file.
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        case "$line" in ''|'#'*) continue ;; esac
        key=${line%%=*}
        value=${line#*=}
        [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { log "ignoring malformed line in $env_file: $line"; continue; }
        value=${value%\"}; value=${value#\"}
        if [ -z "${!key+set}" ]; then export "$key=$value"; fi
    done < "$env_file"
    log "loaded $env_file"
fi

if [ "$check_only" = 1 ]; then
    exec "$VENV/bin/fileproxy" check
fi

want_nofile=65536
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$want_nofile" ]; then
    if ulimit -n "$want_nofile" 2>/dev/null; then
        log "open files limit raised to $want_nofile"
    else
        hard=$(ulimit -Hn)
        ulimit -n "$hard" 2>/dev/null || true
        log "WARNING: open files limit is $(ulimit -n) (hard limit $hard), below $want_nofile; raise it (LimitNOFILE= in the systemd unit)"
    fi
fi

# Validate the configuration before anything starts: one line and exit 2 on a bad value.
"$VENV/bin/fileproxy" config >/dev/null

if "$VENV/bin/python" -c 'import uvloop' 2>/dev/null; then
    log "uvloop: active (gunicorn worker fileproxy.gunicorn_worker.DrainingUVLoopWorker)"
else
    log "WARNING: uvloop not importable: running on asyncio's default loop"
fi

bind=${FILEPROXY_BIND:-127.0.0.1:10080}
if [ -z "${FILEPROXY_UPSTREAM:-}" ]; then
    sample_bind=${FILEPROXY_SAMPLE_BIND:-127.0.0.1:27804}
    export FILEPROXY_UPSTREAM="http://$sample_bind"
    "$VENV/bin/fileproxy" sample-upstream --bind "$sample_bind" --exit-with-parent &
    log "no FILEPROXY_UPSTREAM set: started the sample backend on http://$sample_bind (pid $!)"
    case "$bind" in
        unix:*) base="--unix-socket ${bind#unix:} http://localhost" ;;
        *) base="http://$bind" ;;
    esac
    cat >&2 <<URLS
run_optimized: try:
    curl -s $base/ | head                       # the sample backend's index, through fileproxy
    curl -s -o /dev/null -w '%{size_download} bytes %{speed_download} B/s\n' $base/files/64m.bin
    curl -s -r 0-99 $base/files/1m.bin | wc -c  # a Range request: 100 bytes
    curl -sN $base/sse                          # server-sent events, one per second
    curl -s $base/health | jq .performance_optimization
    curl -s $base/stats | jq .performance_optimizer.metrics
URLS
fi

exec "$VENV/bin/gunicorn" -c gunicorn.conf.py
