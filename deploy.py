"""ipvs-fleet main deploy: `pyinfra inventory/<env>.py deploy.py`.

Every host is checked before any is changed (policy, artifact for its kernel, lockdown, the
reuse interlock); then each gets the patched IPVS modules, its class's sysctls (live and
persisted) and a verification. Run it again: it changes nothing.
"""

from ipvs_fleet.deploy.steps import rollout

rollout()
