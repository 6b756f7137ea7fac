"""The latency check's probe plan: what it asks of the private netns, from the host's facts."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ipvs_fleet.compliance import latency


def _plan(sysctls: dict[str, Any], max_slow: int | None = 0) -> dict[str, Any]:
    target: Any = SimpleNamespace(settings=SimpleNamespace(latency_budget={"max_slow": max_slow}))
    facts: Any = SimpleNamespace(sysctls=sysctls)
    return latency.plan_for(target, facts)


def test_a_kernel_with_a_resizable_table_gets_a_probe_netns_that_does_not_grow() -> None:
    # 7.2: conn_lfactor exists; the probe's 100 reconnects must not cross its growth points
    plan = _plan({"conn_reuse_old_conntrack": 1, "conn_lfactor": -2})
    assert plan["ipvs_sysctls"] == {"conn_lfactor": 4}
    assert plan["scenarios"] == {latency.SCENARIO: latency.COUNT_STRICT}
    assert "conn_lfactor=4" in latency.describe({"plan": plan})


def test_a_kernel_without_the_sysctl_is_asked_for_none() -> None:
    # 5.10 to 6.12: the probe refuses a sysctl its netns lacks, so none is asked for
    plan = _plan({"conn_reuse_old_conntrack": 1})
    assert "ipvs_sysctls" not in plan
    assert "conn_lfactor" not in latency.describe({"plan": plan})
