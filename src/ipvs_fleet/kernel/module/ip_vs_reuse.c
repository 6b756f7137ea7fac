// SPDX-License-Identifier: GPL-2.0-only
/*
 * ip_vs_reuse: let a connection that reuses a port skip IPVS's first-SYN drop, from beside
 * the distro's own, unmodified ip_vs.
 *
 * Stock IPVS (5.9+, f0a5e4d7a594) reschedules a SYN that lands on an old IPVS connection
 * without a drop when the SYN's conntrack entry is new, and drops it (the client waits for
 * its SYN retransmission, about one second) when the entry is an old confirmed one that
 * still names the old real server (kubernetes#70747). This module hooks PREROUTING and
 * LOCAL_OUT right before conntrack (NF_IP_PRI_CONNTRACK - 1, after defrag and the raw
 * table), applies ip_vs_in's own reschedule test to the packet, and kills the stale
 * conntrack entry when IPVS would drop. Conntrack then makes a fresh entry, every table sees
 * the packet as NEW once, and stock IPVS takes its own no-drop path. Nothing is re-injected
 * and IPVS's tables are never touched, so loading and unloading this module lose no
 * connection.
 *
 * net.ipv4.vs.conn_reuse_old_conntrack, per network namespace:
 *   0 (default): stock behaviour, the hooks return at once;
 *   1: TCP SYN (no ACK/RST/FIN) whose IPVS connection would be rescheduled while its
 *      conntrack entry is confirmed: the entry is killed; UDP datagram whose IPVS connection
 *      points at a real server no longer available, with expire_nodest_conn=1: likewise.
 * Left to stock IPVS (its drop): a packet that already has a conntrack entry here (a raw
 * table CT target: zones, NOTRACK), an entry in a zone other than the default, an entry with
 * a helper or a master (ip_vs_ftp's control and data pairs), a controlling connection still
 * referenced by controlled ones (persistence templates, FTP), non-SYN TCP, SCTP, and a netns
 * where IPVS is not enabled.
 * /proc/net/ip_vs_reuse counts the entries killed per protocol in the netns.
 */

#include <linux/module.h>
#include <linux/version.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/sysctl.h>
#include <linux/tcp.h>
#include <net/ip_vs.h>
#include <net/net_namespace.h>
#include <net/netns/generic.h>
#include <net/netfilter/nf_conntrack.h>
#include <net/netfilter/nf_conntrack_core.h>
#include <net/netfilter/nf_conntrack_helper.h>
#include <net/netfilter/nf_conntrack_zones.h>

#ifndef CONFIG_IP_VS_NFCT
#error "ip_vs_reuse needs CONFIG_IP_VS_NFCT (IPVS with conntrack support)"
#endif

struct ip_vs_reuse_net {
	int enabled;		/* net.ipv4.vs.conn_reuse_old_conntrack */
	atomic64_t killed_tcp;
	atomic64_t killed_udp;
	struct ctl_table_header *sysctl_hdr;
};

static unsigned int ip_vs_reuse_net_id __read_mostly;

static const struct ctl_table ip_vs_reuse_vars[] = {
	{
		.procname	= "conn_reuse_old_conntrack",
		.maxlen		= sizeof(int),
		.mode		= 0644,
		.proc_handler	= proc_dointvec_minmax,
		.extra1		= SYSCTL_ZERO,
		.extra2		= SYSCTL_ONE,
	},
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 11, 0)
	{ }
#endif
};

static inline struct ip_vs_reuse_net *reuse_net(struct net *net)
{
	return net_generic(net, ip_vs_reuse_net_id);
}

/* Mirrors is_new_conn_expected() of ip_vs_core.c. */
static bool tcp_reuse_expected(const struct ip_vs_conn *cp, int conn_reuse_mode)
{
	if (cp->control)
		return false;
	return cp->state == IP_VS_TCP_S_TIME_WAIT ||
	       cp->state == IP_VS_TCP_S_CLOSE ||
	       ((conn_reuse_mode & 2) && cp->state == IP_VS_TCP_S_FIN_WAIT &&
		(cp->flags & IP_VS_CONN_F_NOOUTPUT));
}

/* Whether the real server of cp is still available (the flag moved between lines). */
static bool dest_available(const struct ip_vs_dest *dest)
{
#ifdef IP_VS_DEST_CF_AVAILABLE
	return dest->cflags & IP_VS_DEST_CF_AVAILABLE;
#else
	return dest->flags & IP_VS_DEST_F_AVAILABLE;
#endif
}

/*
 * ip_vs_in's reschedule decision for a new-connection packet (TCP SYN) on cp: true where it
 * reschedules, i.e. where stock IPVS drops the packet if its conntrack entry is confirmed.
 */
static bool tcp_would_reschedule(struct netns_ipvs *ipvs, const struct ip_vs_conn *cp)
{
	int mode = sysctl_conn_reuse_mode(ipvs);

	if (sysctl_expire_nodest_conn(ipvs) && cp->dest &&
	    !atomic_read(&cp->dest->weight))
		return true;
	/* A controlling connection still referenced is kept (its old entry: the drop). */
	if (mode && tcp_reuse_expected(cp, mode) && !atomic_read(&cp->n_control))
		return true;
	/* ip_vs_in's "destination not available" block, reached by any packet. */
	return cp->dest && !dest_available(cp->dest) && sysctl_expire_nodest_conn(ipvs);
}

static bool udp_would_reschedule(struct netns_ipvs *ipvs, const struct ip_vs_conn *cp)
{
	return cp->dest && !dest_available(cp->dest) && sysctl_expire_nodest_conn(ipvs);
}

/* Kill the confirmed default-zone entry of the packet's tuple; true if one was killed. */
static bool kill_stale_entry(struct net *net, struct sk_buff *skb, u16 l3num)
{
	struct nf_conntrack_tuple tuple;
	struct nf_conntrack_tuple_hash *h;
	struct nf_conn *ct;
	bool killed = false;

	if (!nf_ct_get_tuplepr(skb, skb_network_offset(skb), l3num, net, &tuple))
		return false;
	h = nf_conntrack_find_get(net, &nf_ct_zone_dflt, &tuple);
	if (!h)
		return false;
	ct = nf_ct_tuplehash_to_ctrack(h);
	if (NF_CT_DIRECTION(h) == IP_CT_DIR_ORIGINAL && nf_ct_is_confirmed(ct) &&
	    !ct->master && !nfct_help(ct))
		killed = nf_ct_kill(ct);
	nf_ct_put(ct);
	return killed;
}

static unsigned int ip_vs_reuse_hook(void *priv, struct sk_buff *skb,
				     const struct nf_hook_state *state)
{
	struct net *net = state->net;
	struct ip_vs_reuse_net *rn = reuse_net(net);
	struct netns_ipvs *ipvs;
	struct ip_vs_iphdr iph;
	struct ip_vs_conn *cp;
	bool resched;

	/* The common case costs one read: the knob is off. */
	if (likely(!READ_ONCE(rn->enabled)))
		return NF_ACCEPT;
	/* An entry (or a raw-table template: zone, NOTRACK) is already attached. */
	if (skb_nfct(skb))
		return NF_ACCEPT;
	ipvs = net_ipvs(net);
	if (!ipvs || !READ_ONCE(ipvs->enable))
		return NF_ACCEPT;
	ip_vs_fill_iph_skb(state->pf, skb, false, &iph);
	if (iph.fragoffs)
		return NF_ACCEPT;
	if (iph.protocol == IPPROTO_TCP) {
		struct tcphdr _th, *th;

		th = skb_header_pointer(skb, iph.len, sizeof(_th), &_th);
		if (!th || !th->syn || th->ack || th->rst || th->fin)
			return NF_ACCEPT;
	} else if (iph.protocol != IPPROTO_UDP || !sysctl_expire_nodest_conn(ipvs)) {
		return NF_ACCEPT;
	}

	cp = ip_vs_conn_in_get_proto(ipvs, state->pf, skb, &iph);
	if (!cp)
		return NF_ACCEPT;
	resched = (cp->flags & IP_VS_CONN_F_NFCT) &&
		  (iph.protocol == IPPROTO_TCP ? tcp_would_reschedule(ipvs, cp)
					       : udp_would_reschedule(ipvs, cp));
	__ip_vs_conn_put(cp);
	if (resched && kill_stale_entry(net, skb, state->pf))
		atomic64_inc(iph.protocol == IPPROTO_TCP ? &rn->killed_tcp : &rn->killed_udp);
	return NF_ACCEPT;
}

static const struct nf_hook_ops ip_vs_reuse_ops[] = {
	{
		.hook		= ip_vs_reuse_hook,
		.pf		= NFPROTO_IPV4,
		.hooknum	= NF_INET_PRE_ROUTING,
		.priority	= NF_IP_PRI_CONNTRACK - 1,
	},
	{
		.hook		= ip_vs_reuse_hook,
		.pf		= NFPROTO_IPV4,
		.hooknum	= NF_INET_LOCAL_OUT,
		.priority	= NF_IP_PRI_CONNTRACK - 1,
	},
#if IS_ENABLED(CONFIG_IP_VS_IPV6)
	{
		.hook		= ip_vs_reuse_hook,
		.pf		= NFPROTO_IPV6,
		.hooknum	= NF_INET_PRE_ROUTING,
		.priority	= NF_IP6_PRI_CONNTRACK - 1,
	},
	{
		.hook		= ip_vs_reuse_hook,
		.pf		= NFPROTO_IPV6,
		.hooknum	= NF_INET_LOCAL_OUT,
		.priority	= NF_IP6_PRI_CONNTRACK - 1,
	},
#endif
};

static int ip_vs_reuse_show(struct seq_file *seq, void *v)
{
	struct ip_vs_reuse_net *rn = reuse_net(seq_file_single_net(seq));

	seq_printf(seq, "enabled %d\nkilled_tcp %lld\nkilled_udp %lld\n",
		   READ_ONCE(rn->enabled), (long long)atomic64_read(&rn->killed_tcp),
		   (long long)atomic64_read(&rn->killed_udp));
	return 0;
}

static int __net_init ip_vs_reuse_net_init(struct net *net)
{
	struct ip_vs_reuse_net *rn = reuse_net(net);
	struct ctl_table *tbl;
	int ret = -ENOMEM;

#ifdef IP_VS_REUSE_TEST_BAD_DEFAULT
	rn->enabled = 1;	/* test-only variant: the sysctl-table check must catch it */
#else
	rn->enabled = 0;
#endif
	atomic64_set(&rn->killed_tcp, 0);
	atomic64_set(&rn->killed_udp, 0);
	tbl = kmemdup(ip_vs_reuse_vars, sizeof(ip_vs_reuse_vars), GFP_KERNEL);
	if (!tbl)
		return ret;
	tbl[0].data = &rn->enabled;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 5, 0)
	rn->sysctl_hdr = register_net_sysctl_sz(net, "net/ipv4/vs", tbl,
						ARRAY_SIZE(ip_vs_reuse_vars));
#else
	rn->sysctl_hdr = register_net_sysctl(net, "net/ipv4/vs", tbl);
#endif
	if (!rn->sysctl_hdr)
		goto free_tbl;
	if (!proc_create_net_single("ip_vs_reuse", 0444, net->proc_net,
				    ip_vs_reuse_show, NULL))
		goto unregister;
	ret = nf_register_net_hooks(net, ip_vs_reuse_ops, ARRAY_SIZE(ip_vs_reuse_ops));
	if (ret)
		goto remove_proc;
	return 0;

remove_proc:
	remove_proc_entry("ip_vs_reuse", net->proc_net);
unregister:
	unregister_net_sysctl_table(rn->sysctl_hdr);
free_tbl:
	kfree(tbl);
	return ret;
}

static void __net_exit ip_vs_reuse_net_exit(struct net *net)
{
	struct ip_vs_reuse_net *rn = reuse_net(net);
	const struct ctl_table *tbl = rn->sysctl_hdr->ctl_table_arg;

	nf_unregister_net_hooks(net, ip_vs_reuse_ops, ARRAY_SIZE(ip_vs_reuse_ops));
	remove_proc_entry("ip_vs_reuse", net->proc_net);
	unregister_net_sysctl_table(rn->sysctl_hdr);
	kfree(tbl);
}

static struct pernet_operations ip_vs_reuse_net_ops = {
	.init = ip_vs_reuse_net_init,
	.exit = ip_vs_reuse_net_exit,
	.id   = &ip_vs_reuse_net_id,
	.size = sizeof(struct ip_vs_reuse_net),
};

static int __init ip_vs_reuse_init(void)
{
	return register_pernet_subsys(&ip_vs_reuse_net_ops);
}

static void __exit ip_vs_reuse_exit(void)
{
	unregister_pernet_subsys(&ip_vs_reuse_net_ops);
}

module_init(ip_vs_reuse_init);
module_exit(ip_vs_reuse_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("IPVS: kill a reused connection's stale conntrack entry before conntrack");
#ifndef IP_VS_REUSE_TEST_NO_DESIGN	/* test-only variant: declares no reuse design */
MODULE_INFO(ipvs_fleet_reuse, "prekill");
#endif
#include "ipvs_fleet_id.h"
