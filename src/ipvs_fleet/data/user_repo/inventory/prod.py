"""This fleet's hosts (pyinfra inventory): `pyinfra inventory/prod.py deploy.py`,
`ipvs-fleet check inventory/prod.py`, `ipvs-fleet rollout inventory/prod.py`.

Every host needs `ipvs_host_class`, a class of policy/host_classes.yml; the rollout's first
wave is the `canary` group. SSH host keys are checked strictly (group_data/all.py).
"""

k8s_nodes = (
    ["node-1.example.net", "node-2.example.net", "node-3.example.net"],
    {"ipvs_host_class": "k8s_node"},
)
ftp_hosts = (["ftp-director.example.net"], {"ipvs_host_class": "ftp"})
canary = ["node-1.example.net"]
