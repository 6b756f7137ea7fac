"""`ipvs-fleet probe connect|serve|scenario|plot|budget`.

connect/serve are probe.py's own commands (standard library, also runnable as a copied file);
scenario runs the reuse scenarios in a lab VM; plot draws latency CDFs; budget checks a probe
result against a host class's latency budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ipvs_fleet.cliopts import add_alias, add_json
from ipvs_fleet.errors import ConfigError, FleetError
from ipvs_fleet.probe import probe
from ipvs_fleet.probe.cells import BACKENDS, CLIENTS, FAMILIES, RULESETS


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "probe",
        help="short-connection latency probe and the reuse scenarios",
        description="Measure short connections through an IPVS virtual service.",
    )
    sub = p.add_subparsers(dest="probe_command", required=True)
    probe.add_arguments(sub, alias=add_alias)

    s = sub.add_parser("scenario", help="run the reuse scenarios in a lab VM (JSON out)")
    s.add_argument("--lab-dir", type=Path, help="lab dir (default: $IPVS_FLEET_LAB_DIR)")
    s.add_argument("--host", required=True, help="lab host, e.g. k8s-canary")
    s.add_argument(
        "--modules",
        choices=("stock", "module", "patched", "loaded"),
        default="loaded",
        help="first load the stock IPVS modules, or the built fix module "
        "ip_vs_reuse on top of them (module; patched: its old name); IPVS stays "
        "loaded (default: keep what is loaded)",
    )
    s.add_argument(
        "--artifacts",
        type=Path,
        default=Path("artifacts"),
        help="artifacts dir of 'ipvs-fleet build' (for --modules module)",
    )
    s.add_argument(
        "--rule",
        choices=("drop", "accept"),
        default="drop",
        help="INVALID rule in the director's FORWARD chain",
    )
    s.add_argument("--knob", type=int, choices=(0, 1), help="conn_reuse_old_conntrack")
    s.add_argument(
        "--sysctl",
        action="append",
        default=[],
        metavar="NAME=INT",
        help="another net.ipv4.vs sysctl of the director netns, e.g. conn_lfactor=4 (repeatable)",
    )
    s.add_argument(
        "--ruleset",
        choices=RULESETS,
        default="minimal",
        help="the director's rules: minimal (one FORWARD rule), kube-proxy (its "
        "IPVS-mode chains, ipsets and mark-based masquerade), kube-proxy-masq-all, "
        "calico (kube-proxy plus felix-style chains)",
    )
    s.add_argument("--iptables", choices=BACKENDS, default="nft", help="iptables backend")
    s.add_argument(
        "--client",
        choices=CLIENTS,
        default="outside",
        help="outside (to a NodePort), pod (to a ClusterIP), host (a process on "
        "the node: IPVS's LOCAL_OUT path)",
    )
    s.add_argument("--family", type=int, choices=FAMILIES, default=4)
    s.add_argument(
        "--scenarios",
        default="A=50,B=50,B2=50,C1=50,C2=50",
        help="NAME=COUNT,... (A, B, B2, C1, C2; U: UDP)",
    )
    s.add_argument("--ordinary", type=int, default=0, help="ordinary short connections")
    s.add_argument("--ftp", action="store_true", help="passive FTP through ip_vs_ftp")
    s.add_argument("--conntrack", action="store_true", help="conntrack view after a reuse")
    add_json(s, "write the JSON result here (default: stdout)", old=("-o", "--output"))
    s.set_defaults(func=_cmd_scenario)

    pl = sub.add_parser("plot", help="latency CDF (PNG) from probe/scenario JSON")
    pl.add_argument("inputs", nargs="+", type=Path)
    pl.add_argument("-o", "--output", type=Path, required=True)
    pl.add_argument("--scenario", help="only this scenario (A, B, ..., ordinary)")
    pl.add_argument("--title")
    pl.set_defaults(func=_cmd_plot)

    b = sub.add_parser("budget", help="check a probe result against a host class's budget")
    b.add_argument("input", type=Path)
    b.add_argument("--host-class", required=True)
    b.set_defaults(func=_cmd_budget)


def parse_counts(text: str) -> dict[str, int]:
    """`A=200,B=200` -> {"A": 200, "B": 200}."""
    out: dict[str, int] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, eq, n = part.partition("=")
        if not eq or not n.isdigit():
            raise ConfigError(f"--scenarios: {part!r} is not NAME=COUNT")
        out[name] = int(n)
    return out


def parse_sysctls(items: list[str]) -> dict[str, int]:
    """[`conn_lfactor=4`] -> {"conn_lfactor": 4}."""
    out: dict[str, int] = {}
    for item in items:
        name, eq, value = item.partition("=")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            eq = ""
        if not eq:
            raise ConfigError(f"--sysctl: {item!r} is not NAME=INT")
    return out


def _cmd_scenario(args: argparse.Namespace) -> int:
    from ipvs_fleet.lab.lab import Lab
    from ipvs_fleet.probe.harness import Guest, Plan, summarize

    # bad input is refused before the host is touched
    plan = Plan(
        rule=args.rule,
        knob=args.knob,
        scenarios=parse_counts(args.scenarios),
        ordinary=args.ordinary,
        ftp=args.ftp,
        conntrack_check=args.conntrack,
        ruleset=args.ruleset,
        iptables=args.iptables,
        client=args.client,
        family=args.family,
        ipvs_sysctls=parse_sysctls(args.sysctl),
    )
    guest = Guest(Lab(args.lab_dir), args.host)
    if args.modules == "stock":
        guest.load_modules(None)
    elif args.modules in ("module", "patched"):
        from ipvs_fleet.build.artifact import load_artifact

        guest.load_modules(load_artifact(args.artifacts, guest.kernel_release))
    result = guest.run_plan(plan)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        for name, row in summarize(result).items():
            print(f"{name:<9} " + " ".join(f"{k}={v}" for k, v in row.items()))
    else:
        print(text)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from ipvs_fleet.probe.plot import plot_files

    n = plot_files(args.inputs, args.output, args.scenario, args.title)
    print(f"{args.output}: {n} curves")
    return 0


def _cmd_budget(args: argparse.Namespace) -> int:
    from ipvs_fleet.policy import load_policy

    policy = load_policy()
    if args.host_class not in policy.classes:
        known = ", ".join(sorted(policy.classes))
        raise ConfigError(f"unknown host class {args.host_class!r} (known: {known})")
    try:
        result = json.loads(args.input.read_text())
    except (OSError, ValueError) as e:
        raise FleetError(f"{args.input}: {e}") from e
    budget = policy.classes[args.host_class]["latency_budget"]
    violations = probe.evaluate_budget(result, budget)
    for v in violations:
        print(v, file=sys.stderr)
    print("within budget" if not violations else f"{len(violations)} budget violations")
    return 1 if violations else 0
