"""Filters of the ipvs_fleet.fleet collection: the pyinfra deploy's own facts, policy and
checks, for Ansible.

The role reads hosts with the same shell commands as the pyinfra facts
(`ipvs_fleet.deploy.facts`), parses their output with the same `process()` methods, and
decides with the same policy loader, artifact loader, reuse interlock and verification
(`ipvs_fleet.policy`, `ipvs_fleet.build.artifact`, `ipvs_fleet.deploy.plan`,
`ipvs_fleet.deploy.operations`, the activation's too). Nothing the two engines decide is
defined twice, so the controller needs the `ipvs-fleet` Python package next to
ansible-core: a declared dependency (the collection's requirements.txt and README).

    {{ 'preflight' | ipvs_fleet.fleet.ipvs_fleet_probe_command }}     -> shell script
    {{ probe.stdout | ipvs_fleet.fleet.ipvs_fleet_plan(inventory_hostname,
         hostvars[inventory_hostname], artifacts_dir, policy_file) }}  -> plan dict
    {{ probe.stdout | ipvs_fleet.fleet.ipvs_fleet_state(plan) }}      -> state dict
    {{ 'set_sysctl' | ipvs_fleet.fleet.ipvs_fleet_command('timeout', 0, 30) }} -> shell text
    {{ state | ipvs_fleet.fleet.ipvs_fleet_pending(plan) }}       -> the preview's lines
    {{ ipvs_fleet_serial | default('') | ipvs_fleet.fleet.ipvs_fleet_waves(2) }} -> serial

Every command that changes a host is `ipvs_fleet.deploy.commands`' (the pyinfra operations
yield the same texts): `ipvs_fleet_command` names one and passes its arguments. What a run
would change is said in `ipvs_fleet.deploy.says`' sentences, the pyinfra preview's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # imported by the unit tests without Ansible's plugin loader
    AnsibleFilterError = ValueError  # type: ignore[misc,assignment]

REQUIREMENT = "ipvs-fleet"  # the PyPI name; the collection's requirements.txt pins it

try:
    from ipvs_fleet.deploy import says
    from ipvs_fleet.deploy.commands import COMMANDS, STATE_DIR, backup_path, incoming
    from ipvs_fleet.deploy.facts import (
        DkmsVersions,
        IpvsInstalledModules,
        IpvsLoadedModules,
        IpvsSysctls,
        IpvsUsage,
        Lockdown,
        updates_dir,
    )
    from ipvs_fleet.deploy.operations import (
        MANAGED_FILES,
        activation,
        rendered,
        verification_problems,
    )
    from ipvs_fleet.deploy.plan import decide
    from ipvs_fleet.errors import FleetError
    from ipvs_fleet.kernel import MODULE_NAME
    from ipvs_fleet.policy import KNOB, Policy, load_policy
    from ipvs_fleet.rollout.config import load_config, parse_waves
except ImportError as e:  # a clear error at the first filter use, not a plugin-load traceback
    _MISSING: str | None = (
        f"the ipvs_fleet.fleet collection needs the {REQUIREMENT} Python package on the "
        f"controller, in ansible-core's Python (pip install {REQUIREMENT}; see the "
        f"collection's requirements.txt): {e}"
    )
else:
    _MISSING = None

MARK = "@@ipvs-fleet@@ "
ROLE_PREFIX = "ipvs_fleet_"  # the role's own settings, not host data of the policy


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def _sections(script: dict[str, str]) -> str:
    return "\n".join(f"echo {_quote(MARK + name)}; {{ {cmd}\n}}" for name, cmd in script.items())


def probe_command(kind: str, kernel_release: str = "") -> str:
    """The shell script that reads a host: `preflight` (kernel, lockdown, conntrack users)
    or `state` (installed, loaded, live sysctls, backups, DKMS) for `kernel_release`."""
    if kind == "preflight":
        return _sections(
            {
                "kernel": "uname -r",
                "lockdown": Lockdown().command(),
                "usage": IpvsUsage().command(),
            }
        )
    if kind == "state":
        if not kernel_release:
            raise AnsibleFilterError("ipvs_fleet_probe_command('state') needs the kernel release")
        installed = IpvsInstalledModules().command(kernel_release=kernel_release).get_raw_value()
        backups = "; ".join(
            f"if [ -f {_quote(backup_path(p))} ]; then echo {_quote(p)}=file; "
            f"elif [ -f {_quote(backup_path(p) + '.absent')} ]; then echo {_quote(p)}=absent; "
            f"else echo {_quote(p)}=none; fi"
            for p in MANAGED_FILES
        )
        # mode:sha256 of each managed file, so unchanged files cost the role no remote call
        files = "; ".join(
            f"echo {_quote(p)}=$(stat -c %a {_quote(p)} 2>/dev/null):"
            f"$(sha256sum < {_quote(p)} 2>/dev/null | cut -d' ' -f1)"
            for p in MANAGED_FILES
        )
        # the folder itself too: a copy depmod never indexed is not `installed`, and the
        # rollback removes it all the same (modules_removed)
        dest = _quote(updates_dir(kernel_release))
        return _sections(
            {
                "installed": installed,
                "loaded": IpvsLoadedModules().command(),
                "sysctls": IpvsSysctls().command(),
                "backups": backups,
                "files": files,
                "on_disk": f"[ -d {dest} ] && echo yes || echo no",
                "dkms": DkmsVersions().command(),
            }
        )
    raise AnsibleFilterError(f"ipvs_fleet_probe_command: unknown probe {kind!r}")


def split_probe(stdout: str) -> dict[str, list[str]]:
    """Probe output -> {section: lines}."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in stdout.splitlines():
        if line.startswith(MARK):
            current = out.setdefault(line[len(MARK) :].strip(), [])
        elif current is not None:
            current.append(line)
    return out


def host_data(hostvars: Mapping[str, Any]) -> dict[str, Any]:
    """The policy's host data among a host's variables: `ipvs_*`, not the role's settings
    (`ipvs_fleet_*`). Unknown `ipvs_*` names stay in, so the policy names typos."""
    return {
        str(k): hostvars[k]
        for k in list(hostvars.keys())
        if str(k).startswith("ipvs_") and not str(k).startswith(ROLE_PREFIX)
    }


def _sysctls(values: Mapping[str, int], policy: Policy) -> dict[str, int]:
    """A class's values in the policy schema's order: the order the pyinfra deploy sets them
    (and says so), which the check-mode report follows."""
    return {k: values[k] for k in sorted(values, key=list(policy.schema).index)}


def plan(
    stdout: str,
    host: str,
    hostvars: Mapping[str, Any],
    artifacts_dir: str,
    policy_file: str | None = None,
) -> dict[str, Any]:
    """Check one host as the pyinfra preflight does (policy, lockdown, artifact, interlock)
    and return what it gets; AnsibleFilterError naming host and reason otherwise."""
    try:
        facts = split_probe(stdout)
        kernel = (facts.get("kernel") or [""])[0].strip()
        if not kernel:
            raise FleetError(f"host {host}: the preflight probe did not report a kernel release")
        hp = decide(
            host,
            host_data(hostvars),
            kernel,
            Lockdown().process(facts.get("lockdown", [])),
            IpvsUsage().process(facts.get("usage", [])),
            Path(artifacts_dir),
            policy_file or None,
        )
    except FleetError as e:
        raise AnsibleFilterError(f"ipvs-fleet preflight refused: {e}") from None
    settings = hp.settings
    return {
        "host_class": settings.host_class,
        "sysctls": _sysctls(settings.sysctls, load_policy(policy_file or None)),
        "modules": list(settings.modules),
        "activation": settings.activation,
        "pre_activate": list(settings.pre_activate),
        "post_activate": list(settings.post_activate),
        "hook_timeout": settings.hook_timeout,
        "lock_wait": settings.lock_wait,
        "allow_reuse_with": settings.allow_reuse_with,
        "kernel_release": kernel,
        "tarball": hp.tarball,
        # this run's own upload path on the host (ipvs_fleet.deploy.commands.incoming)
        "remote_tar": incoming(Path(hp.tarball).name),
        "tarball_sha256": hp.tarball_sha256,
        "module_sums": hp.modules,
        # `sha256sum -c` input for the modules, as the pyinfra install writes it
        "module_sha256sums": "\n".join(
            f"{sha}  {name}" for name, sha in sorted(hp.modules.items())
        ),
        "patchset": hp.patchset,
        "fix_module": MODULE_NAME,
        "reuse": hp.reuse,
        "usage": hp.usage,
        "updates_dir": updates_dir(kernel),
        "state_dir": STATE_DIR,
    }


def state(stdout: str, plan: Mapping[str, Any], patchset: str | None = None) -> dict[str, Any]:
    """A host's IPVS state and what the role still has to do about it.

    + plan: the host's plan (ipvs_fleet_plan or ipvs_fleet_rollback_plan)
    + patchset: the build the fix module must be loaded from; default the plan's, "" for
      no fix module (the rollback)

    Keys: installed, loaded, sysctls (live), backups {path: file|absent|none},
    files {path: "<mode>:<sha256>" (":" when absent)}, on_disk (the updates folder exists),
    dkms (registered ipvs-fleet DKMS versions), install (bool), the activation's keys
    (`activation`: want, fix_version, stale, foreign, missing, change, loads, refusal),
    sysctl_changes {key: value} (the rollback's: the knob to 0 where it exists),
    sysctl_absent, managed [{path, template, backup, sha256, exists, write, keep}] (each
    managed file as config_file decides: the sha256 of the class's rendering, whether to
    write it and whether to keep its previous state for the rollback), problems
    (verification, [] = ok).
    """
    facts = split_probe(stdout)
    want = plan["patchset"] if patchset is None else patchset
    installed = IpvsInstalledModules().process(facts.get("installed", []))
    loaded = IpvsLoadedModules().process(facts.get("loaded", []))
    live = IpvsSysctls().process(facts.get("sysctls", []))
    backups = dict(line.rsplit("=", 1) for line in facts.get("backups", []) if "=" in line)
    files = dict(line.rsplit("=", 1) for line in facts.get("files", []) if "=" in line)
    wanted: dict[str, int] = dict(plan["sysctls"]) if want else {}
    # the rollback sets the knob to 0 first where it exists (sysctl_live if_present)
    to_set = wanted if want else {KNOB: 0}
    changes = {k: v for k, v in to_set.items() if k in live and live[k] != v}
    return {
        "installed": installed,
        "loaded": loaded,
        "sysctls": live,
        "backups": backups,
        "files": files,
        "on_disk": (facts.get("on_disk") or ["no"])[0].strip() == "yes",
        "dkms": DkmsVersions().process(facts.get("dkms", [])),
        "install": bool(want) and installed != dict(plan["module_sums"]),
        **activation(loaded, plan["modules"], want, plan["activation"]),
        "sysctl_changes": changes,
        "sysctl_absent": sorted(k for k in wanted if k not in live),
        "managed": [_managed(p, plan, files[p], backups[p]) for p in MANAGED_FILES],
        "problems": verification_problems(loaded, live, want, wanted),
    }


@lru_cache(maxsize=64)
def _rendered_sha256(
    path: str, host_class: str, sysctls: tuple[tuple[str, int], ...], modules: tuple[str, ...]
) -> str:
    return hashlib.sha256(rendered(path, host_class, dict(sysctls), modules).encode()).hexdigest()


def _managed(path: str, plan: Mapping[str, Any], now: str, backup: str) -> dict[str, Any]:
    """One managed file and what config_file would do about it: `now` is the probe's
    "<mode>:<sha256>" (":" when absent), `backup` its file|absent|none."""
    sha = _rendered_sha256(
        path, plan["host_class"], tuple(plan["sysctls"].items()), tuple(plan["modules"])
    )
    return {
        "path": path,
        "template": MANAGED_FILES[path],
        "backup": backup_path(path),
        "sha256": sha,
        "exists": now != ":",
        "write": now != f"644:{sha}",
        "keep": backup == "none",
    }


def rollback_plan(
    stdout: str, host: str, hostvars: Mapping[str, Any], policy_file: str | None = None
) -> dict[str, Any]:
    """What rollback needs for a host (the pyinfra rollback's `settings_for`): its policy
    settings and kernel release; no artifact, no interlock. `patchset` "" = no fix module."""
    try:
        policy = load_policy(policy_file or None)
        s = policy.for_host(host, host_data(hostvars))
    except FleetError as e:
        raise AnsibleFilterError(f"ipvs-fleet preflight refused: {e}") from None
    kernel = (split_probe(stdout).get("kernel") or [""])[0].strip()
    if not kernel:
        raise AnsibleFilterError(f"host {host}: the probe did not report a kernel release")
    return {
        "host_class": s.host_class,
        "sysctls": _sysctls(s.sysctls, policy),
        "modules": list(s.modules),
        "activation": s.activation,
        "pre_activate": list(s.pre_activate),
        "post_activate": list(s.post_activate),
        "hook_timeout": s.hook_timeout,
        "lock_wait": s.lock_wait,
        "kernel_release": kernel,
        "patchset": "",
        "fix_module": MODULE_NAME,
        "module_sums": {},
        "updates_dir": updates_dir(kernel),
        "state_dir": STATE_DIR,
    }


def command(name: str, *args: Any) -> str:
    """The shell text of `ipvs_fleet.deploy.commands.<name>(*args)`, the very command the
    pyinfra operation runs for that change."""
    if name not in COMMANDS:
        raise AnsibleFilterError(f"ipvs_fleet_command: unknown command {name!r}")
    return str(COMMANDS[name](*args))


def pending(st: Mapping[str, Any], plan: Mapping[str, Any]) -> list[str]:
    """What a run would change on the host, one line per step that changes it, in the
    order the run changes it, in the pyinfra preview's words (ipvs_fleet.deploy.says): the
    check-mode report, since the role's command tasks are skipped in check mode."""
    live, kr, dest = st["sysctls"], plan["kernel_release"], plan["updates_dir"]
    act = says.activation(
        st, plan["activation"], len(plan["pre_activate"]), len(plan["post_activate"])
    )
    if not plan["patchset"]:  # the rollback's plan: knob 0, the module set, files, activation
        out = [says.set_sysctl(k, v, live[k]) for k, v in st["sysctl_changes"].items()]
        if st["installed"] or st["on_disk"] or st["dkms"]:
            out.append(says.remove_modules(kr, dest, st["installed"], st["dkms"]))
        for f in st["managed"]:
            if st["backups"][f["path"]] != "none":
                out.append(says.restore_file(f["path"], st["backups"][f["path"]]))
        return [*out, *filter(None, [act])]
    out = []
    if st["install"]:
        out.append(says.install(kr, dest, plan["module_sums"], st["installed"], plan["patchset"]))
    for f in st["managed"]:
        if f["write"] or f["keep"]:
            out.append(
                says.write_file(f["path"], plan["host_class"], f["exists"], f["write"], f["keep"])
            )
    out += filter(None, [act])
    for key, value in plan["sysctls"].items():
        if key in st["sysctl_changes"]:
            out.append(says.set_sysctl(key, value, live[key]))
        # with next-boot a key that needs the fix module appears at the next boot
        elif key in st["sysctl_absent"] and plan["activation"] != "next-boot":
            out.append(says.set_sysctl(key, value, None))
    return out


def waves(value: Any = None, canary_hosts: int = 0, rollout_file: str = "") -> list[int | str]:
    """`serial` of the site playbook's rollout play: `ipvs_fleet_serial` when it is set, else
    the waves of the rollout policy (policy/rollout.yml, the `ipvs-fleet rollout` waves), each
    checked as `ipvs-fleet rollout --waves` checks a wave: a count of at least 1 or 1%..100%
    (a serial of 0 would take every host at once). The play's hosts are `canary:all`, so the
    one group wave it can follow is `canary`: it becomes the count of the canary hosts, and is
    left out when there are none. Per-wave thresholds have no Ansible equivalent: refused."""
    if value is None or value == "":
        cfg = load_config(rollout_file or None)
        specs, where = cfg.waves, f"{cfg.source}: waves"
    else:
        where = "ipvs_fleet_serial"
        specs = parse_waves(value if isinstance(value, list) else [value], where)
    out: list[int | str] = []
    for i, w in enumerate(specs):
        if w.max_fail_percent is not None or w.soak_seconds is not None:
            raise FleetError(
                f"{where}[{i}]: per-wave max_fail_percent and soak_seconds are the "
                "`ipvs-fleet rollout` engine's; Ansible's serial has no equivalent"
            )
        if w.kind == "group":
            if w.value != "canary":
                raise FleetError(
                    f"{where}[{i}]: group {w.value!r}: the site playbook takes only group "
                    "canary first (hosts: canary:all); use a count or 'N%'"
                )
            if canary_hosts:
                out.append(int(canary_hosts))
            continue
        out.append(int(w.value) if w.kind == "count" else str(w))
    if not out:
        raise FleetError(f"{where}: no wave but the canary group, and it has no hosts")
    return out


def _guarded(f: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if _MISSING:
            raise AnsibleFilterError(_MISSING)
        return f(*args, **kwargs)

    run.__doc__, run.__name__ = f.__doc__, f.__name__
    return run


class FilterModule:
    """Ansible's entry point for the collection's filters."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {
            name: _guarded(f)
            for name, f in {
                "ipvs_fleet_probe_command": probe_command,
                "ipvs_fleet_plan": plan,
                "ipvs_fleet_state": state,
                "ipvs_fleet_rollback_plan": rollback_plan,
                "ipvs_fleet_pending": pending,
                "ipvs_fleet_command": command,
                "ipvs_fleet_waves": waves,
            }.items()
        }
