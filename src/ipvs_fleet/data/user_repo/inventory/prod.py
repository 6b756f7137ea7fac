"""This fleet's hosts (pyinfra inventory): `pyinfra inventory/prod.py deploy.py`,
`ipvs-fleet check inventory/prod.py`, `ipvs-fleet rollout inventory/prod.py`.

Every host needs `ipvs_host_class`, a class of policy/host_classes.yml; the rollout's first
wave is the `canary` group. SSH host keys are checked strictly, from any working directory
(the last line; a host's or group's own `ssh_strict_host_key_checking` wins).
"""

from ipvs_fleet.hostkeys import strict_host_keys

k8s_nodes = (
    ["node-1.example.net", "node-2.example.net", "node-3.example.net"],
    {"ipvs_host_class": "k8s_node"},
)
ftp_hosts = (["ftp-director.example.net"], {"ipvs_host_class": "ftp"})
canary = ["node-1.example.net"]

globals().update(strict_host_keys(globals()))  # keep last: it covers every host above
