"""What an IPVS host must look like once ipvs-fleet has converged it (one test per check).

Each test gets `target` (inventory host + class settings), `facts` (read once per host) and
`expect` (collects expected-vs-actual differences and fails once with all of them); the
keepalived checks get `keepalived` (the host's keepalived, read once; None where it is not
configured: they pass, `keepalived: not configured` in their details).
"""

from __future__ import annotations

import pytest

from ipvs_fleet.compliance import artifacts, latency, sysctl_defaults
from ipvs_fleet.compliance import keepalived as ka
from ipvs_fleet.compliance.expect import Expect
from ipvs_fleet.compliance.facts import (
    MODULES_FILE,
    SYSCTL_FILE,
    TAINT_OOT,
    TAINT_UNSIGNED,
    HostFacts,
)
from ipvs_fleet.compliance.session import CheckSession, Target
from ipvs_fleet.deploy.facts import updates_dir
from ipvs_fleet.keepalived.compare import Finding, compare_table, sync_daemon, vrrp_roles
from ipvs_fleet.kernel import MODULE_NAME, reuse_unsafe
from ipvs_fleet.policy import KNOB

VS = "net.ipv4.vs."
ALLOWED_TAINT = TAINT_OOT | TAINT_UNSIGNED


def test_patched_module(target: Target, facts: HostFacts, expect: Expect) -> None:
    """The fix module ip_vs_reuse is loaded and is the build installed in updates/ (the
    artifact's set, when this controller holds it); every other loaded IPVS module is the
    distro's own in-tree build (no O taint)."""
    where = updates_dir(facts.kernel_release)
    fix = facts.loaded.get(MODULE_NAME)
    want = artifacts.patchset(facts.kernel_release)
    if fix is None:
        expect.differ(MODULE_NAME, f"loaded (the build in {where})", "not loaded")
    elif not fix["patched"]:
        # Its MODULE_VERSION is the set id: the loaded module's version names its build.
        expect.differ(
            f"{MODULE_NAME} loaded (/sys/module/{MODULE_NAME}/version)",
            f"the build installed in {where}" + (f", {want}" if want else ""),
            f"another build: {fix['version'] or 'no version'}",
        )
    elif want is not None:
        expect.equal(
            f"{MODULE_NAME} set ({artifacts.manifest_path(facts.kernel_release)})",
            want,
            fix["patchset"],
        )
    foreign = {n: m for n, m in facts.loaded.items() if n != MODULE_NAME and "O" in m["taint"]}
    for name, m in sorted(foreign.items()):
        expect.problem(
            f"not the stock in-tree build: {name} (taint {m['taint']}, "
            f"version {m['version'] or 'none'})"
        )
    expect.details(
        kernel_release=facts.kernel_release,
        fix_module=fix and (fix["patchset"] or fix["version"]),
        out_of_tree=sorted(foreign),
    )
    expect.done(
        f"IPVS modules on kernel {facts.kernel_release} are not the fleet's "
        f"({MODULE_NAME} beside the stock ones)"
    )


def test_knob_present(facts: HostFacts, expect: Expect) -> None:
    """net.ipv4.vs.conn_reuse_old_conntrack exists (the fix module ip_vs_reuse registers it)."""
    if KNOB not in facts.sysctls:
        state = "loaded" if MODULE_NAME in facts.loaded else "not loaded"
        expect.differ(VS + KNOB, "present", f"absent ({MODULE_NAME} {state})")
    expect.done("the conn_reuse_old_conntrack sysctl is missing")


def test_sysctls(target: Target, facts: HostFacts, expect: Expect) -> None:
    """Every IPVS sysctl of the host's class has the class's value (live, init netns)."""
    for key, want in sorted(target.settings.sysctls.items()):
        expect.equal(VS + key, want, facts.sysctls.get(key, "absent"))
    expect.done(f"live IPVS sysctls differ from class {target.settings.host_class}")


def test_persisted(target: Target, facts: HostFacts, expect: Expect) -> None:
    """The sysctl.d and modules-load.d files hold the class's values, and boot gives them."""
    s = target.settings
    if not facts.fleet_file_present:
        expect.differ(SYSCTL_FILE, "present", "absent")
    for key, want in sorted(s.sysctls.items()):
        if facts.fleet_file_present:
            expect.equal(f"{SYSCTL_FILE}: {VS}{key}", want, facts.fleet_file.get(key, "absent"))
        boot = facts.persisted.get(key)
        if boot is not None and str(boot[0]) != str(want):
            # The last file to set a key wins at boot: the live value flips on the next reboot.
            expect.differ(f"{VS}{key} at boot (set last by {boot[1]})", want, boot[0])
    if facts.modules_load is None:
        expect.differ(MODULES_FILE, "present", "absent")
    else:
        missing = [m for m in s.modules if m not in facts.modules_load]
        if missing:
            expect.differ(MODULES_FILE, " ".join(s.modules), " ".join(facts.modules_load))
            expect.problem(f"not loaded at boot: {', '.join(missing)}")
    expect.done("persisted IPVS configuration differs from the class")


def test_sysctl_table(facts: HostFacts, expect: Expect) -> None:
    """In a fresh netns every IPVS sysctl reads its documented default (the knob's is 0:
    stock behaviour until the class sets it), and flipping one changes no other (a
    dislocated sysctl table, the seed patch's bug, fails here)."""
    t = facts.netns
    if not t.ipvs:
        expect.problem("ip_vs not loaded: no IPVS sysctls in a fresh network namespace")
    elif not t.complete:
        expect.problem("the fresh-netns table check did not finish (unshare or bash missing?)")
    defaults = sysctl_defaults.for_kernel(facts.kernel_release)
    if defaults is None:
        expect.problem(f"no documented IPVS sysctl defaults for kernel {facts.kernel_release}")
        defaults = {}
    for key, want in sorted(defaults.items()):
        if not t.ipvs or (key in sysctl_defaults.patched_keys() and key not in t.defaults):
            continue  # no table at all, or no knob: reported by patched_module / knob_present
        got = t.defaults.get(key, "absent")
        expect.equal(
            f"{VS}{key} default in a new netns",
            "present" if want is None else want,
            "present" if want is None and key in t.defaults else got,
        )
    for p in t.problems:
        expect.problem(p)
    expect.details(netns_defaults=t.defaults)
    expect.done("the IPVS sysctl table is inconsistent")


def test_taint(facts: HostFacts, expect: Expect) -> None:
    """The kernel carries no taint but O+E (out-of-tree, unsigned: our modules)."""
    extra = facts.tainted & ~ALLOWED_TAINT
    if extra:
        expect.differ(
            "/proc/sys/kernel/tainted",
            f"{ALLOWED_TAINT} (O+E) or less",
            f"{facts.tainted} ({facts.taint_flags()}; unexpected {facts.taint_flags(extra)})",
        )
    expect.done("the kernel is tainted by something other than ipvs-fleet's modules")


def test_kube_proxy_drift(target: Target, facts: HostFacts, expect: Expect) -> None:
    """conn_reuse_mode was not forced to 0 behind the policy's back (kube-proxy does so on
    kernels before 5.9, and older kube-proxy releases on any kernel)."""
    want = target.settings.sysctls.get("conn_reuse_mode")
    live = facts.sysctls.get("conn_reuse_mode")
    if want is not None and want != 0 and live == 0:
        who = "kube-proxy is running" if facts.kube_proxy else "kube-proxy not running now"
        expect.differ(f"{VS}conn_reuse_mode", want, f"0 ({who}; it forces 0 on kernels < 5.9)")
    expect.details(kube_proxy=facts.kube_proxy)
    expect.done("conn_reuse_mode was reset to 0 (kube-proxy drift)")


def test_reuse_safety(target: Target, facts: HostFacts, expect: Expect) -> None:
    """knob=1 only where it is safe: the reuse design of the loaded fix module is not unsafe
    with the host's live ruleset (kernel/reuse_designs.yml: a module that declares no design,
    or is not the build installed by the fleet, counts as `unknown`, unsafe under an
    INVALID-drop rule or any nat rule such as kube-proxy's masquerade); never on FTP/connmark
    hosts without a stated reason."""
    if facts.sysctls.get(KNOB) != 1:
        expect.done("")
        return
    u = facts.usage
    # The design is read from the installed file's modinfo: known only for the fleet's build.
    reuse = (facts.loaded.get(MODULE_NAME) or {}).get("reuse")
    unsafe = reuse_unsafe(reuse, u)
    if unsafe:
        expect.problem(f"knob=1 is unsafe here: {unsafe}")
    if not target.settings.allow_reuse_with:
        for what in ("ftp", "connmark"):
            if u.get(what):
                expect.problem(f"knob=1 but the host relies on conntrack: {u[what + '_reason']}")
    expect.details(usage=u, reuse=reuse)
    expect.done(f"{VS}{KNOB}=1 is unsafe on this host")


def test_latency_budget(fleet: CheckSession, target: Target, expect: Expect) -> None:
    """Short connections that reuse a source port meet the class's latency budget."""
    result = latency.measure(fleet, target)
    expect.details(probe=result)
    for v in latency.violations(result, target.settings.latency_budget):
        expect.problem(v)
    expect.done(
        f"latency budget of class {target.settings.host_class} not met ({latency.describe(result)})"
    )


# --- keepalived directors: the checks below apply where keepalived is configured ------------


@pytest.fixture
def keepalived(fleet: CheckSession, target: Target, facts: HostFacts) -> ka.Director | None:
    """The host's keepalived (configuration, IPVS table, sync daemons, VRRP roles), read once
    per host; None where keepalived is not configured."""
    kf = facts.keepalived
    if kf is None:
        return None
    name = target.host.name
    conn = fleet.connection(name)
    return fleet.after_facts(  # type: ignore[no-any-return]
        name, "keepalived", lambda: ka.director(kf, ka.remote_reader(conn.run))
    ).result()


def _not_configured(expect: Expect) -> None:
    expect.details(keepalived=ka.NOT_CONFIGURED)
    expect.done("")


def _findings(expect: Expect, findings: list[Finding]) -> None:
    for f in findings:
        if f.failure:
            expect.problem(f.text)
    notes = [f.text for f in findings if not f.failure]
    if notes:
        expect.details(keepalived_notes=notes)


def _running(director: ka.Director, expect: Expect) -> bool:
    if not director.running:
        expect.problem("keepalived is not running")
    return director.running


def test_keepalived_config(keepalived: ka.Director | None, expect: Expect) -> None:
    """`keepalived --config-test` passes on the file keepalived runs with (its `-f`, else
    /etc/keepalived/keepalived.conf); keepalived 2.2 fails it on warnings too."""
    if keepalived is None:
        return _not_configured(expect)
    f = keepalived.facts
    expect.details(keepalived_conf=f.conf, keepalived_files=keepalived.config.files)
    if f.config_test_rc != 0:
        expect.differ(f"keepalived --config-test -f {f.conf}", "exit 0", f"exit {f.config_test_rc}")
        # keepalived prints a message once per process that parses the file: once each here
        for line in dict.fromkeys(f.config_test_out.splitlines()[-10:]):
            expect.problem(line)
    expect.done("keepalived's configuration fails its own test")


def test_keepalived_table(keepalived: ka.Director | None, expect: Expect) -> None:
    """The live IPVS table is what keepalived was configured to write: every virtual server
    with its scheduler, persistence and forwarding method, no real server or service it did
    not configure (a configured real server missing is a note: its health check fails)."""
    if keepalived is None:
        return _not_configured(expect)
    _running(keepalived, expect)
    if not keepalived.facts.ipvs_loaded:
        expect.problem("ip_vs is not loaded: no IPVS table")
    if keepalived.table_error:
        expect.problem(f"cannot read the IPVS table: {keepalived.table_error}")
    _findings(expect, compare_table(keepalived.config, keepalived.table))
    expect.done("the IPVS table is not what keepalived was configured to write")


def test_keepalived_vrrp(keepalived: ka.Director | None, expect: Expect) -> None:
    """Each VRRP instance is MASTER or BACKUP (never FAULT): keepalived's own state since its
    last start (its journal), else the one its VIPs show; a MASTER holds all its VIPs, a
    BACKUP none of them."""
    if keepalived is None:
        return _not_configured(expect)
    if _running(keepalived, expect):
        roles, found = vrrp_roles(keepalived.config, keepalived.own_states, keepalived.addresses)
        expect.details(vrrp=roles)
        _findings(expect, found)
    expect.done("keepalived's VRRP instances are not in a sound state")


def test_keepalived_sync(keepalived: ka.Director | None, expect: Expect) -> None:
    """The IPVS sync daemon keepalived runs for its sync instance's role (master daemon on
    the VRRP master, backup daemon on a backup) on the configured interface and sync id."""
    if keepalived is None:
        return _not_configured(expect)
    if _running(keepalived, expect):
        c = keepalived.config
        roles, _ = vrrp_roles(c, keepalived.own_states, keepalived.addresses)
        expect.details(sync_daemons=[d.__dict__ for d in keepalived.daemons])
        _findings(expect, sync_daemon(c, roles, keepalived.daemons))
    expect.done("the IPVS sync daemon is not the one keepalived was configured to run")
