#!/bin/sh
# `make demo` cold, as a newcomer meets it: a fresh clone, empty caches (lab images, builder
# roots, pip's, uv's, matplotlib's: all of $XDG_CACHE_HOME), the clone's own lab dir and
# artifacts; prints the wall time from `make demo` to its summary. Needs root (make deps) and
# a quiet machine (no other VM, build or test).
#
#   bench/demo_cold.sh [REPO]     # REPO: what to clone (default: this checkout)
#
# The clone, its caches and the log stay in /var/tmp/ipvs-demo-cold.*; the lab is stopped
# at the end.
set -eu
src=${1:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}
work=$(mktemp -d /var/tmp/ipvs-demo-cold.XXXXXX)
git clone -q "$src" "$work/repo"
cd "$work/repo"
export IPVS_FLEET_CACHE="$work/cache" XDG_CACHE_HOME="$work/xdg-cache" PIP_NO_CACHE_DIR=1
start=$(date +%s)
rc=0
make demo > "$work/demo.log" 2>&1 || rc=$?
end=$(date +%s)
.venv/bin/ipvs-fleet lab down > /dev/null 2>&1 || true
echo "make demo, cold (fresh clone of $(git rev-parse --short HEAD), empty caches): exit $rc," \
     "$((end - start)) s wall; $(nproc) cores; log $work/demo.log"
sed -n '/==> Summary/,$p' "$work/demo.log"
exit $rc
