#!/bin/sh
# Managed by ipvs-fleet. Swap the loaded IPVS modules for the build that modprobe resolves
# now (updates/ before the stock tree), keeping the IPVS service table.
#
# Unloading ip_vs drops its service and connection tables, so this saves the table, swaps
# the whole stack, restores it and checks that the same services and real servers are
# back. Connections in flight through IPVS are lost: run it on a drained host.
#
# Exit codes: 0 swapped and verified (or nothing loaded); 3 failed, old modules and table
# restored; 4 failed and the table could not be restored (the message says what is left).
set -u
state=/var/lib/ipvs-fleet
mkdir -p "$state"
before="$state/table.before"
after="$state/table.after"
kr=$(uname -r)

loaded=$(awk '$1 ~ /^(ip_vs|xt_ipvs)/ {print $1}' /proc/modules)
if [ -z "$loaded" ]; then
    echo "ipvs-swap: ip_vs is not loaded; nothing to swap"
    exit 0
fi
others=$(echo "$loaded" | grep -vx ip_vs | tr '\n' ' ')
ipvsadm-save -n > "$before" || { echo "ipvs-swap: cannot save the IPVS table"; exit 3; }
echo "ipvs-swap: saved $(grep -c '^-A' "$before") services, $(grep -c '^-a' "$before") real servers"

load_all() {
    modprobe ip_vs || return 1
    for m in $others; do modprobe "$m" || return 1; done
}

restore_table() {
    ipvsadm -C && ipvsadm-restore < "$before" && ipvsadm-save -n > "$after" \
        && cmp -s "$before" "$after"
}

ipvsadm -C
# shellcheck disable=SC2086
if ! modprobe -r $others ip_vs; then
    echo "ipvs-swap: cannot unload the IPVS stack (in use?); keeping the old modules"
    load_all
    if restore_table; then exit 3; fi
    echo "ipvs-swap: TABLE NOT RESTORED; saved copy in $before"
    exit 4
fi

if ! load_all; then
    echo "ipvs-swap: the new modules did not load; falling back to the stock modules"
    for m in $loaded; do rmmod "$m" 2>/dev/null; done
    if [ -d "/lib/modules/$kr/updates/ipvs-fleet" ]; then
        rm -rf "/lib/modules/$kr/updates/ipvs-fleet.failed"
        mv "/lib/modules/$kr/updates/ipvs-fleet" "/lib/modules/$kr/updates/ipvs-fleet.failed"
        depmod "$kr"
    fi
    if load_all && restore_table; then exit 3; fi
    echo "ipvs-swap: TABLE NOT RESTORED; saved copy in $before"
    exit 4
fi

if ! restore_table; then
    echo "ipvs-swap: the table read back differs from the saved one:"
    diff "$before" "$after"
    exit 4
fi
echo "ipvs-swap: swapped $(echo "$loaded" | tr '\n' ' ')and restored the table"
exit 0
