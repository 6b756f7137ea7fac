"""Host-class policy: what each class of host wants from IPVS, validated before any host is touched.

The policy file (the repository's `policy/host_classes.yml`, packaged:
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
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, ValidationInfo, model_validator

from ipvs_fleet.errors import ConfigError, load_yaml_file
from ipvs_fleet.resources import policy_file
from ipvs_fleet.validation import StrictModel, shown, validated

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
# Host data the rollout reads, not the policy (ipvs_fleet.validation checks it).
ROLLOUT_KEYS = {"ipvs_failure_domain"}
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


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_timeout(value: Any) -> int:
    """Seconds >= 1 (ValueError otherwise: a model's field validator)."""
    if not _whole(value) or value < 1:
        raise ValueError(f"must be a whole number of seconds >= 1, got {shown(value)}")
    return int(value)


def check_hooks(value: Any) -> tuple[str, ...]:
    """A hook list: one shell command or a list of them (none: null or [])."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(
        isinstance(c, str) and c.strip() for c in value
    ):
        raise ValueError(f"must be a shell command or a list of them, got {shown(value)}")
    return tuple(value)


def check_modules(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or "ip_vs" not in value:
        raise ValueError(f"must be a list of IPVS modules that includes ip_vs, got {shown(value)}")
    for m in value:
        if not isinstance(m, str) or not re.fullmatch(MODULE_RE, m):
            raise ValueError(f"{shown(m)} is not an IPVS module name")
    return tuple(value)


def check_sysctls(values: Any, info: ValidationInfo) -> dict[str, int]:
    """{key: int} within the ranges of the policy's sysctl_schema (the validation context's
    `schema`: the one source of ranges)."""
    schema: dict[str, dict[str, int]] = (info.context or {}).get("schema", {})
    if not isinstance(values, Mapping):
        raise ValueError(f"must be a mapping of net.ipv4.vs keys to integers, got {shown(values)}")
    out: dict[str, int] = {}
    for key, value in values.items():
        rng = schema.get(key) if isinstance(key, str) else None
        if rng is None:
            known = ", ".join(sorted(schema))
            raise ValueError(f"unknown IPVS sysctl {shown(key)} (known: {known})")
        if not _whole(value):
            raise ValueError(f"{key} must be an integer, got {shown(value)}")
        if not rng["min"] <= value <= rng["max"]:
            raise ValueError(f"{key}={value} is out of range {rng['min']}..{rng['max']}")
        out[key] = value
    return out


def _reason(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty reason, got {shown(value)}")
    return value


def _class_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a host class name, got {shown(value)}")
    return value


def _non_negative(value: int) -> int:
    if value < 0:
        raise ValueError(f"must be a non-negative integer or null, got {value}")
    return value


Activation = Literal["reload", "reboot", "next-boot"]
Install = Literal["artifact", "dkms"]
Seconds = Annotated[int, BeforeValidator(check_timeout)]
Hooks = Annotated[tuple[str, ...], BeforeValidator(check_hooks)]
Modules = Annotated[tuple[str, ...], BeforeValidator(check_modules)]
Sysctls = Annotated[dict[str, int], BeforeValidator(check_sysctls)]
ClassName = Annotated[str, BeforeValidator(_class_name)]
NonNegative = Annotated[int, AfterValidator(_non_negative)]


class Budget(StrictModel):
    """A latency budget (ipvs_fleet.compliance.latency); null: no limit."""

    slow_ms: NonNegative | None = None
    max_slow: NonNegative | None = None
    max_errors: NonNegative | None = None
    p99_ms: NonNegative | None = None


class SchemaRange(StrictModel):
    min: int
    max: int

    @model_validator(mode="after")
    def _ordered(self) -> SchemaRange:
        if self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class HostClass(StrictModel):
    """One class of host_classes.yml."""

    description: str = ""
    sysctls: Sysctls
    latency_budget: Budget | None = None
    activation: Activation = "reload"
    modules: Modules = ("ip_vs",)
    install: Install = "artifact"
    pre_activate: Hooks = ()
    post_activate: Hooks = ()
    hook_timeout_seconds: Seconds = HOOK_TIMEOUT_S
    lock_wait_seconds: Seconds = LOCK_WAIT_S


def _non_empty(value: dict[str, Any]) -> dict[str, Any]:
    if not value:
        raise ValueError("must be a non-empty mapping")
    return value


class SchemaFile(StrictModel):
    """The sysctl_schema of host_classes.yml alone (read first: the classes' ranges)."""

    model_config = ConfigDict(extra="ignore")
    sysctl_schema: Annotated[dict[str, SchemaRange], AfterValidator(_non_empty)]


class PolicyFile(SchemaFile):
    """host_classes.yml."""

    model_config = ConfigDict(extra="forbid")
    host_classes: Annotated[dict[str, HostClass], AfterValidator(_non_empty)]


class HostData(StrictModel):
    """The ipvs_* host data of one host (other keys are the inventory's own)."""

    model_config = ConfigDict(extra="allow")
    ipvs_host_class: ClassName
    ipvs_sysctls: Sysctls | None = None
    ipvs_latency_budget: Budget | None = None
    ipvs_activation: Activation | None = None
    ipvs_allow_reuse_with: Annotated[str, BeforeValidator(_reason)] | None = None
    ipvs_install: Install | None = None
    ipvs_pre_activate: Hooks = ()
    ipvs_post_activate: Hooks = ()
    ipvs_lock_wait_seconds: Seconds | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        unknown = (
            {str(k) for k in data if str(k).startswith("ipvs_")}
            - HOST_KEYS
            - INFO_KEYS
            - ROLLOUT_KEYS
        )
        if unknown:
            raise ValueError(
                f"unknown host data {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(HOST_KEYS))})"
            )
        if data.get("ipvs_host_class") is None:
            raise ValueError("no ipvs_host_class in its host or group data")
        return data


def _budget(b: Budget | None) -> dict[str, int | None]:
    return {} if b is None else b.model_dump(exclude_unset=True)


@dataclass
class Policy:
    """The parsed policy file."""

    path: Path
    classes: dict[str, dict[str, Any]]
    schema: dict[str, dict[str, int]]
    _cache: dict[str, HostSettings] = field(default_factory=dict, repr=False)

    def for_host(self, name: str, data: Mapping[str, Any]) -> HostSettings:
        """The settings for one host, or ConfigError naming the host, key and file."""
        where = f"host {name}"
        d = validated(HostData, dict(data), where, {"schema": self.schema})
        cls = d.ipvs_host_class
        if cls not in self.classes:
            raise ConfigError(
                f"{where}: unknown host class {cls!r} (classes in {self.path}: "
                f"{', '.join(sorted(self.classes))})"
            )
        base = self.classes[cls]
        given = d.model_fields_set
        hooks = {
            k: getattr(d, f"ipvs_{k}") if f"ipvs_{k}" in given else base[k]
            for k in ("pre_activate", "post_activate")
        }
        return HostSettings(
            name,
            cls,
            {**base["sysctls"], **(d.ipvs_sysctls or {})},
            {**base["latency_budget"], **_budget(d.ipvs_latency_budget)},
            d.ipvs_activation or base["activation"],
            base["modules"],
            d.ipvs_allow_reuse_with,
            d.ipvs_install or base["install"],
            hooks["pre_activate"],
            hooks["post_activate"],
            base["hook_timeout"],
            d.ipvs_lock_wait_seconds if d.ipvs_lock_wait_seconds is not None else base["lock_wait"],
        )


def load_policy(path: Path | str | None = None) -> Policy:
    """Parse and validate the policy file (`path`: a file or a directory holding it, else
    the one ipvs_fleet.resources.policy_file resolves); every error names the file and field."""
    p = policy_file(override=path)
    doc = load_yaml_file(p, "policy")
    ranges = validated(SchemaFile, doc, str(p)).sysctl_schema
    schema = {k: {"min": r.min, "max": r.max} for k, r in ranges.items()}
    pf = validated(PolicyFile, doc, str(p), {"schema": schema})
    classes = {
        name: {
            "description": c.description,
            "sysctls": c.sysctls,
            "latency_budget": _budget(c.latency_budget),
            "activation": c.activation,
            "modules": c.modules,
            "install": c.install,
            "pre_activate": c.pre_activate,
            "post_activate": c.post_activate,
            "hook_timeout": c.hook_timeout_seconds,
            "lock_wait": c.lock_wait_seconds,
        }
        for name, c in pf.host_classes.items()
    }
    return Policy(p, classes, schema)
