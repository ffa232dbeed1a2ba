#!/usr/bin/env bash
# make demo: the whole pipeline on this machine, no Docker. Starts the stack
# (durable broker storage), both services and the event generator routed as
# Logstash does, and the read API with its live page (URL printed), shows live
# rankings every second for DEMO_SECONDS (default 30), then prints a user's history, the BigQuery row count and the DLQ
# counts, and stops everything it started.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DEMO_SECONDS="${DEMO_SECONDS:-30}"
DEMO_RATE="${DEMO_RATE:-400}"
export STACK_DIR="${STACK_DIR:-$REPO/.stack-demo}"
export STACK_KAFKA_STORAGE=sqlite
# DEMO_PROFILE=debug uses the binaries `make test` built (the demo's own test).
PROFILE="${DEMO_PROFILE:-release}"
# Where cargo puts binaries: CARGO_TARGET_DIR or build.target-dir may move it.
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
BIN="${TARGET_DIR:-$REPO/target}/$PROFILE"
RUN="$STACK_DIR/demo"

say() { echo "demo: $*" >&2; }

if [ "$PROFILE" = release ]; then
    say "building release binaries"
    scripts/build-deps.sh
    cargo build --release --workspace --bins --quiet
fi
for bin in redis-sink bigquery-sink gen-events kafka-lag; do
    [ -x "$BIN/$bin" ] || { say "$BIN/$bin is missing: run cargo build --workspace --bins"; exit 1; }
done

stack_was_up=false
scripts/stack.sh status >/dev/null 2>&1 && stack_was_up=true
# Each demo starts empty, so its counts add up: the broker and Redis keep
# their data across restarts, the emulator keeps its rows in memory only.
if [ "$stack_was_up" = false ] && [ "$STACK_DIR" = "$REPO/.stack-demo" ]; then
    rm -rf "$STACK_DIR"
fi
eval "$(scripts/stack.sh up)"
mkdir -p "$RUN"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "$stack_was_up" = false ]; then scripts/stack.sh down || true; fi
}
trap cleanup EXIT

mapfile -t ports < <(python3 scripts/free_port.py 3)
REDIS_METRICS=${ports[0]} BQ_METRICS=${ports[1]} API_PORT=${DEMO_API_PORT:-${ports[2]}}
"$BIN/redis-sink" --metrics-addr "127.0.0.1:$REDIS_METRICS" --log-format json \
    >"$RUN/redis-sink.log" 2>&1 &
pids+=($!)
# The read API and live page, reading what redis-sink writes.
"$BIN/redis-sink" serve --listen "127.0.0.1:$API_PORT" --log-format json \
    >"$RUN/read-api.log" 2>&1 &
pids+=($!)
PAGE="http://127.0.0.1:$API_PORT/?window=5m"
# The emulator takes any token: a developer's own Google credentials stay home.
env -u GOOGLE_APPLICATION_CREDENTIALS \
"$BIN/bigquery-sink" --bigquery-endpoint "$BIGQUERY_ENDPOINT" --project "$BIGQUERY_PROJECT" \
    --dataset "$BIGQUERY_DATASET" --metrics-addr "127.0.0.1:$BQ_METRICS" --log-format json \
    >"$RUN/bigquery-sink.log" 2>&1 &
pids+=($!)
"$BIN/gen-events" --route logstash --rate "$DEMO_RATE" --seconds "$DEMO_SECONDS" \
    --count 1000000000 --bad-fraction 0.02 --seed "$RANDOM" >"$RUN/gen-events.log" 2>&1 &
gen=$!
pids+=("$gen")

# metric NAME PORT: the sum of a Prometheus metric over its labels.
metric() {
    { curl -sf "http://127.0.0.1:$2/metrics" 2>/dev/null || true; } \
        | awk -v m="$1" '$1 ~ "^"m"({|$)" { s += $2 } END { printf "%d", s }'
}
lag() { "$BIN/kafka-lag" --group "$1" --topic "$2" 2>/dev/null || echo "?"; }

view() {
    local title=$1 r2 r3
    r3=$(metric sink_events_consumed_total "$REDIS_METRICS")
    r2=$(metric sink_events_consumed_total "$BQ_METRICS")
    printf '\033[H\033[2J'
    echo "movie-log pipeline — $title"
    echo
    printf 'redis-sink     user3: %8s events  %6s/s  lag %s\n' "$r3" "$(( r3 - ${last3:-0} ))" "$(lag redis-sink user3)"
    printf 'bigquery-sink  user2: %8s events  %6s/s  lag %s\n' "$r2" "$(( r2 - ${last2:-0} ))" "$(lag bigquery-sink user2)"
    last3=$r3 last2=$r2
    echo "live page: $PAGE"
    echo
    echo "Top 10 searches, last hour"
    "$BIN/redis-sink" top --kind search --window 1h --limit 10 --redis-url "$REDIS_URL" 2>/dev/null || true
    echo
    echo "Top 10 movies, last hour"
    "$BIN/redis-sink" top --kind movie --window 1h --limit 10 --redis-url "$REDIS_URL" 2>/dev/null || true
}

while kill -0 "$gen" 2>/dev/null; do
    view "generating for ${DEMO_SECONDS}s at ${DEMO_RATE} events/s"
    sleep 1
done
wait "$gen" || { say "the generator failed:"; cat "$RUN/gen-events.log" >&2; exit 1; }

# Caught up: both groups have committed everything produced.
for _ in $(seq 1 120); do
    [ "$(lag redis-sink user3)" = 0 ] && [ "$(lag bigquery-sink user2)" = 0 ] && break
    view "draining"
    sleep 1
done
view "done"

echo
user=$( (redis-cli -u "$REDIS_URL" --scan --pattern 'history:search:*' 2>/dev/null || true) | awk -F: 'NR == 1 { print $3 }')
if [ -n "$user" ]; then
    echo "Recent searches of user $user"
    "$BIN/redis-sink" history --kind search --user "$user" --limit 10 --redis-url "$REDIS_URL"
fi
echo
rows=$(curl -sf -X POST "$BIGQUERY_ENDPOINT/bigquery/v2/projects/$BIGQUERY_PROJECT/queries" \
    -H 'content-type: application/json' \
    -d "{\"query\":\"SELECT COUNT(*) FROM \`$BIGQUERY_PROJECT.$BIGQUERY_DATASET.user_logs\`\",\"useLegacySql\":false}" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["rows"][0]["f"][0]["v"])')
echo "Events generated: $(grep -o 'sent [0-9]*' "$RUN/gen-events.log" | cut -d' ' -f2)"
echo "BigQuery rows in $BIGQUERY_DATASET.user_logs: $rows"
echo "Dead letters: user3.dlq $(metric sink_dlq_events_total "$REDIS_METRICS"), user2.dlq $(metric sink_dlq_events_total "$BQ_METRICS")"
if curl -sf "http://127.0.0.1:$API_PORT/api/v1/top/search?window=5m&limit=1" | grep -q '"member"'; then
    echo "Live page (served while the demo runs; DEMO_SECONDS=600 for longer): $PAGE"
else
    say "the read API did not serve the rankings: $RUN/read-api.log"; exit 1
fi
echo "Logs: $RUN"
