"""A simulated fleet of SSH hosts (network + mount namespaces) inside one lab VM; see fleet.py."""
