"""`ipvs-fleet check`: are the inventory's hosts what their host class wants?"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ipvs_fleet.cliopts import add_json
from ipvs_fleet.compliance.model import ERROR
from ipvs_fleet.compliance.remote import COMMAND_TIMEOUT, positive_seconds
from ipvs_fleet.compliance.render import summary, write_outputs
from ipvs_fleet.compliance.runner import run_checks

EPILOG = """\
exit codes:
  the same as: pytest <checks> --inventory INV [--limit ...] [--waivers FILE], whose exit
  status is this verdict (a usage error there is pytest's 4, here 2):
  0  compliant: every check passed (or failed under a valid waiver: pytest's xfailed)
  1  not compliant: at least one check failed; the summary names host, check, expected
     and actual, and the command that converges the host
  2  could not check: unreachable or hung host (no answer within --command-timeout), bad
     or missing inventory, policy or waivers file
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
    p.add_argument(
        "--junitxml",
        type=Path,
        help="write pytest's JUnit XML (xunit2: a testcase per host/check, with "
        "host, host_class, check, drift and fix properties; waived = xfailed)",
    )
    add_json(p, "write results as JSON", dest="json_path")
    p.add_argument("--report", type=Path, help="write a Markdown (.md) or HTML (.html) report")
    p.add_argument("--waivers", type=Path, help="waivers YAML file")
    p.add_argument(
        "--command-timeout",
        type=positive_seconds,
        default=COMMAND_TIMEOUT,
        metavar="SECONDS",
        help="bound of each remote command, the latency probe included (keep it "
        "above the probe's 40 s deadline); a host whose command gets no answer in "
        "time is 'could not check', the others are checked (default "
        f"{COMMAND_TIMEOUT:g})",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """pytest on the checks with these options (the verdict is its exit status), then reports.

    Bad options, inventory, policy or waivers are pytest usage errors (exit 2 here), raised
    before any host is contacted.
    """
    extra = ["--waivers", str(args.waivers)] if args.waivers else []
    if args.junitxml:
        extra += ["--junitxml", str(args.junitxml)]
    run_ = run_checks(
        args.inventory,
        args.limit,
        args.policy,
        extra_args=extra,
        command_timeout=args.command_timeout,
    )
    results, unused, wall = run_.results, run_.unused, run_.wall
    write_outputs(
        results,
        args.inventory,
        json_path=args.json_path,
        report=args.report,
        unused=unused,
        wall=wall,
    )
    print(summary(results, args.inventory, unused, wall))
    unreachable = sorted({r.host for r in results if r.status == ERROR})
    if unreachable:
        print(f"ipvs-fleet: could not check: {', '.join(unreachable)}", file=sys.stderr)
    return run_.exit_code
