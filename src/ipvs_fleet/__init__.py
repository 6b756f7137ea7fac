"""ipvs-fleet: roll the conn_reuse_old_conntrack IPVS fix out to a Linux fleet, safely."""

__version__ = "0.1.0"
