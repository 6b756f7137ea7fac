#!/bin/sh
# Managed by ipvs-fleet. Swap the loaded IPVS modules for the build that modprobe resolves
# now (updates/ before the stock tree), keeping the IPVS service table.
#
# Unloading ip_vs drops its service and connection tables, so the swap saves the table (with
# the timeouts and sync daemons), swaps the whole stack, restores it and checks that the same
# state is back. Connections in flight through IPVS are lost: run it on a drained host.
#
# The swap runs detached from the caller, in a session of its own (setsid) with its log
# under /var/lib/ipvs-fleet: an SSH session or a controller lost at any point never stops it
# half-way; the caller waits for the outcome and prints the log. The saved state lives in
# swap.pending/ until it is restored and compared; a swap that died anyway (killed, host
# crash) leaves it there, and the next run restores it first and never saves over it. The
# host lock (flock on /var/lib/ipvs-fleet/lock) lets one swap run at a time.
#
# Exit codes: 0 swapped and verified, or nothing to swap; 3 failed, the old modules and the
# table restored; 4 failed and the table not restored (swap.pending keeps it for the next
# run); 5 the host lock stayed held (the holder is named); 6 not finished in time (the swap
# goes on on the host; the next run waits for it). `--snapshot` prints the live state in the
# saved form and changes nothing.
set -u
state=/var/lib/ipvs-fleet
pending=$state/swap.pending
lock=$state/lock
worker=$state/ipvs-swap-worker.sh
: "${IPVS_FLEET_LOCK_WAIT:=300}"
: "${IPVS_FLEET_SWAP_TIMEOUT:=600}"

# The state a swap must bring back: the table, the timeouts, the sync daemons.
snapshot() {
    ipvsadm-save -n || return 1
    ipvsadm -L --timeout | sed -n 's/^Timeout (tcp tcpfin udp): */#timeouts /p'
    ipvsadm -L --daemon | sed 's/^/#daemon /'
}

if [ "${1:-}" = --snapshot ]; then
    # Read-only: the live state as a swap saves it, for the checks to compare with the
    # last swap's record (ipvsadm would load ip_vs if it were not loaded: it changes nothing).
    [ -d /sys/module/ip_vs ] || { echo "#ip_vs not loaded"; exit 0; }
    snapshot
    exit $?
fi

if [ "${1:-}" != --worker ]; then
    # The caller's side: start the worker detached, wait for its outcome. With
    # --recover-only the worker restores an unfinished swap's state and swaps nothing.
    mkdir -p "$state" || exit 3
    # A copy of our own (renamed into place: a worker still reading the old one keeps it).
    cp "$0" "$worker.tmp" && chmod 0755 "$worker.tmp" && mv -f "$worker.tmp" "$worker" || exit 3
    id=$(date +%Y%m%dT%H%M%S).$$
    log=$state/swap.$id.log
    rcf=$state/swap.$id.rc
    IPVS_FLEET_LOCK_WAIT=$IPVS_FLEET_LOCK_WAIT setsid sh "$worker" --worker "$id" "${1:-}" \
        </dev/null >"$log" 2>&1 &
    pid=$!
    echo "ipvs-swap: $id runs detached on the host (pid $pid, log $log)"
    waited=0
    while [ ! -f "$rcf" ]; do
        if ! kill -0 "$pid" 2>/dev/null && [ ! -f "$rcf" ]; then
            cat "$log"
            if [ -d "$pending" ]; then
                echo "ipvs-swap: the swap died on the host; its saved table is in $pending" \
                     "and the next run restores it first"
            else
                echo "ipvs-swap: the swap died on the host after it had finished its work"
            fi
            exit 4
        fi
        if [ "$waited" -ge "$IPVS_FLEET_SWAP_TIMEOUT" ]; then
            cat "$log"
            echo "ipvs-swap: not finished after ${waited} s; it goes on on the host" \
                 "(pid $pid, log $log) and the next run waits for it"
            exit 6
        fi
        sleep 1
        waited=$((waited + 1))
    done
    cat "$log"
    rc=$(cat "$rcf")
    # keep the newest 20 logs
    ls -1t "$state"/swap.*.log 2>/dev/null | tail -n +21 | while read -r f; do
        rm -f "$f" "${f%.log}.rc"
    done
    exit "${rc:-4}"
fi

# The worker.
id=$2
mode=${3:-}
say() { echo "ipvs-swap: $*"; }
finish() {
    echo "$1" > "$state/swap.$id.rc.tmp" && mv -f "$state/swap.$id.rc.tmp" "$state/swap.$id.rc"
    exit "$1"
}
fault_at() {
    # A test hook (the lab's fault-injection tests): die after this stage as a killed worker
    # would, leaving whatever the stage left.
    if [ -f "$state/fault-at" ] && [ "$(cat "$state/fault-at")" = "$1" ]; then
        rm -f "$state/fault-at"
        say "fault injected: killed after $1"
        kill -9 $$
    fi
}
stage() {
    echo "$1" > "$pending/stage"
    fault_at "$1"
}

exec 9>>"$lock"
if ! flock -w "$IPVS_FLEET_LOCK_WAIT" 9; then
    say "the host lock $lock stayed held for $IPVS_FLEET_LOCK_WAIT s by:" \
        "$(cat "$lock.holder" 2>/dev/null || echo 'an unknown process')"
    finish 5
fi
echo "ipvs-swap $id, pid $$, since $(date -Is)" > "$lock.holder"

restore() {
    ipvsadm -C || return 1
    grep -v '^#' "$pending/snapshot" | ipvsadm-restore || return 1
    # shellcheck disable=SC2046
    set -- $(sed -n 's/^#timeouts //p' "$pending/snapshot")
    if [ $# -eq 3 ]; then ipvsadm --set "$1" "$2" "$3" || return 1; fi
    # the daemons as saved (a recovery may find them still running)
    ipvsadm --stop-daemon master 2>/dev/null
    ipvsadm --stop-daemon backup 2>/dev/null
    sed -n 's/^#daemon //p' "$pending/snapshot" | while read -r role _ _ rest; do
        ifc=$(echo "$rest" | sed -n 's/.*mcast=\([^,)]*\).*/\1/p')
        sid=$(echo "$rest" | sed -n 's/.*syncid=\([0-9]*\).*/\1/p')
        ipvsadm --start-daemon "$role" --mcast-interface "$ifc" --syncid "${sid:-0}" || exit 1
    done || return 1
    snapshot > "$pending/restored" && cmp -s "$pending/snapshot" "$pending/restored"
}

# The saved state is restored and compared: keep it as the record, no longer pending.
settled() {
    rm -rf "$state/swap.last" && mv "$pending" "$state/swap.last" && sync
}

load_all() {
    modprobe ip_vs || return 1
    for m in $others; do modprobe "$m" || return 1; done
}

# The installed build failed to load: set it aside, load the stock modules, restore. Aside
# means outside /lib/modules: depmod indexes every directory there, updates/ first, so a
# copy left under it would still be what modprobe loads.
fall_back() {
    kr=$(uname -r)
    failed=$state/failed-set/$kr
    say "the installed modules did not load; falling back to the stock modules (the set goes to $failed)"
    # shellcheck disable=SC2086
    modprobe -r $others ip_vs 2>/dev/null
    if [ -d "/lib/modules/$kr/updates/ipvs-fleet" ]; then
        rm -rf "$failed" && mkdir -p "$state/failed-set"
        mv "/lib/modules/$kr/updates/ipvs-fleet" "$failed"
        sync
        depmod "$kr"
    fi
    if load_all && restore; then settled; finish 3; fi
    say "TABLE NOT RESTORED; the saved copy is in $pending"
    finish 4
}

# A module is current when it is the build modprobe resolves now (MODULE_VERSION carries the
# patch set; the stock build has none).
current() {
    [ "$(cat "/sys/module/$1/version" 2>/dev/null)" = "$(modinfo -F version "$1" 2>/dev/null)" ] \
        && [ "$(cat "/sys/module/$1/srcversion" 2>/dev/null)" \
             = "$(modinfo -F srcversion "$1" 2>/dev/null)" ]
}

# What still holds the stack once its table is cleared and its daemons stopped: a module
# other than ip_vs referenced beyond its dependent modules (an xt_ipvs rule, a scheduler or
# helper still bound to connections), or a sync daemon. (ip_vs itself counts a reference
# per registered scheduler, helper and persistence engine besides its dependents.)
busy() {
    for m in $loaded; do
        [ "$m" = ip_vs ] && continue
        r=$(cat "/sys/module/$m/refcnt" 2>/dev/null || echo 0)
        h=$(ls "/sys/module/$m/holders" 2>/dev/null | wc -l)
        [ "$r" -gt "$h" ] && printf ' %s (%s references)' "$m" "$((r - h))"
    done
    d=$(ipvsadm -L --daemon 2>/dev/null)
    [ -n "$d" ] && printf ' sync daemon (%s)' "$d"
    return 0
}

count() {
    echo "$(grep -c '^-A' "$1") services, $(grep -c '^-a' "$1") real servers"
}

if [ -d "$pending" ]; then
    say "an earlier swap did not finish (after: $(cat "$pending/stage" 2>/dev/null));" \
        "restoring its saved state ($(count "$pending/snapshot")) first"
    others=$(grep -vx ip_vs "$pending/modules" | tr '\n' ' ')
    loaded=$(awk '$1 ~ /^(ip_vs|xt_ipvs)/ {print $1}' /proc/modules)
    stale=""
    for m in $loaded; do current "$m" || stale="$stale $m"; done
    if [ -n "$stale" ] && [ "$mode" != --recover-only ]; then
        # The old build (or part of it) is still loaded: finish the unload first, so that
        # the modules loaded next are all of the installed build.
        ipvsadm -C
        ipvsadm --stop-daemon master 2>/dev/null
        ipvsadm --stop-daemon backup 2>/dev/null
        # shellcheck disable=SC2046
        modprobe -r $(echo "$loaded" | grep -vx ip_vs) ip_vs \
            || say "cannot unload what is left of the old modules:$(busy)"
    fi
    load_all || fall_back
    if ! restore; then
        say "TABLE NOT RESTORED; the saved copy stays in $pending:"
        [ -f "$pending/restored" ] && diff "$pending/snapshot" "$pending/restored"
        finish 4
    fi
    settled
    say "restored the saved state of the earlier swap"
fi
rm -rf "$pending.tmp"
if [ "$mode" = --recover-only ]; then
    say "nothing pending to restore; no swap asked for"
    finish 0
fi

loaded=$(awk '$1 ~ /^(ip_vs|xt_ipvs)/ {print $1}' /proc/modules)
if [ -z "$loaded" ]; then
    say "ip_vs is not loaded; nothing to swap"
    finish 0
fi
stale=""
for m in $loaded; do current "$m" || stale="$stale $m"; done
if [ -z "$stale" ]; then
    say "the loaded modules are the installed build; nothing to swap"
    finish 0
fi
others=$(echo "$loaded" | grep -vx ip_vs | tr '\n' ' ')

mkdir -p "$pending.tmp" && echo "$loaded" > "$pending.tmp/modules" \
    && snapshot > "$pending.tmp/snapshot" && sync && mv "$pending.tmp" "$pending" \
    || { say "cannot save the IPVS state"; rm -rf "$pending.tmp"; finish 3; }
say "saved $(count "$pending/snapshot")"
stage saved

ipvsadm -C
# sync daemon threads hold ip_vs (they are in the snapshot and come back with the restore)
ipvsadm --stop-daemon master 2>/dev/null
ipvsadm --stop-daemon backup 2>/dev/null
stage cleared
# Nothing may be unloaded while a module is still held (an xt_ipvs rule, a daemon that did
# not stop): a partial unload would leave modules of two builds to mix. Check first.
held=""
for _ in 1 2 3 4 5; do
    held=$(busy)
    [ -z "$held" ] && break
    sleep 1
done
if [ -n "$held" ]; then
    say "the IPVS stack is in use beyond its table:$held; keeping the old modules"
    if restore; then settled; finish 3; fi
    say "TABLE NOT RESTORED; the saved copy is in $pending"
    finish 4
fi
# shellcheck disable=SC2086
if ! modprobe -r $others ip_vs; then
    say "cannot unload the IPVS stack; reloading what is left of the old modules"
    if load_all && restore; then settled; finish 3; fi
    say "TABLE NOT RESTORED; the saved copy is in $pending"
    finish 4
fi
stage unloaded

load_all || fall_back
stage loaded

if ! restore; then
    say "the state read back differs from the saved one (saved copy in $pending):"
    [ -f "$pending/restored" ] && diff "$pending/snapshot" "$pending/restored"
    finish 4
fi
settled
say "swapped$stale and restored the table"
fault_at restored
finish 0
