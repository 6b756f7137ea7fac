"""The collection's failure domain filters (plugins/filter/ipvs_fleet_pair.py): the batch a
host of site.yml goes in and the refusals, decided by ipvs_fleet.rollout's functions (the
playbook itself runs on the pair lab: tests/lab/test_pair_rollout.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ipvs_fleet.rollout.vrrp import ROLE_COMMAND, ROLE_MARK

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "ansible_collections/ipvs_fleet/fleet/plugins/filter/ipvs_fleet_pair.py"
CONF = "vrrp_instance VI_1 {\n    virtual_ipaddress {\n        10.0.9.100/24 dev eth1\n    }\n}\n"


@pytest.fixture(scope="module")
def f() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ipvs_fleet_pair_filters", PLUGIN)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read(*ips: str, rc: int = 0) -> dict[str, Any]:
    addrs = "\n".join(f"3: eth1    inet {ip}/24 scope global eth1" for ip in ips)
    return {"rc": rc, "stdout": CONF + ROLE_MARK + "\n" + addrs, "stderr": "boom" if rc else ""}


def hv(domain: Any = "pair", **r: Any) -> dict[str, Any]:
    return {"ipvs_failure_domain": domain, "ipvs_fleet_vrrp_read": r or {"skipped": True}}


def test_filters_are_registered(f):
    names = set(f.FilterModule().filters())
    assert names == {
        "ipvs_fleet_vrrp_command",
        "ipvs_fleet_domain_problems",
        "ipvs_fleet_pair_batch",
    }
    assert f.FilterModule().filters()["ipvs_fleet_vrrp_command"]("") == ROLE_COMMAND


def test_batches_free_backup_master(f):
    batch = f.FilterModule().filters()["ipvs_fleet_pair_batch"]
    assert batch({"ipvs_host_class": "k8s_node"}, "n1") == "ipvs_fleet_batch_free"
    assert batch(hv(**read("10.0.9.11", "10.0.9.100")), "lvs-a") == "ipvs_fleet_batch_master"
    assert batch(hv(**read("10.0.9.12")), "lvs-b") == "ipvs_fleet_batch_backup"
    # unread: last (site.yml refuses it; the rollback takes it after the backups)
    assert batch(hv(**read(rc=1)), "lvs-b") == "ipvs_fleet_batch_master"


def test_problems_split_brain_no_master_unread(f):
    problems = f.FilterModule().filters()["ipvs_fleet_domain_problems"]
    ok = {"lvs-a": hv(**read("10.0.9.100")), "lvs-b": hv(**read()), "n1": {}}
    assert problems(ok, ["lvs-a", "lvs-b", "n1"]) == []
    split = {"lvs-a": hv(**read("10.0.9.100")), "lvs-b": hv(**read("10.0.9.100"))}
    assert "split brain: lvs-a, lvs-b" in problems(split, ["lvs-a", "lvs-b"])[0]
    none = {"lvs-a": hv(**read()), "lvs-b": hv(**read())}
    assert "no member holds" in problems(none, ["lvs-a", "lvs-b"])[0]
    unread = {"lvs-a": hv(**read(rc=1)), "lvs-b": hv(**read("10.0.9.100"))}
    assert (
        "lvs-a: reading keepalived.conf failed (exit 1): boom"
        in problems(unread, ["lvs-a", "lvs-b"])[0]
    )


def test_bad_failure_domain_is_a_filter_error_naming_the_host(f):
    batch = f.FilterModule().filters()["ipvs_fleet_pair_batch"]
    with pytest.raises(
        f.AnsibleFilterError, match=r"host lvs-a: ipvs_failure_domain: must be a name"
    ):
        batch(hv(domain=["pair"]), "lvs-a")
