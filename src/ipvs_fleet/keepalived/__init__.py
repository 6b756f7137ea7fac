"""keepalived as the fleet checks see it: its configuration (`config`), what the host runs
(`live`: the IPVS table, the sync daemons, the VRRP roles) and the two compared (`compare`)."""
