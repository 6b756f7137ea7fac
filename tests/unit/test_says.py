"""What a run would change, said once for both engines (`ipvs_fleet.deploy.says`): the
sentences that have logic, and, for the same host state, the pyinfra preview's lines (the
real pyinfra CLI against its `@fake` connector) and the Ansible role's check-mode report
(the filter's `ipvs_fleet_pending` on the role's probe output) are the same lines."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from ipvs_fleet.deploy import says
from ipvs_fleet.deploy.operations import MANAGED_FILES
from tests.fixtures.loaded import loaded_output
from tests.unit.test_ansible_role import load_filters
from tests.unit.test_deploy_preview import (  # noqa: F401 (fleet: the fixture)
    KR,
    MODULES,
    ROLLBACK,
    FakeHost,
    converged,
    fleet,
    sha256_of_template,
    stock_sysctls,
)

F = load_filters()
DEST = f"/lib/modules/{KR}/updates/ipvs-fleet"
HOOKS = {"ipvs_pre_activate": ["drain one", "drain two"], "ipvs_post_activate": ["uncordon"]}


def role_probes(h: FakeHost) -> tuple[str, str]:
    """The role's preflight and state probe output for the state a FakeHost's facts tell."""
    responses = dict(h.responses())
    preflight = [
        F.MARK + "kernel",
        KR,
        F.MARK + "lockdown",
        *responses["echo lockdown="],
        F.MARK + "usage",
        *responses["echo '## lsmod'"],
    ]
    present = [f"{p}=file" if h.files else f"{p}=none" for p in MANAGED_FILES]
    files = [
        f"{p}=644:{sha256_of_template(p, h.host_class)}" if h.files else f"{p}=:"
        for p in MANAGED_FILES
    ]
    state = [
        *(F.MARK + "installed", *responses[r"sha256sum -- \*\.ko"]),
        *(F.MARK + "loaded", *loaded_output(h.loaded_rows())),
        *(F.MARK + "sysctls", *(f"/proc/sys/net/ipv4/vs/{k}:{v}" for k, v in h.sysctls.items())),
        *(F.MARK + "backups", *present),
        *(F.MARK + "files", *files),
        *(F.MARK + "on_disk", "yes" if h.installed else "no"),
        F.MARK + "dkms",
    ]
    return "\n".join(preflight), "\n".join(state)


def check_mode_report(
    h: FakeHost, data: dict[str, Any], artifacts: str, rollback: bool
) -> list[str]:
    """The role's check-mode lines for the host: its plan, its state, `ipvs_fleet_pending`."""
    preflight, state = role_probes(h)
    host = {"ipvs_host_class": h.host_class, **data}
    if rollback:
        plan = F.rollback_plan(preflight, "n", host)
    else:
        plan = F.plan(preflight, "n", host, artifacts)
    return F.pending(F.state(state, plan), plan)


def drifted() -> FakeHost:
    h = converged()
    h.sysctls["conn_reuse_old_conntrack"] = 0
    return h


def older() -> FakeHost:
    h = converged()
    h.loaded = "older"
    return h


def foreign() -> FakeHost:
    h = converged()
    h.loaded = "foreign"
    return h


def unloaded_scheduler() -> FakeHost:
    h = converged()
    h.unloaded = ("ip_vs_sh",)
    return h


def test_install_says_a_replacement_and_how_many_files_differ():
    a, b = "a" * 64, "b" * 64
    assert says.install(KR, DEST, {"x.ko": a}, {}, "3.0") == (
        f"install patch set 3.0 for {KR}: x.ko into {DEST} (sha256-verified), depmod"
    )
    # x.ko differs, y.ko is gone, z.ko is new: 3 files
    assert says.install(KR, DEST, {"x.ko": a, "z.ko": a}, {"x.ko": b, "y.ko": a}) == (
        f"replace the installed build for {KR} with the fix module (3 module file(s) differ)"
    )


def test_remove_modules_names_an_unindexed_copy_and_dkms():
    assert says.remove_modules(KR, DEST, [], []) == (
        f"remove the ipvs-fleet module set for {KR} (an unindexed copy in {DEST}), depmod"
    )
    assert says.remove_modules(KR, DEST, ["b.ko", "a.ko"], ["3.0", "3.1"]) == (
        f"remove the ipvs-fleet module set for {KR} (a.ko, b.ko in {DEST}; "
        "DKMS ipvs-fleet 3.0, 3.1), depmod"
    )


@pytest.mark.parametrize(
    ("exists", "write", "keep", "said"),
    [
        (False, True, True, "create /f (c); note for rollback that /f did not exist"),
        (True, True, True, "rewrite /f (c); keep the previous /f for rollback"),
        (True, True, False, "rewrite /f (c)"),
        (True, False, True, "keep the previous /f for rollback"),
    ],
)
def test_write_file_says_the_write_and_the_backup(exists, write, keep, said):
    assert says.write_file("/f", "c", exists, write, keep) == said


def test_restore_and_sysctl_name_where_the_state_comes_from():
    assert says.restore_file("/f", "file") == "restore /f from the copy kept by the first deploy"
    assert says.restore_file("/f", "absent") == "remove /f (the deploy created it)"
    assert says.set_sysctl("k", 1, 0) == "set net.ipv4.vs.k = 1 (live 0)"
    assert says.set_sysctl("k", 1, None) == (
        "set net.ipv4.vs.k = 1 (the key appears once the modules above are active)"
    )


CASES: dict[str, tuple[Callable[[], FakeHost], dict[str, Any], bool]] = {
    "nothing loaded": (FakeHost, {}, False),
    "stock, reboot": (
        lambda: FakeHost(loaded="stock", sysctls=stock_sysctls()),
        {"ipvs_activation": "reboot"},
        False,
    ),
    "stock, hooks": (lambda: FakeHost(loaded="stock", sysctls=stock_sysctls()), HOOKS, False),
    "drifted": (drifted, {}, False),
    "converged": (converged, {}, False),
    "older fix module, hooks": (older, HOOKS, False),
    "a scheduler not loaded": (unloaded_scheduler, HOOKS, False),
    "foreign, reload": (foreign, {}, False),
    "foreign, next-boot": (foreign, {"ipvs_activation": "next-boot"}, False),
    "rollback of a converged host": (converged, {}, True),
    "rollback of a stock host": (lambda: FakeHost(loaded="stock"), {}, True),
}


@pytest.mark.parametrize("case", CASES)
def test_check_mode_report_is_the_pyinfra_preview(fleet, tmp_path, case):  # noqa: F811
    """The same host state: pyinfra's `[host] will ...` lines, in order, are the role's
    check-mode report, line for line."""
    make, data, rollback = CASES[case]
    args = [
        a
        for k, v in data.items()
        for a in ("--data", f"{k}={v if isinstance(v, str) else json.dumps(v)}")
    ]
    r = fleet({"n": make()}, "--dry", "--json", *args, deploy=ROLLBACK if rollback else "deploy.py")
    assert r.rc == 0, r.stderr[-3000:]
    report = check_mode_report(make(), data, str(tmp_path / "artifacts"), rollback)
    assert report == r.will("n")
