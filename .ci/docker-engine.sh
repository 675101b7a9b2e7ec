#!/usr/bin/env bash
# Make a real Docker engine answer on the local socket, from scratch if need be.
#
# Idempotent: when the engine already answers this exits 0 at once; when a dockerd is already starting
# it only waits for it. Otherwise it installs Debian's docker.io (if dockerd is missing), starts dockerd
# in the background and waits, bounded, until `docker info` answers.
#
# No registry is reachable from this workplace: images are built locally by
# backends/docker/build-images.sh, never pulled.
#
# Environment:
#   DOCKERD_LOG        where dockerd logs (default /var/log/airflow-remote-ml-dockerd.log)
#   DOCKERD_WAIT       seconds to wait for each start attempt (default 60)
#   DOCKERD_FLAGS      extra flags; when set, only this one attempt is made (no fallbacks)
#
# Start attempts, in order, until one answers (the first that works is the one used):
#   1. defaults: overlay2 (dockerd's own choice) and the docker0 bridge with iptables NAT
#   2. --iptables=false --bridge=none: for sandboxes without netfilter; containers then run only
#      with network_mode="none" or "host"
#   3. as 2 plus --storage-driver=vfs: for file systems that cannot hold overlay upper dirs
set -euo pipefail

LOG="${DOCKERD_LOG:-/var/log/airflow-remote-ml-dockerd.log}"
WAIT="${DOCKERD_WAIT:-60}"

say() { printf '[docker-engine] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    say "must run as root (it installs packages and starts dockerd)"
    exit 1
fi

# True when the daemon answers on the default socket (or DOCKER_HOST). `timeout` keeps a wedged
# daemon from hanging CI.
engine_answers() {
    command -v docker >/dev/null 2>&1 || return 1
    timeout 10 docker info --format '{{.ServerVersion}}' >/dev/null 2>&1
}

dockerd_pid() {
    # Only the pid file dockerd itself writes: we never guess processes by name to stop them.
    local pidfile=/var/run/docker.pid
    [ -s "$pidfile" ] || return 1
    local pid
    pid="$(cat "$pidfile")"
    kill -0 "$pid" 2>/dev/null || return 1
    printf '%s\n' "$pid"
}

# apt_get: apt-get that waits for another apt's lock (one copy, shared by the CI scripts).
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

install_docker() {
    say "dockerd not found: installing Debian's docker.io"
    export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
    apt_get update -qq
    # iptables is a docker.io dependency already; listed so a minimal image surely has it.
    apt_get install -y -qq --no-install-recommends docker.io iptables ca-certificates >/dev/null
}

# dockerd's log is mostly gRPC chatter: show the errors of the latest attempt, then its last lines.
log_tail() {
    local attempt
    attempt="$(awk '/^==== / {n = 0} {line[n++] = $0} END {for (i = 0; i < n; i++) print line[i]}' "$LOG")"
    grep -E 'level=(error|fatal)|failed|Error' <<<"$attempt" | tail -n 10 >&2 || true
    tail -n 3 <<<"$attempt" >&2 || true
}

# Wait for the engine started with pid $1; returns 1 as soon as that dockerd dies.
wait_for_engine() {
    local pid="$1" deadline=$((SECONDS + WAIT))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if engine_answers; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        sleep 0.5
    done
    return 1
}

start_attempt() {
    local flags="$1" pid
    say "starting dockerd ${flags:-(default flags)}; log: $LOG"
    {
        printf '\n==== %s dockerd %s ====\n' "$(date -u +%FT%TZ)" "$flags"
    } >>"$LOG"
    # setsid + nohup: dockerd must outlive this script and the CI step that called it.
    # shellcheck disable=SC2086  # flags are deliberately word-split
    setsid nohup dockerd $flags </dev/null >>"$LOG" 2>&1 &
    # A plain background command: $! is setsid's pid, and setsid execs dockerd in place (a background
    # job is not a process-group leader without job control), so $! is dockerd's pid.
    pid=$!
    if wait_for_engine "$pid"; then
        say "engine answers (dockerd pid $pid, flags: ${flags:-default})"
        return 0
    fi
    if kill -0 "$pid" 2>/dev/null; then
        # Ours, by pid, and it did not come up in time: stop it before the next attempt.
        say "dockerd pid $pid did not answer within ${WAIT}s; stopping it"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    say "dockerd ${flags:-(default flags)} failed; its errors and last log lines:"
    log_tail
    return 1
}

main() {
    if engine_answers; then
        say "engine already answers: $(docker info --format '{{.ServerVersion}} {{.Driver}}')"
        return 0
    fi

    if ! command -v dockerd >/dev/null 2>&1; then
        install_docker
    fi
    command -v docker >/dev/null 2>&1 || { say "docker CLI missing after install"; return 1; }

    mkdir -p "$(dirname "$LOG")"
    touch "$LOG"
    # One log across runs, for diagnosis; kept from growing without bound on a long-lived machine.
    if [ "$(stat -c %s "$LOG")" -gt 10485760 ]; then
        : >"$LOG"
    fi

    local pid
    if pid="$(dockerd_pid)"; then
        # Someone (another CI step, a developer) already started it: wait for that one.
        say "dockerd pid $pid is already running; waiting for it to answer"
        if wait_for_engine "$pid"; then
            say "engine answers: $(docker info --format '{{.ServerVersion}} {{.Driver}}')"
            return 0
        fi
        say "the running dockerd (pid $pid) does not answer within ${WAIT}s; its errors and last log lines:"
        log_tail
        return 1
    fi

    local attempts=()
    if [ -n "${DOCKERD_FLAGS:-}" ]; then
        attempts=("$DOCKERD_FLAGS")
    else
        attempts=(
            ""
            "--iptables=false --bridge=none"
            "--iptables=false --bridge=none --storage-driver=vfs"
        )
    fi
    local flags
    for flags in "${attempts[@]}"; do
        if start_attempt "$flags"; then
            say "$(docker info --format 'server {{.ServerVersion}}, storage {{.Driver}}, cgroup {{.CgroupVersion}}')"
            return 0
        fi
    done
    say "ERROR: could not start a Docker engine; full log in $LOG"
    return 1
}

main "$@"
