#!/bin/sh
# The pair lab's serving host: the clients use its own address on eth1 (the VIPs' subnet
# only); two real servers, rs1 and rs2, live in network namespaces on macvlan links of eth1
# in the real servers' subnet, their gateway the directors' inner VIP (LVS-NAT). Each
# answers on 8080 with one line per line received: "<name> <line>", and serves passive FTP
# on 21 (vsftpd, anonymous, read-only: probe.bin) for the FTP service of the ftp class.
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
# the FTP real servers (lab-ftp@rsN): the passive replies name the real server's address,
# which the directors' ip_vs_ftp rewrites to the VIP
mkdir -p /srv/lab-ftp
[ -s /srv/lab-ftp/probe.bin ] || head -c 262144 /dev/urandom > /srv/lab-ftp/probe.bin
chmod 755 /srv/lab-ftp; chmod 644 /srv/lab-ftp/probe.bin
cat > /etc/vsftpd-lab.conf <<CONF
listen=YES
listen_ipv6=NO
background=NO
anonymous_enable=YES
local_enable=NO
write_enable=NO
anon_root=/srv/lab-ftp
pasv_enable=YES
pasv_min_port=30000
pasv_max_port=30100
seccomp_sandbox=NO
secure_chroot_dir=/var/run/vsftpd/empty
xferlog_enable=NO
connect_from_port_20=NO
CONF
cat > "/etc/systemd/system/lab-ftp@.service" <<UNIT
[Unit]
Description=pair lab FTP server %i
[Service]
ExecStart=/usr/bin/ip netns exec %i /usr/sbin/vsftpd /etc/vsftpd-lab.conf
UNIT
systemctl daemon-reload
systemctl start lab-rs@rs1 lab-rs@rs2 lab-ftp@rs1 lab-ftp@rs2
# the same-port reconnects of the measurements need a free choice of client ports
sysctl -qw net.ipv4.ip_local_port_range="20000 60999"
