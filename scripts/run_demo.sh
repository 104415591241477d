#!/usr/bin/env bash
# gokiq demo (`make run`): the example Rails app's Sidekiq jobs running on a Celery worker.
#
# Starts, with honcho (Procfile): the Ruby sidecar on rails_sidecar/example_app, gokiq-bridge,
# `celery -A gokiq_celery worker --concurrency=20`, Flower and gokiq-api (the job history, in an
# SQLite file under .run/ unless GOKIQ_HISTORY_URL is set); then enqueues demo jobs through
# the app's real Sidekiq client and prints where to look. Ctrl-C stops everything.
#
# Redis: REDIS_URL if set (used as given). Otherwise, if a Redis answers on 127.0.0.1:6379, the
# demo uses a database there that is empty (or already holds an earlier demo's data) out of
# 12/13, 10/11, 8/9 (Sidekiq / Celery broker) and never flushes anything. Otherwise it starts its
# own redis-server (port 6379, else a free port; --save '' --dir .run/), stopped at exit.
#
# Optional environment: GOKIQ_SIDECAR_TOKEN, GOKIQ_FLOWER_USER (default gokiq),
# GOKIQ_FLOWER_PASSWORD (both tokens random when unset), GOKIQ_SIDECAR_PORT (7433),
# GOKIQ_BRIDGE_METRICS_PORT (9478), GOKIQ_WORKER_METRICS_PORT (9479), FLOWER_PORT (5555), and any
# gokiq setting (README.md). A busy port is replaced by a free one.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN="$ROOT/.run"
PY="$ROOT/.venv/bin/python"
APP="$ROOT/rails_sidecar/example_app"
mkdir -p "$RUN"

say() { printf '\033[1m[gokiq demo]\033[0m %s\n' "$*"; }
die() { say "error: $*" >&2; exit 1; }

[ -x "$PY" ] || die "no .venv: run \`make run\` (it installs what is missing)"
command -v ruby >/dev/null || die "ruby is not installed: run \`make run\`"

HONCHO_PID=""
REDIS_PID=""
cleanup() {
  trap - EXIT INT TERM
  if [ -n "$HONCHO_PID" ] && kill -0 "$HONCHO_PID" 2>/dev/null; then
    say "stopping the sidecar, bridge, worker and Flower ..."
    kill -TERM "$HONCHO_PID" 2>/dev/null || true
    wait "$HONCHO_PID" 2>/dev/null || true
  fi
  if [ -n "$REDIS_PID" ] && kill -0 "$REDIS_PID" 2>/dev/null; then
    say "stopping the demo's redis-server"
    kill -TERM "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
  fi
  say "stopped"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Small helpers in Python (the venv has redis-py and requests).
py() { "$PY" -c "$@"; }
redis_answers() {
  py 'import sys, redis; redis.Redis.from_url(sys.argv[1], socket_timeout=1).ping()' "$1" \
    >/dev/null 2>&1
}
port_free() {
  py 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" >/dev/null 2>&1
}
free_port() { py 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pick_port() { if port_free "$1"; then echo "$1"; else free_port; fi; }
token() { py 'import secrets; print(secrets.token_urlsafe(18))'; }
http_ok() {
  py 'import sys, requests
sys.exit(0 if requests.get(sys.argv[1], timeout=1).status_code == 200 else 1)' "$1" >/dev/null 2>&1
}

# -- Redis ------------------------------------------------------------------------------------
if [ -n "${REDIS_URL:-}" ]; then
  redis_answers "$REDIS_URL" || die "REDIS_URL=$REDIS_URL does not answer"
  say "using REDIS_URL=$REDIS_URL"
elif redis_answers redis://127.0.0.1:6379/0; then
  # Someone's Redis: take a pair of databases that are empty or already the demo's.
  pair=$(py 'import redis
for db in (12, 10, 8):
    dbs = [redis.Redis(port=6379, db=n) for n in (db, db + 1)]
    if all(r.dbsize() == 0 or r.exists("gokiq:demo") for r in dbs):
        print(db); break' || true)
  [ -n "$pair" ] || die "the Redis on 6379 has data in databases 8-13; set REDIS_URL to a database the demo may use"
  export REDIS_URL="redis://127.0.0.1:6379/$pair"
  export CELERY_BROKER_URL="redis://127.0.0.1:6379/$((pair + 1))"
  py 'import redis, sys
for url in sys.argv[1:]:
    redis.Redis.from_url(url).set("gokiq:demo", "databases used by gokiq'"'"'s make run")' \
    "$REDIS_URL" "$CELERY_BROKER_URL"
  say "a Redis already answers on 6379: the demo uses its databases $pair (Sidekiq) and $((pair + 1)) (Celery), nothing else"
else
  command -v redis-server >/dev/null || die "redis-server is not installed: run \`make run\`"
  port=$(pick_port 6379)
  # Its own session: Ctrl-C must not stop Redis before the processes that still use it.
  setsid redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$RUN" \
    >"$RUN/redis.log" 2>&1 &
  REDIS_PID=$!
  export REDIS_URL="redis://127.0.0.1:$port/0"
  for _ in $(seq 50); do redis_answers "$REDIS_URL" && break; sleep 0.1; done
  redis_answers "$REDIS_URL" || die "redis-server did not start (see $RUN/redis.log)"
  say "started redis-server on port $port (no persistence, stopped at exit)"
fi

# -- secrets, ports, settings -------------------------------------------------------------------
export GOKIQ_SIDECAR_TOKEN="${GOKIQ_SIDECAR_TOKEN:-$(token)}"
flower_user="${GOKIQ_FLOWER_USER:-gokiq}"
flower_password="${GOKIQ_FLOWER_PASSWORD:-$(token)}"
export FLOWER_BASIC_AUTH="$flower_user:$flower_password"
export FLOWER_ADDRESS=127.0.0.1
export FLOWER_PORT="$(pick_port "${FLOWER_PORT:-5555}")"
export GOKIQ_SIDECAR_PORT="$(pick_port "${GOKIQ_SIDECAR_PORT:-7433}")"
export GOKIQ_BRIDGE_METRICS_PORT="$(pick_port "${GOKIQ_BRIDGE_METRICS_PORT:-9478}")"
export GOKIQ_WORKER_METRICS_PORT="$(pick_port "${GOKIQ_WORKER_METRICS_PORT:-9479}")"
export GOKIQ_SIDECAR_URL="http://127.0.0.1:$GOKIQ_SIDECAR_PORT"
export GOKIQ_QUEUES="${GOKIQ_QUEUES:-default critical low}"
export GOKIQ_LOG_FORMAT="${GOKIQ_LOG_FORMAT:-text}"
export GOKIQ_EXAMPLE_DB="${GOKIQ_EXAMPLE_DB:-$RUN/demo.sqlite3}"
# The job history (gokiq-api): an SQLite file unless GOKIQ_HISTORY_URL names a database.
export GOKIQ_HISTORY_URL="${GOKIQ_HISTORY_URL:-sqlite:///$RUN/history.sqlite3}"
export GOKIQ_API_TOKENS="${GOKIQ_API_TOKENS:-$(token)}"
export GOKIQ_API_PORT="$(pick_port "${GOKIQ_API_PORT:-9480}")"
api_token="${GOKIQ_API_TOKENS%%,*}"
"$ROOT/.venv/bin/gokiq-history" migrate >/dev/null || die "gokiq-history migrate failed"
export PYTHONUNBUFFERED=1

# -- the stack ---------------------------------------------------------------------------------
say "starting the sidecar, gokiq-bridge, the Celery worker, Flower and gokiq-api (honcho, Procfile)"
"$ROOT/.venv/bin/honcho" start -f "$ROOT/Procfile" -d "$ROOT" -e /dev/null &
HONCHO_PID=$!

wait_ready() { # name url
  for _ in $(seq 600); do
    http_ok "$2" && return 0
    kill -0 "$HONCHO_PID" 2>/dev/null || die "a process exited during start-up (see above)"
    sleep 0.2
  done
  die "$1 not ready at $2 after 2 minutes"
}
wait_ready sidecar "$GOKIQ_SIDECAR_URL/ready"
wait_ready gokiq-bridge "http://127.0.0.1:$GOKIQ_BRIDGE_METRICS_PORT/ready"
wait_ready "celery worker" "http://127.0.0.1:$GOKIQ_WORKER_METRICS_PORT/metrics"
wait_ready flower "http://127.0.0.1:$FLOWER_PORT/healthcheck"
wait_ready gokiq-api "http://127.0.0.1:$GOKIQ_API_PORT/health"

# -- demo jobs, through the app's own Sidekiq client (the app is not changed) ----------------
say "enqueueing demo jobs with the example app's Sidekiq client"
(cd "$APP" && ruby -e '
  require "./config/environment"
  Current.user_id = 42
  3.times { |i| HardJob.perform_async(i, "héllo", {"nested" => {"n" => i}}) }
  HardJob.set(queue: "critical").perform_async("critical queue")
  HardJob.perform_in(10, "scheduled 10 s ahead")
  FlakyJob.perform_async("demo-#{Time.now.to_i}", 1)
  FailJob.perform_async("fails 3 times, then the dead set")
  GreetJob.perform_later(Person.create!(name: "Ann"), greeting: "Hello")
  puts "  enqueued 3 HardJob, 1 HardJob on critical, 1 HardJob.perform_in(10), 1 FlakyJob, 1 FailJob, 1 GreetJob (ActiveJob)"
')

cat <<EOF

  Flower (tasks, workers):  http://127.0.0.1:$FLOWER_PORT   user: $flower_user   password: $flower_password
  metrics:  sidecar  $GOKIQ_SIDECAR_URL/metrics
            bridge   http://127.0.0.1:$GOKIQ_BRIDGE_METRICS_PORT/metrics
            worker   http://127.0.0.1:$GOKIQ_WORKER_METRICS_PORT/metrics
  Sidekiq's data: $REDIS_URL     app database: $GOKIQ_EXAMPLE_DB
  job history:  curl -H "Authorization: Bearer $api_token" 'http://127.0.0.1:$GOKIQ_API_PORT/v1/jobs?limit=5'
                (then /v1/jobs/<jid>, /v1/stats; the API's document: http://127.0.0.1:$GOKIQ_API_PORT/docs)
  what ran:  (cd rails_sidecar/example_app && GOKIQ_EXAMPLE_DB=$GOKIQ_EXAMPLE_DB ruby -e \\
               'require "./config/environment"; JobRun.all.each { |r| p r.attributes.slice("job_class", "note", "middleware") }')
  Busy page: REDIS_URL=$REDIS_URL ruby -rsidekiq/api -e \\
               'Sidekiq::ProcessSet.new.each { |p| puts [p.identity, p.tag, p["busy"]].join(" ") }'
  FlakyJob retries after ~15-25 s; FailJob reaches the dead set after ~1 min (Sidekiq's delays).
  Ctrl-C stops everything.

EOF
wait "$HONCHO_PID"
