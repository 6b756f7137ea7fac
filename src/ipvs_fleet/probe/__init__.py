"""The reuse probe: guest files run on a host's own python3, and the controller's side.

GUEST_FILES are copied together to one folder on a host and run there with its python3
(`python3 DIR/scenario.py run < plan.json`, `python3 DIR/probe.py connect ...`): standard
library only, siblings importing each other. Every copier (probe.harness.Guest.push,
compliance.latency) ships this one list.
"""

GUEST_FILES = (
    "probe.py",
    "cells.py",
    "rules.py",
    "kernel.py",
    "modules.py",
    "topology.py",
    "scenarios.py",
    "scenario.py",
)
