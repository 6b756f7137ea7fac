"""Filters of the ipvs_fleet.fleet collection: the pyinfra deploy's own facts, policy and
checks, for Ansible.

The role reads hosts with the same shell commands as the pyinfra facts
(`ipvs_fleet.deploy.facts`), parses their output with the same `process()` methods, and
decides with the same policy loader, artifact loader and reuse interlock
(`ipvs_fleet.policy`, `ipvs_fleet.build.artifact`, `ipvs_fleet.deploy.plan`). Nothing the
two engines decide is defined twice, so the controller needs the `ipvs-fleet` Python package
next to ansible-core: a declared dependency (the collection's requirements.txt and README).

    {{ 'preflight' | ipvs_fleet.fleet.ipvs_fleet_probe_command }}     -> shell script
    {{ probe.stdout | ipvs_fleet.fleet.ipvs_fleet_plan(inventory_hostname,
         hostvars[inventory_hostname], artifacts_dir, policy_file) }}  -> plan dict
    {{ probe.stdout | ipvs_fleet.fleet.ipvs_fleet_state(plan) }}      -> state dict
    {{ 'install (ansible)' | ipvs_fleet.fleet.ipvs_fleet_locked(30) }} -> host-lock preamble
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # imported by the unit tests without Ansible's plugin loader
    AnsibleFilterError = ValueError  # type: ignore[misc,assignment]

REQUIREMENT = "ipvs-fleet"  # the PyPI name; the collection's requirements.txt pins it

try:
    from ipvs_fleet.deploy.facts import (
        IpvsInstalledModules,
        IpvsLoadedModules,
        IpvsSwapState,
        IpvsSysctls,
        IpvsUsage,
        Lockdown,
        failed_set_dir,
        updates_dir,
    )
    from ipvs_fleet.deploy.operations import (
        MANAGED_FILES,
        STALE_STAGING,
        STATE_DIR,
        backup_path,
        is_current,
        lock_preamble,
        staging_path,
        swap_in,
        verification_problems,
    )
    from ipvs_fleet.deploy.plan import decide
    from ipvs_fleet.errors import FleetError
    from ipvs_fleet.policy import load_policy
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
    or `state` (installed, loaded, live sysctls, backups) for `kernel_release`."""
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
        failed = _quote(failed_set_dir(kernel_release))
        return _sections(
            {
                "installed": installed,
                "loaded": IpvsLoadedModules().command(),
                "sysctls": IpvsSysctls().command(),
                "backups": backups,
                "files": files,
                "failed": f"[ -e {failed} ] && echo yes || echo no",
                "swap": IpvsSwapState().command(),
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
        "sysctls": dict(settings.sysctls),
        "modules": list(settings.modules),
        "activation": settings.activation,
        "pre_activate": list(settings.pre_activate),
        "post_activate": list(settings.post_activate),
        "hook_timeout": settings.hook_timeout,
        "lock_wait": settings.lock_wait,
        "allow_reuse_with": settings.allow_reuse_with,
        "kernel_release": kernel,
        "tarball": hp.tarball,
        "tarball_name": Path(hp.tarball).name,
        "tarball_sha256": hp.tarball_sha256,
        "module_sums": hp.modules,
        # `sha256sum -c` input for the modules, as the pyinfra install writes it
        "module_sha256sums": "\n".join(
            f"{sha}  {name}" for name, sha in sorted(hp.modules.items())
        ),
        "patchset": hp.patchset,
        "reuse": hp.reuse,
        "usage": hp.usage,
        "updates_dir": updates_dir(kernel),
        "state_dir": STATE_DIR,
        "stale_staging": STALE_STAGING,
    }


def state(stdout: str, plan: Mapping[str, Any], patchset: str | None = None) -> dict[str, Any]:
    """A host's IPVS state and what the role still has to do about it.

    + plan: the host's plan (ipvs_fleet_plan)
    + patchset: the build that must be loaded; default the plan's, "" for the stock build

    Keys: installed, loaded, sysctls (live), backups {path: file|absent|none},
    files {path: "<mode>:<sha256>" (":" when absent)}, failed_set,
    install (bool), stale, swap (idle|running|pending), missing (modules to modprobe),
    sysctl_changes {key: value}, sysctl_absent, managed [{path, template, backup}],
    problems (verification, [] = ok).
    """
    facts = split_probe(stdout)
    want = plan["patchset"] if patchset is None else patchset
    installed = IpvsInstalledModules().process(facts.get("installed", []))
    loaded = IpvsLoadedModules().process(facts.get("loaded", []))
    live = IpvsSysctls().process(facts.get("sysctls", []))
    backups = dict(line.rsplit("=", 1) for line in facts.get("backups", []) if "=" in line)
    files = dict(line.rsplit("=", 1) for line in facts.get("files", []) if "=" in line)
    swap = IpvsSwapState().process(facts.get("swap", []))
    stale = sorted(m for m, info in loaded.items() if not is_current(info, want))
    missing = [m for m in plan["modules"] if m not in loaded or m in stale]
    wanted: dict[str, int] = dict(plan["sysctls"]) if want else {}
    changes = {k: v for k, v in sorted(wanted.items()) if k in live and live[k] != v}
    absent = sorted(k for k in wanted if k not in live)
    problems = verification_problems(loaded, live, want, wanted, swap)
    return {
        "installed": installed,
        "loaded": loaded,
        "sysctls": live,
        "backups": backups,
        "files": files,
        "failed_set": (facts.get("failed") or ["no"])[0].strip() == "yes",
        "install": installed != dict(plan["module_sums"]),
        "stale": stale,
        # an earlier swap still running or died with its table not restored: idle|running|pending
        "swap": swap["state"],
        "missing": missing,
        "sysctl_changes": changes,
        "sysctl_absent": absent,
        "managed": [
            {"path": p, "template": t, "backup": backup_path(p)} for p, t in MANAGED_FILES.items()
        ],
        "problems": problems,
    }


def rollback_plan(
    stdout: str, host: str, hostvars: Mapping[str, Any], policy_file: str | None = None
) -> dict[str, Any]:
    """What rollback needs for a host (the pyinfra rollback's `settings_for`): its policy
    settings and kernel release; no artifact, no interlock. `patchset` "" = the stock build."""
    try:
        s = load_policy(policy_file or None).for_host(host, host_data(hostvars))
    except FleetError as e:
        raise AnsibleFilterError(f"ipvs-fleet preflight refused: {e}") from None
    kernel = (split_probe(stdout).get("kernel") or [""])[0].strip()
    if not kernel:
        raise AnsibleFilterError(f"host {host}: the probe did not report a kernel release")
    return {
        "host_class": s.host_class,
        "sysctls": dict(s.sysctls),
        "modules": list(s.modules),
        "activation": s.activation,
        "pre_activate": list(s.pre_activate),
        "post_activate": list(s.post_activate),
        "hook_timeout": s.hook_timeout,
        "lock_wait": s.lock_wait,
        "kernel_release": kernel,
        "patchset": "",
        "module_sums": {},
        "updates_dir": updates_dir(kernel),
        "failed_set_dir": failed_set_dir(kernel),
        "state_dir": STATE_DIR,
    }


def locked(what: str, wait: int) -> str:
    """The host-lock preamble of the pyinfra `locked()` (operations.lock_preamble), as text:
    a task's shell script continues it with `&&` or on the next line under `set -e`."""
    return str(lock_preamble(what, int(wait)).get_raw_value())


def exchange(staging: str, dest: str) -> str:
    """The install's swap of the staged set into place (operations.swap_in), as text."""
    return swap_in(staging, dest)


def staged(path: str, token: str) -> str:
    """Where this run uploads a managed file before the locked rename (operations.staging_path)."""
    return staging_path(path, token)


def pending(st: Mapping[str, Any], plan: Mapping[str, Any]) -> list[str]:
    """What a run would change on the host, one line each ([] = nothing): the check-mode
    report, since the role's command tasks are skipped in check mode."""
    out = []
    if st.get("install"):
        out.append(
            f"install patch set {plan['patchset']} for {plan['kernel_release']} "
            f"in {plan['updates_dir']}"
        )
    if plan.get("patchset") == "":  # the rollback's plan
        if st.get("installed") or st.get("failed_set"):
            out.append(f"remove the patched modules from {plan['updates_dir']}")
        for path, backup in st.get("backups", {}).items():
            if backup != "none":
                out.append(f"restore {path}" if backup == "file" else f"remove {path}")
    if st.get("swap") != "idle":
        out.append(f"finish the earlier module swap ({st.get('swap')})")
    if st.get("stale"):
        out.append(
            f"activate ({plan['activation']}) the installed build of {', '.join(st['stale'])}"
        )
    if st.get("missing"):
        out.append(f"load {', '.join(st['missing'])}")
    for key, value in st.get("sysctl_changes", {}).items():
        out.append(f"set net.ipv4.vs.{key}={value} (live: {st['sysctls'].get(key)})")
    for key in st.get("sysctl_absent", []):
        out.append(f"set net.ipv4.vs.{key}={plan['sysctls'][key]} (absent until activated)")
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
                "ipvs_fleet_locked": locked,
                "ipvs_fleet_pending": pending,
                "ipvs_fleet_swap_in": exchange,
                "ipvs_fleet_staging_path": staged,
            }.items()
        }
