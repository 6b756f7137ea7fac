"""Summary, exit codes, JSON, Markdown and HTML rendering of check results (the JUnit file
is pytest's own: test_compliance_plugin)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from ipvs_fleet.compliance import render
from ipvs_fleet.compliance.model import (
    COMPLIANT,
    COULD_NOT_CHECK,
    ERROR,
    FAILED,
    NOT_COMPLIANT,
    PASSED,
    WAIVED,
    CheckResult,
    Drift,
    exit_code,
)
from ipvs_fleet.compliance.waivers import parse_waivers

INV = "inventory/prod.py"


def fleet(**overrides: str) -> list[CheckResult]:
    """Two k8s nodes and an ftp director, two checks each; overrides: 'host/check' -> status."""
    out = []
    for host, cls in (("k8s-1", "k8s_node"), ("k8s-2", "k8s_node"), ("ftp-1", "ftp")):
        for check in ("patched_module", "sysctls"):
            status = overrides.get(f"{host}/{check}", PASSED)
            r = CheckResult(host, check, status, cls, (f"{cls}s",), duration=0.25)
            if status == FAILED:
                r.message = "sysctls differ\n  net.ipv4.vs.conntrack: expected 1, actual 0"
                r.drift = [Drift("net.ipv4.vs.conntrack", "1", "0")]
            if status == ERROR:
                r.message = "HostUnreachable: 127.0.0.1:2203: Connection refused"
            if status == WAIVED:
                r.message = "stock module loaded: ip_vs"
                r.waiver = {"justification": "TICKET-7", "expires": "2026-12-31"}
            out.append(r)
    return out


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({}, COMPLIANT),
        ({"k8s-2/patched_module": WAIVED}, COMPLIANT),
        ({"k8s-2/sysctls": FAILED}, NOT_COMPLIANT),
        ({"ftp-1/sysctls": ERROR}, COULD_NOT_CHECK),
        ({"k8s-2/sysctls": FAILED, "ftp-1/sysctls": ERROR}, COULD_NOT_CHECK),
    ],
)
def test_exit_codes(overrides: dict[str, str], code: int) -> None:
    assert exit_code(fleet(**overrides)) == code


def test_no_results_means_could_not_check() -> None:
    assert exit_code([]) == COULD_NOT_CHECK


def test_summary_per_class_names_host_key_expected_actual_and_converge_command() -> None:
    text = render.summary(fleet(**{"k8s-2/sysctls": FAILED}), INV)
    assert "k8s_node: 1/2 hosts compliant" in text
    assert "ftp: 1/1 hosts compliant" in text
    assert "k8s-2 / sysctls: FAILED" in text
    assert "net.ipv4.vs.conntrack: expected 1, actual 0" in text
    assert "pyinfra -y inventory/prod.py deploy.py --limit k8s-2" in text
    assert text.rstrip().endswith("NOT compliant (exit 1): 6 checks on 3 hosts, 5 passed, 1 failed")


def test_summary_lists_waivers_and_says_unreachable_once() -> None:
    results = fleet(
        **{"k8s-1/patched_module": WAIVED, "ftp-1/patched_module": ERROR, "ftp-1/sysctls": ERROR}
    )
    text = render.summary(results, INV)
    assert "k8s-1 / patched_module: waived until 2026-12-31 (TICKET-7)" in text
    assert text.count("Connection refused") == 1
    assert "ftp-1: could not check (2 checks)" in text


def test_json_has_classes_results_and_converge() -> None:
    doc = render.to_json(fleet(**{"k8s-2/sysctls": FAILED}), INV, wall=3.2)
    assert doc["exit_code"] == 1
    assert doc["classes"]["k8s_node"] == {
        "compliant": ["k8s-1"],
        "not_compliant": ["k8s-2"],
        "not_checked": [],
    }
    failed = [r for r in doc["results"] if r["status"] == FAILED]
    assert failed[0]["drift"] == [{"key": "net.ipv4.vs.conntrack", "expected": "1", "actual": "0"}]
    assert failed[0]["converge"].endswith("--limit k8s-2")
    json.dumps(doc)


def test_markdown_and_html_reports(tmp_path: Path) -> None:
    results = fleet(**{"k8s-2/sysctls": FAILED})
    results[0].details["probe"] = {
        "slow_ms": 900,
        "attempts": [{"total_ms": 5.0 + i, "error": None} for i in range(20)],
    }
    md = tmp_path / "report.md"
    render.write_outputs(results, INV, report=md)
    text = md.read_text()
    assert "| net.ipv4.vs.conntrack | 1 | 0 |" in text
    assert "![k8s-1 latency CDF](report-k8s-1.png)" in text
    assert (tmp_path / "report-k8s-1.png").read_bytes()[:4] == b"\x89PNG"
    page = render.html_report(results, INV)
    assert "data:image/png;base64," in page and "NOT compliant" in page


def test_html_report_from_its_template_escaped() -> None:
    results = fleet(
        **{"k8s-2/sysctls": FAILED, "k8s-1/patched_module": WAIVED, "ftp-1/sysctls": ERROR}
    )
    results[3].message = "<script>x</script> & more"
    unused = parse_waivers(
        [{"host": "h9", "check": "taint", "justification": "j", "expires": "2030-01-01"}], "w.yml"
    )
    page = render.html_report(results, "inv/<prod>.py", unused, 3.25)
    assert page.startswith("<!doctype html><meta charset=utf-8><title>IPVS fleet compliance")
    assert "<h1>IPVS fleet compliance: could not check</h1>" in page
    assert "<p>Inventory <code>inv/&lt;prod&gt;.py</code>, exit code 2, 3.2 s</p>" in page
    assert (
        "<tr><td>k8s-2</td><td>k8s_node</td><td style='color:#2e7d32'>passed</td>"
        "<td style='color:#c62828'>failed</td></tr>" in page
    )
    assert "<h3>k8s-2 / sysctls: failed</h3>" in page
    assert "<tr><td>net.ipv4.vs.conntrack</td><td>1</td><td>0</td></tr>" in page
    assert "&lt;script&gt;x&lt;/script&gt; &amp; more" in page and "<script>" not in page
    assert "<p>Waiver until 2026-12-31: TICKET-7</p>" in page
    assert ": pyinfra -y inv/&lt;prod&gt;.py deploy.py --limit k8s-2</code></p>" in page
    assert "<p>Unused waiver w.yml: waivers[0] (host h9): taint</p>" in page
    assert "ftp-1 / sysctls: error" in page and "k8s-1 / sysctls" not in page


def test_every_check_has_its_fix_and_a_taint_is_not_fixed_by_the_deploy() -> None:
    checks_src = (Path(__file__).resolve().parents[2] / "checks" / "test_ipvs_host.py").read_text()
    checks = set(re.findall(r"^def test_(\w+)\(", checks_src, re.M))
    assert checks == set(yaml.safe_load(render.FIXES_FILE.read_text()))
    failed = [
        CheckResult("k8s-2", "taint", FAILED, "k8s_node", message="tainted"),
        CheckResult("k8s-1", "sysctls", FAILED, "k8s_node", message="differ"),
        CheckResult("k8s-3", "sysctl_table", FAILED, "k8s_node", message="broken"),
    ]
    doc = render.to_json(failed, INV)
    fixes = {r["host"]: r for r in doc["results"]}
    assert "boots again" in fixes["k8s-2"]["fix"] and fixes["k8s-2"]["converge"] is None
    assert fixes["k8s-1"]["fix"].endswith("deploy.py --limit k8s-1")
    text = render.summary(failed, INV)
    assert "k8s-3 / sysctl_table: a loaded module's sysctl table is broken" in text
    assert "deploy/rollback.py --limit k8s-3" in text
    # activation never unloads IPVS: no fix asks for a module swap or an IPVS reload
    texts = " ".join(yaml.safe_load(render.FIXES_FILE.read_text()).values()).lower()
    assert "swap" not in texts and "stock modules" not in texts
