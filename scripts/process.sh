# Process checks shared by stack.sh and redis-cluster.sh (sourced, not run).

# is_program PID MARKER: alive AND still our program. A stale pid file (e.g. after a
# reboot) must never make us signal an unrelated process that reused the PID. Zombies
# have an empty cmdline.
is_program() {
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null \
        && [[ "$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null)" == *"$2"* ]]
}

# still_starting PID: a child we just spawned has not exited. Not is_program: until
# the spawning subshell has exec'd, its command line is the script's, and under load
# the first check can come that early (a node was reported dead that way in CI).
still_starting() {
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null \
        && [ "$(sed -n 's/.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null)" != Z ]
}
