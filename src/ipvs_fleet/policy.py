"""Host-class policy: what each class of host wants from IPVS, validated before any host is touched.

The policy file (the collection role's `policy/host_classes.yml`, packaged:
`resources.policy_file()`; `--policy` or $IPVS_FLEET_POLICY names the user's) is the one
source that the pyinfra deploy, the Ansible role and the checks read. Host data may
override a class per host:

- `ipvs_host_class`: the class name (required)
- `ipvs_sysctls`: {key: value} merged over the class's sysctls
- `ipvs_latency_budget`: {key: value} merged over the class's budget
- `ipvs_activation`: reload | reboot | next-boot, over the class's activation
- `ipvs_allow_reuse_with`: a stated reason to allow knob=1 on a host that uses FTP or connmark
- `ipvs_install`: artifact (install the controller-built fix module) | dkms (build it on the
  host from its own linux-headers, with the DKMS tree), over the class's install
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipvs_fleet.errors import ConfigError, load_yaml_file
from ipvs_fleet.resources import policy_file

KNOB = "conn_reuse_old_conntrack"
BUDGET_KEYS = {"slow_ms", "max_slow", "max_errors", "p99_ms"}
HOST_KEYS = {
    "ipvs_host_class",
    "ipvs_sysctls",
    "ipvs_latency_budget",
    "ipvs_activation",
    "ipvs_allow_reuse_with",
    "ipvs_install",
    "ipvs_pre_activate",
    "ipvs_post_activate",
    "ipvs_lock_wait_seconds",
}
# Descriptive host data that inventories may carry (the lab records what a VM boots).
INFO_KEYS = {"ipvs_release", "ipvs_kernel_release", "ipvs_kernel_version"}
ACTIVATIONS = ("reload", "reboot", "next-boot")
INSTALLS = ("artifact", "dkms")
MODULE_RE = r"(ip_vs|ip_vs_[a-z0-9_]+|xt_ipvs)"
HOOK_TIMEOUT_S = 300  # default seconds each drain hook may run
# Default seconds a step waits for the host lock another controller's step holds.
LOCK_WAIT_S = 300


@dataclass(frozen=True)
class HostSettings:
    """What one host should look like, after class and host overrides.

    >>> HostSettings("k8s-canary", "k8s_node", {"conn_reuse_old_conntrack": 1, ...}, {...})
    """

    name: str
    host_class: str
    sysctls: dict[str, int]
    latency_budget: dict[str, int | None]
    activation: str = "reload"
    modules: tuple[str, ...] = ("ip_vs",)
    allow_reuse_with: str | None = None
    install: str = "artifact"
    # Drain hooks: shell commands run on the host, in order, right before and after an
    # activation that changes something (the fix module loaded, reloaded or unloaded, or the
    # host rebooted; e.g. `kubectl drain`, a keepalived priority).
    pre_activate: tuple[str, ...] = ()
    post_activate: tuple[str, ...] = ()
    hook_timeout: int = HOOK_TIMEOUT_S
    # How long install, configure, removal and activation wait for the host lock (another
    # controller's step holds it) before they fail naming the holder.
    lock_wait: int = LOCK_WAIT_S

    @property
    def knob(self) -> int | None:
        return self.sysctls.get(KNOB)

    def sysctl_lines(self) -> list[str]:
        """`net.ipv4.vs.<key> = <value>` lines, sorted, as the sysctl.d file holds them."""
        return [f"net.ipv4.vs.{k} = {v}" for k, v in sorted(self.sysctls.items())]


@dataclass
class Policy:
    """The parsed policy file."""

    path: Path
    classes: dict[str, dict[str, Any]]
    schema: dict[str, dict[str, int]]
    _cache: dict[str, HostSettings] = field(default_factory=dict, repr=False)

    def check_sysctls(self, values: Mapping[str, Any], where: str) -> dict[str, int]:
        """Validated {key: int} or ConfigError naming `where`, the key and the range."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where}: must be a mapping of net.ipv4.vs keys to integers")
        out: dict[str, int] = {}
        for key, value in values.items():
            rng = self.schema.get(str(key))
            if rng is None:
                known = ", ".join(sorted(self.schema))
                raise ConfigError(f"{where}: unknown IPVS sysctl {key!r} (known: {known})")
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
            if not rng["min"] <= value <= rng["max"]:
                raise ConfigError(
                    f"{where}: {key}={value} is out of range {rng['min']}..{rng['max']}"
                )
            out[str(key)] = value
        return out

    def check_budget(self, values: Mapping[str, Any], where: str) -> dict[str, int | None]:
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where}: must be a mapping")
        out: dict[str, int | None] = {}
        for key, value in values.items():
            if key not in BUDGET_KEYS:
                raise ConfigError(
                    f"{where}: unknown budget key {key!r} (known: {', '.join(sorted(BUDGET_KEYS))})"
                )
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ConfigError(f"{where}: {key} must be a non-negative integer or null")
            out[str(key)] = value
        return out

    def for_host(self, name: str, data: Mapping[str, Any]) -> HostSettings:
        """The settings for one host, or ConfigError naming the host, key and file."""
        where = f"host {name}"
        unknown = {
            k for k in data if str(k).startswith("ipvs_") and k not in HOST_KEYS | INFO_KEYS
        }
        if unknown:
            raise ConfigError(
                f"{where}: unknown host data {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(HOST_KEYS))})"
            )
        cls = data.get("ipvs_host_class")
        if cls is None:
            raise ConfigError(f"{where}: no ipvs_host_class in its host or group data")
        if cls not in self.classes:
            raise ConfigError(
                f"{where}: unknown host class {cls!r} (classes in {self.path}: "
                f"{', '.join(sorted(self.classes))})"
            )
        base = self.classes[cls]
        sysctls = dict(base["sysctls"])
        sysctls.update(self.check_sysctls(data.get("ipvs_sysctls") or {}, f"{where}: ipvs_sysctls"))
        budget = dict(base["latency_budget"])
        overrides = data.get("ipvs_latency_budget") or {}
        budget.update(self.check_budget(overrides, f"{where}: ipvs_latency_budget"))
        reason = data.get("ipvs_allow_reuse_with")
        if reason is not None and (not isinstance(reason, str) or not reason.strip()):
            raise ConfigError(f"{where}: ipvs_allow_reuse_with must be a non-empty reason")
        activation = data.get("ipvs_activation", base["activation"])
        check_activation(activation, f"{where}: ipvs_activation")
        install = data.get("ipvs_install", base["install"])
        check_install(install, f"{where}: ipvs_install")
        hooks = {
            k: check_hooks(data[f"ipvs_{k}"], f"{where}: ipvs_{k}")
            if f"ipvs_{k}" in data else base[k]
            for k in ("pre_activate", "post_activate")
        }  # fmt: skip
        lock_wait = data.get("ipvs_lock_wait_seconds", base["lock_wait"])
        check_timeout(lock_wait, f"{where}: ipvs_lock_wait_seconds")
        return HostSettings(
            name, cls, sysctls, budget, activation, base["modules"], reason, install,
            hooks["pre_activate"], hooks["post_activate"], base["hook_timeout"], lock_wait,
        )  # fmt: skip


def check_activation(value: Any, where: str) -> str:
    if value not in ACTIVATIONS:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(ACTIVATIONS)}")
    return str(value)


def check_install(value: Any, where: str) -> str:
    if value not in INSTALLS:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(INSTALLS)}")
    return str(value)


def check_timeout(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: must be a whole number of seconds >= 1, got {value!r}")
    return value


def check_hooks(value: Any, where: str) -> tuple[str, ...]:
    """A hook list: one shell command or a list of them (none: null or [])."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) and c.strip() for c in value):
        raise ConfigError(f"{where}: must be a shell command or a list of them")
    return tuple(value)


def check_modules(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or "ip_vs" not in value:
        raise ConfigError(f"{where}: must be a list of IPVS modules that includes ip_vs")
    for m in value:
        if not isinstance(m, str) or not re.fullmatch(MODULE_RE, m):
            raise ConfigError(f"{where}: {m!r} is not an IPVS module name")
    return tuple(value)


def load_policy(path: Path | str | None = None) -> Policy:
    """Parse and validate the policy file (`path`: a file or a directory holding it, else
    the one ipvs_fleet.resources.policy_file resolves); every error names the file and field."""
    p = policy_file(override=path)
    doc = load_yaml_file(p, "policy")
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: must be a mapping with host_classes and sysctl_schema")
    for top in ("host_classes", "sysctl_schema"):
        if not isinstance(doc.get(top), dict) or not doc[top]:
            raise ConfigError(f"{p}: {top} must be a non-empty mapping")
    schema: dict[str, dict[str, int]] = {}
    for key, rng in doc["sysctl_schema"].items():
        if not isinstance(rng, dict) or not {"min", "max"} <= set(rng):
            raise ConfigError(f"{p}: sysctl_schema.{key} needs min and max")
        schema[str(key)] = {"min": int(rng["min"]), "max": int(rng["max"])}
    policy = Policy(p, {}, schema)
    for name, body in doc["host_classes"].items():
        where = f"{p}: host_classes.{name}"
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: must be a mapping")
        known = {"description", "sysctls", "latency_budget", "activation", "modules", "install",
                 "pre_activate", "post_activate", "hook_timeout_seconds",
                 "lock_wait_seconds"}  # fmt: skip
        extra = set(body) - known
        if extra:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(extra))}")
        if "sysctls" not in body:
            raise ConfigError(f"{where}: missing sysctls")
        policy.classes[str(name)] = {
            "description": body.get("description", ""),
            "sysctls": policy.check_sysctls(body["sysctls"], f"{where}.sysctls"),
            "latency_budget": policy.check_budget(
                body.get("latency_budget") or {}, f"{where}.latency_budget"
            ),
            "activation": check_activation(body.get("activation", "reload"), f"{where}.activation"),
            "modules": check_modules(body.get("modules", ["ip_vs"]), f"{where}.modules"),
            "install": check_install(body.get("install", "artifact"), f"{where}.install"),
            "pre_activate": check_hooks(body.get("pre_activate"), f"{where}.pre_activate"),
            "post_activate": check_hooks(body.get("post_activate"), f"{where}.post_activate"),
            "hook_timeout": check_timeout(
                body.get("hook_timeout_seconds", HOOK_TIMEOUT_S), f"{where}.hook_timeout_seconds"
            ),
            "lock_wait": check_timeout(
                body.get("lock_wait_seconds", LOCK_WAIT_S), f"{where}.lock_wait_seconds"
            ),
        }
    return policy
