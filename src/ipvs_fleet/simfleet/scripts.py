"""Shell run inside the simulated-fleet VM (as root): make the hosts, start/stop their sshd."""

from ipvs_fleet.paths import STATE_DIR, UPDATES_SUBDIR


def _fill(script: str) -> str:
    """The script with ipvs-fleet's host paths (@STATE_DIR@, @UPDATES_SUBDIR@) filled in."""
    return script.replace("@STATE_DIR@", STATE_DIR).replace("@UPDATES_SUBDIR@", UPDATES_SUBDIR)


# setup.sh N: N simulated hosts sim-01..sim-NN, each a network namespace on bridge br-sim
# (10.77.1.<i>/16) with its own sshd, reached from the VM's eth0 port 22000+i (DNAT), and its
# own mount namespace (see HOST_SH). Idempotent per host: an existing namespace is kept.
SETUP_SH = _fill(r"""#!/bin/sh
set -eu
N=$1
S=/srv/simfleet
mkdir -p $S/hosts @STATE_DIR@ /var/lib/simhost /run/netns
sysctl -qw net.ipv4.ip_forward=1
ip link show br-sim >/dev/null 2>&1 || {
  ip link add br-sim type bridge
  ip addr add 10.77.0.1/16 dev br-sim
  ip link set br-sim up
}
# The evidence: every depmod (the install and remove steps end with one) is logged per host.
cat > /usr/local/sbin/depmod <<'EOF'
#!/bin/sh
kr=${1:-$(uname -r)}
if [ -d "/lib/modules/$kr/@UPDATES_SUBDIR@" ]; then what=install; else what=remove; fi
echo "$(date +%s.%N) depmod $what $*" >> /var/lib/simhost/events.log
exec /usr/sbin/depmod "$@"
EOF
chmod 755 /usr/local/sbin/depmod
# The hosts' module tree: only the IPVS modules and what they depend on (from the VM's stock
# tree), with its own depmod indexes. A host's install then runs depmod over a few dozen
# modules, not the 1100 of the full tree (25 s of the shared VM's CPU per host).
K=$(uname -r)
T=$S/modtree/lib/modules/$K
if [ ! -f $T/.complete ]; then
  rm -rf $S/modtree
  mkdir -p $T
  M=$(readlink -f /lib/modules/$K)
  for m in $(find $M/kernel -name 'ip_vs*.ko*' -o -name 'xt_ipvs.ko*'); do
    /usr/sbin/modprobe --show-depends -S $K "$(basename $m | sed 's/\.ko.*//')"
  done | awk '$1 == "insmod" { print $2 }' | sort -u | while read -r f; do
    rel=${f#/lib/modules/$K/}; rel=${rel#$M/}
    case $rel in /*) echo "modtree: unexpected module path $f" >&2; exit 1;; esac
    mkdir -p "$T/$(dirname $rel)"
    cp -p "$f" "$T/$rel"
    echo "$rel" >> $T/modules.order
  done
  cp -p $M/modules.builtin $M/modules.builtin.modinfo $T/
  /usr/sbin/depmod -b $S/modtree $K
  touch $T/.complete
fi
# One host: its namespace, link, DNAT port and sshd (kept if it exists).
make_host() {
  i=$1
  name=$(printf 'sim-%02d' $i)
  d=$S/hosts/$name
  if ! [ -e /run/netns/$name ]; then
    mkdir -p $d/etc.upper/ssh $d/etc.work $d/mod.upper $d/mod.work $d/varlib $d/state
    [ -f $d/etc.upper/ssh/ssh_host_ed25519_key ] || \
      ssh-keygen -q -t ed25519 -N '' -C $name -f $d/etc.upper/ssh/ssh_host_ed25519_key
    echo $name > $d/etc.upper/hostname
    ip netns add $name
    ip link add v$name type veth peer name eth0 netns $name
    ip link set v$name master br-sim up
    ip -n $name addr add 10.77.1.$i/16 dev eth0
    ip -n $name link set lo up
    ip -n $name link set eth0 up
    iptables -w -t nat -A PREROUTING -i eth0 -p tcp --dport $((22000 + i)) \
      -j DNAT --to-destination 10.77.1.$i:22
  fi
  $S/host-up.sh $name
  touch $d/state/made
}
# Hosts are made 10 at a time: one by one, 50 take minutes of the VM's mostly idle CPU.
# (Each runs in a background subshell, where `set -e` stops it at its first failure.)
rm -f $S/hosts/*/state/made
i=1
while [ $i -le $N ]; do
  make_host $i &
  [ $((i % 10)) -ne 0 ] || wait
  i=$((i + 1))
done
wait
bad=
i=1
while [ $i -le $N ]; do
  name=$(printf 'sim-%02d' $i)
  [ -f $S/hosts/$name/state/made ] || bad="$bad $name"
  i=$((i + 1))
done
if [ -n "$bad" ]; then
  echo "simfleet: hosts not made:$bad" >&2
  exit 1
fi
""")

# host-up.sh NAME: start the host's sshd (unless running) inside its netns and a private
# mount + UTS namespace.
HOST_UP_SH = r"""#!/bin/sh
set -eu
name=$1
S=/srv/simfleet
d=$S/hosts/$name
if [ -n "$(ip netns pids $name 2>/dev/null)" ]; then exit 0; fi
ip -n $name link set eth0 up
# A link that was down lost its routes (host-down.sh).
ip -n $name route replace default via 10.77.0.1
setsid ip netns exec $name unshare --mount --uts --propagation private $S/host.sh $name \
  </dev/null >>$d/state/sshd.log 2>&1 &
for _ in $(seq 100); do
  ip netns exec $name ss -Hltn 'sport = :22' | grep -q . && exit 0
  sleep 0.1
done
echo "$name: sshd did not start: $(tail -3 $d/state/sshd.log)" >&2
exit 1
"""

# host.sh NAME: inside the host's namespaces. Private /etc (overlay), /lib/modules/<kr>
# (overlay over the IPVS-only tree: depmod and the installed modules stay per host),
# /var/lib/ipvs-fleet, /tmp and /run/netns; then sshd in the foreground.
HOST_SH = _fill(r"""#!/bin/sh
set -eu
name=$1
d=/srv/simfleet/hosts/$name
M=$(readlink -f /lib/modules/$(uname -r))
T=/srv/simfleet/modtree/lib/modules/$(uname -r)
hostname $name
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run/netns
mount -t overlay overlay -o lowerdir=/etc,upperdir=$d/etc.upper,workdir=$d/etc.work /etc
mount -t overlay overlay -o lowerdir=$T,upperdir=$d/mod.upper,workdir=$d/mod.work $M
mount --bind $d/varlib @STATE_DIR@
mount --bind $d/state /var/lib/simhost
exec /usr/sbin/sshd -D -e -o PidFile=none -o ListenAddress=0.0.0.0 \
  -o HostKey=/etc/ssh/ssh_host_ed25519_key -o MaxStartups=100:30:200
""")

# host-down.sh NAME: the host crashes: every process in its netns is killed (its TCP
# connections are reset), so it is unreachable until host-up.sh.
HOST_DOWN_SH = r"""#!/bin/sh
name=$1
pids=$(ip netns pids $name)
[ -z "$pids" ] || kill -9 $pids
ip -n $name link set eth0 down
"""
