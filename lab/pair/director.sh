#!/bin/sh
# A director of the pair lab: keepalived.conf for this host, then keepalived started.
# VI_1 holds the VIP 10.0.9.100 (clients) and the real servers' gateway 10.0.10.1, the
# higher priority (lvs-a) master; a drain file lowers it (the operator's way to hand the
# VIPs over without a reload: echo -100 > /etc/keepalived/drain). The IPVS sync daemon
# runs on eth1 with sync id 51 (master on the VRRP master, backup on the other). The FTP
# service is the operator's, for the ftp class: /etc/keepalived/ftp.conf.lab, included once
# copied into /etc/keepalived/conf.d/ (with ip_vs_ftp loaded and keepalived reloaded).
set -eu
case "$LAB_HOST" in
    lvs-a) prio=150 inner=10.0.10.11/24 ;;
    lvs-b) prio=100 inner=10.0.10.12/24 ;;
    *) echo "director.sh: unknown director $LAB_HOST" >&2; exit 2 ;;
esac
ip addr replace "$inner" dev eth1
printf 'Address=%s\n' "$inner" >> /etc/systemd/network/30-lab-lan.network
sysctl -qw net.ipv4.ip_forward=1
# The real servers' own outbound traffic leaves masqueraded through the director's uplink,
# as on most LVS-NAT directors: the rule puts conntrack to work in the director's namespace,
# and with it the stock ~1 s drop of a same-port reconnect (IPVS alone tracks only FTP).
iptables -w -t nat -C POSTROUTING -s 10.0.10.0/24 -o eth0 -j MASQUERADE 2>/dev/null ||
    iptables -w -t nat -A POSTROUTING -s 10.0.10.0/24 -o eth0 -j MASQUERADE
# With conntrack at work and no conntrackd, the director a VIP comes back to holds entries
# whose TCP windows stopped when it left: measured, a failback reset 30 of 30 connections
# held through the VIP (with the knob at 0 and 1 alike; the failover itself, onto a director
# without entries, none). Liberal window tracking keeps them: 0 of 30.
sysctl -qw net.netfilter.nf_conntrack_tcp_be_liberal=1
echo 0 > /etc/keepalived/drain
mkdir -p /etc/keepalived/conf.d
# the VRRP instance in an included file, as many directors have it (keepalived.conf includes
# conf.d/*.conf): the rollout's VRRP read and the checks expand includes as keepalived does
cat > /etc/keepalived/conf.d/vrrp.conf <<CONF
vrrp_instance VI_1 {
    state BACKUP
    interface eth1
    virtual_router_id 51
    priority $prio
    advert_int 1
    track_file {
        drain weight 1
    }
    virtual_ipaddress {
        10.0.9.100/24 dev eth1
        10.0.10.1/24 dev eth1
    }
}
CONF
cat > /etc/keepalived/ftp.conf.lab <<CONF
virtual_server 10.0.9.100 21 {
    delay_loop 2
    lb_algo rr
    lb_kind NAT
    protocol TCP
    real_server 10.0.10.21 21 {
        weight 1
        TCP_CHECK {
            connect_timeout 1
            retry 0
        }
    }
    real_server 10.0.10.22 21 {
        weight 1
        TCP_CHECK {
            connect_timeout 1
            retry 0
        }
    }
}
CONF
cat > /etc/keepalived/keepalived.conf <<CONF
global_defs {
    router_id $LAB_HOST
    lvs_sync_daemon eth1 VI_1 id 51
}

vrrp_track_file drain {
    file /etc/keepalived/drain
}

virtual_server 10.0.9.100 80 {
    delay_loop 2
    lb_algo rr
    lb_kind NAT
    protocol TCP
    real_server 10.0.10.21 8080 {
        weight 1
        TCP_CHECK {
            connect_timeout 1
            retry 0
        }
    }
    real_server 10.0.10.22 8080 {
        weight 1
        TCP_CHECK {
            connect_timeout 1
            retry 0
        }
    }
}

# the probe's identity servers (probe.py serve, started by the tests): same-port reconnects
virtual_server 10.0.9.100 81 {
    delay_loop 2
    lb_algo rr
    lb_kind NAT
    protocol TCP
    real_server 10.0.10.21 8081 {
        weight 1
        TCP_CHECK {
            connect_timeout 1
            retry 0
        }
    }
    real_server 10.0.10.22 8081 {
        weight 1
        TCP_CHECK {
            connect_timeout 1
            retry 0
        }
    }
}

include /etc/keepalived/conf.d/*.conf
CONF
keepalived --config-test
systemctl enable --now keepalived
systemctl restart keepalived
