#!/usr/bin/env bash
# Start the services the test suite needs that are not running, run a command, stop what was started.
#
#     scripts/test-services.sh .venv/bin/python -m pytest -q -m "not soak"     # what `make test` runs
#
# - Redis at GENIMG_TEST_REDIS_URL (default redis://127.0.0.1:6379/0): used if it answers;
#   otherwise a redis-server is started on that port (nothing on disk) and stopped at the end.
#   Debian's redis-server is installed first when no redis-server is on PATH (root only).
# - Prometheus and promtool (Debian's `prometheus`): scripts/ensure-prometheus.sh installs them;
#   the scrape tests skip, saying why, where that is impossible.
# - Triton, moto's S3 server and workers are started by the tests themselves (tests/fixtures/).
#
# Exit code: the command's. pytest's 5 (no test collected) is reported as an error, never as a pass.
set -uo pipefail
cd "$(dirname "$0")/.."

REDIS_URL="${GENIMG_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"
hostport="${REDIS_URL#*://}"; hostport="${hostport##*@}"; hostport="${hostport%%/*}"
REDIS_HOST="${hostport%:*}"; REDIS_PORT="${hostport##*:}"
[ "$REDIS_PORT" = "$hostport" ] && REDIS_PORT=6379
RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/genimg-test-services.XXXXXX")"
STARTED_REDIS_PID=""

say() { echo "test-services: $*" >&2; }

redis_answers() (  # a subshell; any reply (PONG, or NOAUTH from a server with a password) will do
    reply=""
    { exec 3<>"/dev/tcp/$REDIS_HOST/$REDIS_PORT"; } 2>/dev/null || exit 1
    printf 'PING\r\n' >&3
    IFS= read -r -t 2 reply <&3 || true
    [ -n "$reply" ]
)

cleanup() {
    if [ -n "$STARTED_REDIS_PID" ] && kill -0 "$STARTED_REDIS_PID" 2>/dev/null; then
        say "stopping the redis-server it started (pid $STARTED_REDIS_PID)"
        kill "$STARTED_REDIS_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$STARTED_REDIS_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$STARTED_REDIS_PID" 2>/dev/null || true
    fi
    rm -rf "$RUN_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if redis_answers; then
    say "redis at $REDIS_HOST:$REDIS_PORT answers"
else
    if ! command -v redis-server >/dev/null 2>&1; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
            say "installing Debian's redis-server"
            apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
        fi
    fi
    command -v redis-server >/dev/null 2>&1 || { say "no redis-server and none answering at $REDIS_URL"; exit 3; }
    say "starting redis-server on $REDIS_HOST:$REDIS_PORT (log $RUN_DIR/redis.log)"
    redis-server --port "$REDIS_PORT" --bind "$REDIS_HOST" --save "" --appendonly no --dir "$RUN_DIR" \
        --daemonize yes --pidfile "$RUN_DIR/redis.pid" --logfile "$RUN_DIR/redis.log"
    for _ in $(seq 100); do redis_answers && break; sleep 0.2; done
    redis_answers || { say "redis-server did not answer within 20 s"; cat "$RUN_DIR/redis.log" >&2; exit 3; }
    STARTED_REDIS_PID="$(cat "$RUN_DIR/redis.pid")"
fi

if [ -x scripts/ensure-prometheus.sh ]; then
    scripts/ensure-prometheus.sh || say "prometheus/promtool unavailable; the scrape tests will skip"
fi

"$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    say "pytest collected no test: failing (exit 5)"
fi
exit "$rc"
