#!/bin/sh
# The pair lab's serving host: the clients use its own address on eth1 (the VIPs' subnet
# only); two real servers, rs1 and rs2, live in network namespaces on macvlan links of eth1
# in the real servers' subnet, their gateway the directors' inner VIP (LVS-NAT). Each
# answers on 8080 with one line per line received: "<name> <line>".
set -eu
serve='
import socket, sys, threading
name = sys.argv[1]
def talk(c):
    with c, c.makefile("rwb", buffering=0) as f:
        for line in f:
            f.write(line)
s = socket.create_server(("", 8080), backlog=512)
while True:
    c, _ = s.accept()
    threading.Thread(target=talk, args=(c,), daemon=True).start()
'
mkdir -p /usr/local/lib/ipvs-fleet-lab
printf '%s\n' "$serve" > /usr/local/lib/ipvs-fleet-lab/rs.py
n=0
for rs in rs1 rs2; do
    n=$((n + 1))
    ip netns add "$rs" 2>/dev/null || true
    ip link add "$rs" link eth1 type macvlan mode bridge
    ip link set "$rs" netns "$rs"
    ip -n "$rs" link set lo up
    ip -n "$rs" addr add "10.0.10.2$n/24" dev "$rs"
    ip -n "$rs" link set "$rs" up
    ip -n "$rs" route add default via 10.0.10.1
    # a real server killed by a test comes back with: systemctl start lab-rs@rsN
    cat > "/etc/systemd/system/lab-rs@.service" <<UNIT
[Unit]
Description=pair lab real server %i
[Service]
ExecStart=/usr/bin/ip netns exec %i /usr/bin/python3 /usr/local/lib/ipvs-fleet-lab/rs.py %i
UNIT
    # the probe's identity server (tests copy probe.py there first): lab-probe@rsN
    cat > "/etc/systemd/system/lab-probe@.service" <<UNIT
[Unit]
Description=pair lab probe server %i
[Service]
ExecStart=/usr/bin/ip netns exec %i /usr/bin/python3 /usr/local/lib/ipvs-fleet-lab/probe.py serve --port 8081 --identity %i
UNIT
done
systemctl daemon-reload
systemctl start lab-rs@rs1 lab-rs@rs2
# the same-port reconnects of the measurements need a free choice of client ports
sysctl -qw net.ipv4.ip_local_port_range="20000 60999"
