#!/usr/bin/env bash
# A local Redis Cluster on loopback: 3 primaries and 3 replicas (one each), each a
# redis-server in DIR/<port>/ with its append-only file. Used by stack.sh
# (STACK_REDIS=cluster|both) and by the tests' PrivateCluster.
#
#   scripts/redis-cluster.sh up DIR      start 6 nodes on free ports, create the
#                                        cluster, wait until every slot is served;
#                                        prints the primaries' URLs, comma-separated
#   scripts/redis-cluster.sh down DIR    stop every node started in DIR
#   scripts/redis-cluster.sh start DIR PORT   start one stopped node again (same data)
#
# DIR/ports lists the nodes' ports (primaries first); DIR/<port>/pid each node's PID.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/process.sh
source "$REPO/scripts/process.sh"
READY_TIMEOUT="${STACK_READY_TIMEOUT:-60}"
log() { echo "redis-cluster: $*" >&2; }
die() { echo "redis-cluster: ERROR: $*" >&2; exit 1; }

start_node() {   # start_node DIR PORT: the node's bus port is in DIR/PORT/bus
    local dir=$1/$2
    mkdir -p "$dir"
    # Not daemonized (the PID is redis itself); its own session, so that it outlives
    # the caller's Ctrl-C; fds above 2 closed so `$(... up)` does not wait for it.
    (cd "$dir" && exec setsid redis-server --port "$2" --bind 127.0.0.1 \
        --cluster-enabled yes --cluster-port "$(cat "$dir/bus")" --cluster-config-file nodes.conf \
        --cluster-node-timeout 2000 \
        --appendonly yes --save '' --dir "$dir" --daemonize no) \
        </dev/null >>"$dir/redis.log" 2>&1 3>&- 8>&- 9>&- &
    echo $! >"$dir/pid"
    local deadline=$((SECONDS + READY_TIMEOUT))
    until [ "$(redis-cli -p "$2" ping 2>/dev/null)" = PONG ]; do
        still_starting "$(cat "$dir/pid" 2>/dev/null)" || { tail -n 20 "$dir/redis.log" >&2; die "node :$2 exited during start-up"; }
        ((SECONDS < deadline)) || die "node :$2 not answering after ${READY_TIMEOUT} s"
        sleep 0.05
    done
}

cluster_ok() {   # every node sees all slots served, and the replicas are in sync
    local port i=0
    for port in "$@"; do
        redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
        if ((i++ >= 3)); then
            redis-cli -p "$port" info replication 2>/dev/null | grep -q '^master_link_status:up' || return 1
        fi
    done
}

cmd_up() {
    local dir=$1 ports port nodes=()
    mkdir -p "$dir"
    # Each node's cluster bus gets a port of its own too (the default, port + 10000,
    # may be taken or beyond 65535).
    mapfile -t ports < <(python3 "$REPO/scripts/free_port.py" 12)
    [ "${#ports[@]}" -eq 12 ] || die "could not pick free ports with scripts/free_port.py"
    local buses=("${ports[@]:6}"); ports=("${ports[@]:0:6}")
    printf '%s\n' "${ports[@]}" >"$dir/ports"
    for i in "${!ports[@]}"; do
        mkdir -p "$dir/${ports[$i]}"; echo "${buses[$i]}" >"$dir/${ports[$i]}/bus"
        start_node "$dir" "${ports[$i]}"; nodes+=("127.0.0.1:${ports[$i]}")
    done
    # The first three become primaries, each of the others a replica of one.
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1 \
        || { cat "$dir/create.log" >&2; die "redis-cli --cluster create failed"; }
    local deadline=$((SECONDS + READY_TIMEOUT))
    until cluster_ok "${ports[@]}"; do
        ((SECONDS < deadline)) || die "the cluster is not ok after ${READY_TIMEOUT} s (see $dir/*/redis.log)"
        sleep 0.1
    done
    log "cluster ready: primaries :${ports[0]} :${ports[1]} :${ports[2]}, replicas :${ports[3]} :${ports[4]} :${ports[5]}"
    echo "redis://127.0.0.1:${ports[0]},redis://127.0.0.1:${ports[1]},redis://127.0.0.1:${ports[2]}"
}

cmd_down() {
    local dir=$1 port pid
    [ -f "$dir/ports" ] || return 0
    while read -r port; do
        pid=$(cat "$dir/$port/pid" 2>/dev/null || true)
        if is_program "$pid" redis-server; then
            kill -TERM "$pid" 2>/dev/null || true
            while is_program "$pid" redis-server; do sleep 0.05; done
        fi
        rm -f "$dir/$port/pid"
    done <"$dir/ports"
}

case "${1:-}" in
    up) [ $# -eq 2 ] || die "usage: $0 up DIR"; cmd_up "$2" ;;
    down) [ $# -eq 2 ] || die "usage: $0 down DIR"; cmd_down "$2" ;;
    start) [ $# -eq 3 ] || die "usage: $0 start DIR PORT"; start_node "$2" "$3" ;;
    *) die "usage: $0 up DIR | down DIR | start DIR PORT" ;;
esac
