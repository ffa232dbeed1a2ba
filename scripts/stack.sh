#!/usr/bin/env bash
# The local stack for tests, benchmarks and `make demo`: a Kafka-protocol broker
# (tansu), Redis and a BigQuery emulator (bqemulator), each on a free loopback port.
#
#   scripts/stack.sh up             install what is missing, start, print `export` lines
#   scripts/stack.sh env            print the `export` lines of the running stack
#   scripts/stack.sh status         one line per component: up/down (exit 1 if any is down)
#   scripts/stack.sh down           stop what `up` started (by PID), safe when nothing is up
#   scripts/stack.sh restart-redis  restart Redis on the same port with the same AOF dir
#   scripts/stack.sh install        only install the components
#
#   eval "$(scripts/stack.sh up)"   # stdout of up/env is only `export` lines
#
# Settings: STACK_DIR (run dir, default <repo>/.stack), STACK_KAFKA_STORAGE=memory|sqlite
# (sqlite: durable broker storage; Kafka and Redis data then also survive down/up),
# STACK_REDIS=standalone|cluster|both (cluster: also a Redis Cluster of 3 primaries and 3
# replicas, scripts/redis-cluster.sh, exported as REDIS_CLUSTER_URL; cluster makes it
# REDIS_URL too, both keeps REDIS_URL the standalone Redis), STACK_READY_TIMEOUT
# (seconds per component, default 60), XDG_CACHE_HOME.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/process.sh
source "$REPO/scripts/process.sh"
STACK_DIR="${STACK_DIR:-$REPO/.stack}"
# Cached outside the repo so that fresh clones and worktrees reuse one install.
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/movielog-stack"
BQ_VENV="$CACHE_DIR/venv-bq"
BQ_HOME="$CACHE_DIR/bq-home"
BQ_PACKAGES=(bqemulator==1.4.0 numpy duckdb-extension-spatial==1.5.5)
TANSU_VERSION=0.6.0
KAFKA_STORAGE="${STACK_KAFKA_STORAGE:-memory}"
REDIS_MODE="${STACK_REDIS:-standalone}"
READY_TIMEOUT="${STACK_READY_TIMEOUT:-60}"
BQ_PROJECT=test-project
BQ_DATASET=movielog
TOPICS=(user2 user3 user2.dlq user3.dlq)
COMPONENTS=(tansu redis bqemulator)
export PATH="$HOME/.cargo/bin:$PATH"   # where `cargo install` puts tansu

# stdout is reserved for the `export` lines (fd 3); everything else, including the
# output of cargo/apt/pip, goes to stderr.
exec 3>&1 1>&2
log() { echo "stack: $*" >&2; }
die() { echo "stack: ERROR: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# ---------------------------------------------------------------- installation

install_tansu() {
    [[ "$(tansu --version 2>/dev/null || true)" == *" $TANSU_VERSION"* ]] && return 0
    # An install started by hand (or by another checkout) would race with ours.
    while command -v pgrep >/dev/null && pgrep -f "cargo install tansu" >/dev/null; do
        log "waiting for a running 'cargo install tansu' to finish"; sleep 5
    done
    [[ "$(tansu --version 2>/dev/null || true)" == *" $TANSU_VERSION"* ]] && return 0
    command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs), then re-run"
    log "installing tansu $TANSU_VERSION with cargo (about 10 minutes on 2 cores, once)"
    # dynostore is required for memory:// storage, libsql for sqlite://.
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql \
        || die "'cargo install tansu' failed (output above)"
}

install_apt_packages() {   # redis-server (+ redis-cli), curl, and stunnel4 (TLS before tansu in tests)
    local missing=()
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null || missing+=(redis-server)
    command -v curl >/dev/null || missing+=(curl)
    command -v stunnel4 >/dev/null || missing+=(stunnel4)
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]} with apt-get"
    local apt=(as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}")
    "${apt[@]}" || { as_root apt-get update && "${apt[@]}"; } \
        || die "could not install ${missing[*]} with apt-get; install them (redis-server, redis-cli, curl, stunnel4 on PATH) and re-run"
}

install_bqemulator() {
    local stamp="$BQ_VENV/.movielog-stack-installed"
    [ "$(cat "$stamp" 2>/dev/null)" = "${BQ_PACKAGES[*]}" ] || install_bqemulator_packages "$stamp"
    # Without it the Storage Write API deadlocks beside the REST API, and every
    # write copies the whole table (see the script).
    local patch="$REPO/deploy/bqemulator/patch_bqemulator.py" status=0
    "$BQ_VENV/bin/python" "$patch" || status=$?
    if [ "$status" = 3 ]; then   # patched by an older version of the script
        "$BQ_VENV/bin/pip" install --disable-pip-version-check -q --force-reinstall --no-deps "${BQ_PACKAGES[0]}" \
            && "$BQ_VENV/bin/python" "$patch" && status=0
    fi
    [ "$status" = 0 ] || die "patching bqemulator failed (output above); 'rm -rf $BQ_VENV' and retry"
}

install_bqemulator_packages() {
    local stamp=$1
    log "installing ${BQ_PACKAGES[*]} into $BQ_VENV (about 30 s, once)"
    mkdir -p "$BQ_HOME"
    [ -x "$BQ_VENV/bin/python" ] || python3 -m venv "$BQ_VENV" \
        || die "python3 -m venv failed (on Debian: apt-get install -y python3-venv)"
    "$BQ_VENV/bin/pip" install --disable-pip-version-check -q "${BQ_PACKAGES[@]}" \
        || die "pip install into $BQ_VENV failed (output above); 'rm -rf $BQ_VENV' and retry"
    # The emulator loads DuckDB's spatial extension at start and, offline, fails to
    # download it: register the copy shipped in the wheel, once, in the emulator's HOME.
    HOME="$BQ_HOME" "$BQ_VENV/bin/python" - <<'EOF' || die "registering DuckDB's spatial extension failed"
import duckdb, glob, os, duckdb_extension_spatial as pkg
ext = glob.glob(os.path.join(os.path.dirname(pkg.__file__), "extensions", "*", "spatial.duckdb_extension"))
if not ext:
    raise SystemExit("spatial.duckdb_extension not found in the duckdb-extension-spatial wheel")
duckdb.connect().execute(f"INSTALL '{ext[0]}'")
EOF
    echo "${BQ_PACKAGES[*]}" >"$stamp"
}

install_all() {
    mkdir -p "$CACHE_DIR"
    exec 8>"$CACHE_DIR/install.lock"   # one installer at a time per machine/cache
    flock 8
    install_tansu; install_apt_packages; install_bqemulator
    exec 8>&-
}

# ---------------------------------------------------------------- processes

pid_of() { cat "$STACK_DIR/$1.pid" 2>/dev/null || true; }
port_of() { cat "$STACK_DIR/$1.port" 2>/dev/null || true; }

is_running() {   # is_running NAME: the component's PID is alive and still its program
    local marker
    case $1 in tansu) marker="tansu broker" ;; redis) marker="redis-server" ;; *) marker="bqemulator" ;; esac
    is_program "$(pid_of "$1")" "$marker"
}

# spawn NAME CMD...: start CMD in the background in its own session (it outlives this
# script and the caller's Ctrl-C) with the run dir as working directory. fds 3/8/9 are
# closed so that `$(stack.sh up)` and our locks do not wait for the child.
spawn() {
    local name=$1; shift
    (cd "$STACK_DIR" && exec setsid "$@") </dev/null >>"$STACK_DIR/$name.log" 2>&1 3>&- 8>&- 9>&- &
    echo $! >"$STACK_DIR/$name.pid"
}

stop_component() {
    local name=$1 pid deadline
    pid=$(pid_of "$name")
    if [ -n "$pid" ] && is_running "$name"; then
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while is_running "$name" && ((SECONDS < deadline)); do sleep 0.1; done
        if is_running "$name"; then
            log "$name (pid $pid) still running 10 s after TERM; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            while is_running "$name"; do sleep 0.1; done
        fi
        log "stopped $name (pid $pid)"
    elif [ -n "$pid" ]; then
        log "$name (pid $pid) is not running (or that PID is now another program); removing its pid file"
    fi
    rm -f "$STACK_DIR/$name.pid"
    # The emulator's DuckDB spills to .tmp in its working directory; the
    # files are garbage once it exited, and large ones filled a 60 GB disk
    # here after many test tables and a benchmark.
    if [ "$name" = bqemulator ]; then rm -rf "$STACK_DIR/.tmp"; fi
}

stop_cluster() {
    [ -f "$STACK_DIR/redis-cluster/ports" ] || return 0
    "$REPO/scripts/redis-cluster.sh" down "$STACK_DIR/redis-cluster"
    rm -rf "$STACK_DIR/redis-cluster"
    log "stopped the Redis Cluster"
}

# Clusters the tests started under the run dir (PrivateCluster) outlive a test
# killed on a timeout: stop them with the stack.
stop_test_clusters() {
    local dir
    for dir in "$STACK_DIR"/cluster-*/; do
        [ -f "$dir/ports" ] && "$REPO/scripts/redis-cluster.sh" down "$dir"
    done
    return 0
}

stop_all() {
    local c
    for c in "${COMPONENTS[@]}"; do stop_component "$c"; done
    stop_cluster; stop_test_clusters
}

# Every node of the cluster is alive (when the stack has one).
cluster_is_up() {
    local port
    [ -f "$STACK_DIR/redis-cluster/ports" ] || return 1
    while read -r port; do redis_ping "$port" || return 1; done <"$STACK_DIR/redis-cluster/ports"
}

port_open() { (exec 4<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
redis_ping() { [ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]; }
bq_ready() {
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$1/readyz")" = 200 ] \
        && port_open "$2"
}

# wait_ready NAME CHECK ARGS...: poll CHECK until it succeeds; fail with the log tail
# when the process exits or READY_TIMEOUT passes.
wait_ready() {
    local name=$1 deadline=$((SECONDS + READY_TIMEOUT)) why=""; shift
    until "$@"; do
        still_starting "$(pid_of "$name")" || why="exited during start-up"
        ((SECONDS < deadline)) || why="not ready after ${READY_TIMEOUT} s"
        if [ -n "$why" ]; then
            log "$name $why; last lines of $STACK_DIR/$name.log:"
            tail -n 30 "$STACK_DIR/$name.log" >&2 || true
            die "$name failed to start ($why); fix the cause above, then run: $0 up"
        fi
        sleep 0.1
    done
    log "$name ready on port $(port_of "$name")"
}

# ---------------------------------------------------------------- components

start_tansu() {
    local storage=memory://tansu/
    # The sqlite path is relative to the broker's working directory (the run dir);
    # sqlite:///abs/path did not work.
    [ "$KAFKA_STORAGE" = sqlite ] && storage=sqlite://tansu.db
    echo "$1" >"$STACK_DIR/tansu.port"
    echo "$KAFKA_STORAGE" >"$STACK_DIR/tansu.storage"
    spawn tansu tansu broker --listener-url "tcp://127.0.0.1:$1" \
        --advertised-listener-url "tcp://127.0.0.1:$1" --storage-engine "$storage"
}

start_redis() {
    mkdir -p "$STACK_DIR/redis"
    echo "$1" >"$STACK_DIR/redis.port"
    # Not daemonized, so the PID we record is redis itself; AOF so restart-redis keeps data.
    spawn redis redis-server --port "$1" --bind 127.0.0.1 --appendonly yes \
        --dir "$STACK_DIR/redis" --save '' --daemonize no
}

# The patch the emulator runs with (its MARK line): an emulator started before
# the patch changed still runs the old code, so `up` restarts it.
bq_patch_mark() {
    grep -m1 '^MARK = ' "$REPO/deploy/bqemulator/patch_bqemulator.py"
}

start_bqemulator() {
    bq_patch_mark >"$STACK_DIR/bqemulator.patch"
    echo "$1" >"$STACK_DIR/bqemulator.port"
    echo "$2" >"$STACK_DIR/bqemulator.grpc.port"
    spawn bqemulator env HOME="$BQ_HOME" BQEMU_ENABLE_FORMAT_EXTENSIONS=false \
        "$BQ_VENV/bin/python" -m bqemulator start \
        --rest-port "$1" --grpc-port "$2" --project "$BQ_PROJECT"
}

create_topics() {
    local topic out
    for topic in "${TOPICS[@]}"; do
        # For an existing topic tansu exits 1 with "Topic with this name already
        # exists."; tolerate that so `up` stays idempotent.
        out=$(tansu topic create --broker "tcp://127.0.0.1:$1" --partitions 3 "$topic" 2>&1) \
            || [[ "$out" == *"already exists"* ]] || die "could not create topic $topic: $out"
    done
    # Check every topic exists with 3 partitions (sqlite storage keeps older topics).
    tansu topic list --broker "tcp://127.0.0.1:$1" | python3 -c '
import json, sys
have = {t["name"]: len(t["partitions"]) for t in json.load(sys.stdin)}
bad = ["%s (%d partitions)" % (t, have.get(t, 0)) for t in sys.argv[1:] if have.get(t) != 3]
sys.exit("topics without 3 partitions: " + ", ".join(bad) if bad else 0)' "${TOPICS[@]}" \
        || die "Kafka topics are not as expected (see above); with sqlite storage: $0 down && rm $STACK_DIR/tansu.db"
    log "topics ${TOPICS[*]} ready (3 partitions each)"
}

create_dataset() {
    local code body='{"datasetReference":{"projectId":"'$BQ_PROJECT'","datasetId":"'$BQ_DATASET'"}}'
    code=$(curl -s -o "$STACK_DIR/dataset.response" -w '%{http_code}' --max-time 10 -X POST \
        -H 'Content-Type: application/json' -d "$body" \
        "http://127.0.0.1:$1/bigquery/v2/projects/$BQ_PROJECT/datasets") || true
    case $code in
        200) log "created dataset $BQ_PROJECT.$BQ_DATASET" ;;
        409) log "dataset $BQ_PROJECT.$BQ_DATASET already exists" ;;
        *) die "creating dataset $BQ_DATASET failed (HTTP ${code:-none}): $(cat "$STACK_DIR/dataset.response" 2>/dev/null)" ;;
    esac
}

# ---------------------------------------------------------------- stack

stack_is_up() {
    local c
    for c in "${COMPONENTS[@]}"; do is_running "$c" || return 1; done
    [ -f "$STACK_DIR/env" ] && port_open "$(port_of tansu)" && redis_ping "$(port_of redis)" \
        && bq_ready "$(port_of bqemulator)" "$(port_of bqemulator.grpc)" \
        && { [ "$(cat "$STACK_DIR/redis.mode" 2>/dev/null)" = standalone ] || cluster_is_up; }
}

write_env() {   # write_env KAFKA REDIS BQ BQ_GRPC [CLUSTER_URLS]
    local redis_url="redis://127.0.0.1:$2"
    [ "$REDIS_MODE" = cluster ] && redis_url=$5
    {
        printf 'export %s=%q\n' KAFKA_BOOTSTRAP_SERVERS "127.0.0.1:$1" REDIS_URL "$redis_url" \
            BIGQUERY_ENDPOINT "http://127.0.0.1:$3" BIGQUERY_GRPC_ENDPOINT "http://127.0.0.1:$4" \
            BIGQUERY_PROJECT "$BQ_PROJECT" BIGQUERY_DATASET "$BQ_DATASET" STACK_DIR "$STACK_DIR"
        [ -z "${5:-}" ] || printf 'export %s=%q\n' REDIS_CLUSTER_URL "$5"
    } >"$STACK_DIR/env.tmp"
    mv "$STACK_DIR/env.tmp" "$STACK_DIR/env"
}

lock_stack() {   # one mutating stack.sh per run dir at a time
    mkdir -p "$STACK_DIR"
    exec 9>"$STACK_DIR/.lock"
    flock -n 9 || { log "another stack.sh is working on $STACK_DIR; waiting"; flock 9; }
}

cmd_up() {
    case $KAFKA_STORAGE in memory | sqlite) ;; *) die "STACK_KAFKA_STORAGE must be memory or sqlite, not '$KAFKA_STORAGE'" ;; esac
    case $REDIS_MODE in standalone | cluster | both) ;; *) die "STACK_REDIS must be standalone, cluster or both, not '$REDIS_MODE'" ;; esac
    install_all
    lock_stack
    if stack_is_up && [ "$(cat "$STACK_DIR/tansu.storage" 2>/dev/null)" = "$KAFKA_STORAGE" ] \
        && [ "$(cat "$STACK_DIR/redis.mode" 2>/dev/null)" = "$REDIS_MODE" ]; then
        if [ "$(cat "$STACK_DIR/bqemulator.patch" 2>/dev/null)" = "$(bq_patch_mark)" ]; then
            log "stack already up in $STACK_DIR"
            cat "$STACK_DIR/env" >&3
            return 0
        fi
        log "the emulator runs an older patch of deploy/bqemulator/patch_bqemulator.py: restarting the stack"
    fi
    stop_all   # a partial (or differently configured) stack: stop the survivors
    # If anything below fails, stop what we started rather than leave half a stack.
    trap 'log "up failed; stopping what was started"; stop_all' EXIT
    rm -f "$STACK_DIR"/*.log "$STACK_DIR"/*.port "$STACK_DIR/env"
    # The memory broker starts empty, so Redis starts empty too (its AOF is only for
    # restart-redis); with durable sqlite storage both keep their data.
    [ "$KAFKA_STORAGE" = sqlite ] || rm -rf "$STACK_DIR/redis"

    local ports
    mapfile -t ports < <(python3 "$REPO/scripts/free_port.py" 4)
    [ "${#ports[@]}" -eq 4 ] || die "could not pick free ports with scripts/free_port.py"
    log "starting tansu ($KAFKA_STORAGE) :${ports[0]}, redis :${ports[1]}, bqemulator :${ports[2]} (gRPC :${ports[3]}) in $STACK_DIR"
    start_tansu "${ports[0]}"
    start_redis "${ports[1]}"
    start_bqemulator "${ports[2]}" "${ports[3]}"
    wait_ready tansu port_open "${ports[0]}"
    wait_ready redis redis_ping "${ports[1]}"
    wait_ready bqemulator bq_ready "${ports[2]}" "${ports[3]}"
    local cluster_urls=""
    if [ "$REDIS_MODE" != standalone ]; then
        cluster_urls=$("$REPO/scripts/redis-cluster.sh" up "$STACK_DIR/redis-cluster")
    fi
    echo "$REDIS_MODE" >"$STACK_DIR/redis.mode"
    create_topics "${ports[0]}"
    create_dataset "${ports[2]}"
    write_env "${ports[@]}" $cluster_urls
    trap - EXIT
    cat "$STACK_DIR/env" >&3
}

cmd_down() {
    [ -d "$STACK_DIR" ] || { log "nothing to stop ($STACK_DIR does not exist)"; return 0; }
    lock_stack
    stop_all
    rm -f "$STACK_DIR/env"
}

cmd_env() {
    stack_is_up || die "the stack is not up in $STACK_DIR; start it with: $0 up"
    cat "$STACK_DIR/env" >&3
}

cmd_status() {
    local c all=0
    for c in "${COMPONENTS[@]}"; do
        if is_running "$c"; then
            echo "$c: up (pid $(pid_of "$c"), port $(port_of "$c"))" >&3
        else
            echo "$c: down" >&3; all=1
        fi
    done
    return $all
}

cmd_restart_redis() {
    lock_stack
    local port; port=$(port_of redis)
    [ -f "$STACK_DIR/env" ] && [ -n "$port" ] || die "the stack is not up in $STACK_DIR; start it with: $0 up"
    stop_component redis   # TERM: Redis flushes its AOF and exits
    start_redis "$port"
    wait_ready redis redis_ping "$port"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    env) cmd_env ;;
    status) cmd_status ;;
    restart-redis) cmd_restart_redis ;;
    install) install_all ;;
    *) die "usage: $0 up|down|env|status|restart-redis|install" ;;
esac
