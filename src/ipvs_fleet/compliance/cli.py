"""`ipvs-fleet check`: are the inventory's hosts what their host class wants?"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ipvs_fleet.cliopts import add_json
from ipvs_fleet.compliance.model import ERROR, exit_code
from ipvs_fleet.compliance.render import summary, write_outputs
from ipvs_fleet.compliance.runner import run_checks
from ipvs_fleet.compliance.session import open_session
from ipvs_fleet.compliance.waivers import apply_waivers, check_names, load_waivers

EPILOG = """\
exit codes:
  0  compliant: every check passed (or failed under a valid waiver)
  1  not compliant: at least one check failed; the summary names host, check, expected
     and actual, and the command that converges the host
  2  could not check: unreachable host, bad or missing inventory, policy or waivers file
     (2 wins over 1: a run with an unchecked host is not a complete answer)

waivers file (YAML):
  waivers:
    - host: lab-2            # or group: <inventory group>
      check: patched_module  # a check name from the summary
      justification: why this is accepted for now
      expires: 2026-12-31    # after this day the failure counts again
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check",
        help="check hosts against their host class (CI-friendly reports)",
        description="Run the compliance checks (checks/, pytest-testinfra) against an "
        "inventory and report per host class.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inventory", type=Path, help="pyinfra inventory file (inventory/<env>.py)")
    p.add_argument("--limit", action="append", help="hosts or groups, comma-separated")
    p.add_argument("--policy", type=Path, help="host-class policy file (default: the role's)")
    p.add_argument("--junitxml", type=Path, help="write JUnit XML (a testcase per host/check)")
    add_json(p, "write results as JSON", dest="json_path")
    p.add_argument("--report", type=Path, help="write a Markdown (.md) or HTML (.html) report")
    p.add_argument("--waivers", type=Path, help="waivers YAML file")
    p.add_argument(
        "--swap-within", type=int, metavar="SECONDS",
        help="also compare each host's live IPVS table with its last module swap's record, "
        "if that swap finished less than SECONDS ago (as the rollout gate does)",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Everything that can be wrong before touching a host is checked first: exit 2, one line.
    waivers = load_waivers(args.waivers) if args.waivers else []
    open_session(args.inventory, args.limit, args.policy)
    extra = [] if args.swap_within is None else ["--swap-within", str(args.swap_within)]
    results, wall = run_checks(args.inventory, args.limit, args.policy, extra_args=extra)
    check_names(waivers, {r.check for r in results})
    unused = apply_waivers(results, waivers)
    write_outputs(
        results,
        args.inventory,
        junitxml=args.junitxml,
        json_path=args.json_path,
        report=args.report,
        unused=unused,
        wall=wall,
    )
    print(summary(results, args.inventory, unused, wall))
    code = exit_code(results)
    unreachable = sorted({r.host for r in results if r.status == ERROR})
    if unreachable:
        print(f"ipvs-fleet: could not check: {', '.join(unreachable)}", file=sys.stderr)
    return code
