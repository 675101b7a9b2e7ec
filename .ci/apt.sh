# apt-get that waits for another apt/dpkg (unattended-upgrades, a second CI job) instead of failing at once.
# Sourced by .ci/docker-engine.sh, .ci/postgres.sh and backends/docker/build-images.sh, which define say().
#
# -o DPkg::Lock::Timeout makes apt wait for the dpkg locks (apt >= 1.9.11), but `apt-get update` takes the
# lists lock (/var/lib/apt/lists/lock) without waiting even with that option (seen with apt 2.6.1): a
# "Could not get lock" answer is retried every APT_LOCK_RETRY_SECONDS until APT_LOCK_WAIT seconds have passed.
APT_LOCK_WAIT="${APT_LOCK_WAIT:-600}"
APT_LOCK_RETRY_SECONDS="${APT_LOCK_RETRY_SECONDS:-5}"
apt_get() {
    local deadline=$((SECONDS + APT_LOCK_WAIT)) err rc
    err="$(mktemp)"
    while true; do
        rc=0
        apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT" "$@" 2>"$err" || rc=$?
        if [ "$rc" -eq 0 ]; then
            cat "$err" >&2
            rm -f "$err"
            return 0
        fi
        if grep -q 'Could not get lock' "$err" && [ "$SECONDS" -lt "$deadline" ]; then
            say "another apt holds its lock ($(grep -m1 -o 'held by process [0-9]* ([^)]*)' "$err" || true)); waiting"
            sleep "$APT_LOCK_RETRY_SECONDS"
            continue
        fi
        cat "$err" >&2
        rm -f "$err"
        return "$rc"
    done
}
