#!/bin/sh
# Managed by ipvs-fleet. Build mode (ipvs_install: dkms): build the fix module ip_vs_reuse on
# this host with DKMS, from its own linux-headers, then install that build under
# /lib/modules/<release>/updates/ipvs-fleet exactly as an uploaded artifact is installed
# (checked, exchanged in whole, depmod). The live modules are not touched here: activation
# is the deploy's next step.
#
#   ipvs-dkms-install.sh TREE.tar.gz SHA256 SET_ID KERNEL_RELEASE MODULE_COUNT
#
# Exit codes: 0 installed; 1 the archive does not match its sha256; 2 the build failed (the
# end of dkms's make.log is printed); 3 the build is not the expected set. On any failure
# the installed set (if any) is left as it was.
set -eu
tarball=$1 sha=$2 sid=$3 kr=$4 count=$5
pkg=ipvs-fleet
dest=/lib/modules/$kr/updates/$pkg

echo "$sha  $tarball" | sha256sum -c --quiet || {
    echo "ipvs-dkms: $tarball does not match sha256 $sha" >&2
    exit 1
}
# One ipvs-fleet version registered with dkms at a time, built from a fresh tree.
for d in /var/lib/dkms/"$pkg"/*/; do
    [ -d "$d" ] || continue
    v=$(basename "$d")
    case $v in original_module | kernel-*) continue ;; esac
    dkms remove -m $pkg -v "$v" --all >/dev/null 2>&1 || true
    rm -rf "/var/lib/dkms/$pkg/$v" "/usr/src/$pkg-$v"
done
tar -xzf "$tarball" -C /usr/src
dkms add -m $pkg -v "$sid" >/dev/null
# the log under root's own state folder, never a fixed path in /tmp
log=/var/lib/ipvs-fleet/dkms-build.log
mkdir -p /var/lib/ipvs-fleet
if ! dkms build -m $pkg -v "$sid" -k "$kr" >"$log" 2>&1; then
    cat "$log" >&2
    for log in /var/lib/dkms/"$pkg"/"$sid"/build/make.log \
        /var/lib/dkms/"$pkg"/"$sid"/"$kr"/*/log/make.log; do
        [ -f "$log" ] && tail -n 40 "$log" >&2
    done
    echo "ipvs-dkms: dkms build of $pkg/$sid for $kr failed" >&2
    exit 2
fi

# dkms keeps its build (compressed like the kernel's own modules, if they are); the set is
# installed uncompressed, as artifacts are.
built=$(ls -d /var/lib/dkms/$pkg/"$sid"/"$kr"/*/module)
rm -rf "$dest.new"
mkdir -p "$dest.new"
for f in "$built"/*; do
    b=$(basename "$f")
    case $b in
        *.ko) cp "$f" "$dest.new/$b" ;;
        *.ko.xz) xz -dc "$f" >"$dest.new/${b%.xz}" ;;
        *.ko.zst) zstd -qdc "$f" >"$dest.new/${b%.zst}" ;;
        *.ko.gz) gzip -dc "$f" >"$dest.new/${b%.gz}" ;;
    esac
done
n=$(find "$dest.new" -mindepth 1 -maxdepth 1 | wc -l)
if [ "$n" -ne "$count" ]; then
    echo "ipvs-dkms: the build has $n modules, the set has $count" >&2
    rm -rf "$dest.new"
    exit 3
fi
for f in "$dest.new"/*.ko; do
    got=$(modinfo -F ipvs_fleet "$f")
    if [ "$got" != "$sid" ]; then
        echo "ipvs-dkms: $(basename "$f") is set '$got', expected $sid" >&2
        rm -rf "$dest.new"
        exit 3
    fi
done
sync -f "$dest.new"
# as operations.swap_in: exchanged with the live set, never a moment without one
if [ -d "$dest" ]; then
    perl -e 'my %nr = (x86_64 => 316, aarch64 => 276); my $n = $nr{$ARGV[2]} or die "no renameat2 number for $ARGV[2]\n"; syscall($n, -100, $ARGV[0], -100, $ARGV[1], 2) == 0 or die "renameat2: $!\n"' "$dest.new" "$dest" "$(uname -m)" || {
        echo "ipvs-fleet: no atomic exchange here: two renames" >&2
        rm -rf "$dest.old" && mv "$dest" "$dest.old" && mv "$dest.new" "$dest" && mv "$dest.old" "$dest.new"
    }
    rm -rf "$dest.new"
else
    mv "$dest.new" "$dest"
fi
rm -rf "$dest.old" "$tarball"
depmod "$kr"
sync -f "$dest"
echo "ipvs-dkms: built and installed $n modules of set $sid for $kr"
