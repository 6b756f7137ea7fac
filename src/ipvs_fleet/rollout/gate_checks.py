"""Child process of the rollout gate: run the fleet checks on some hosts, write results JSON.

    python -m ipvs_fleet.rollout.gate_checks --inventory INV --limit h1,h2 --out F [-- ARGS]

Kept apart from the controller so that pytest (which the checks run on) starts clean each
time and a hung check can be killed without killing the rollout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ipvs_fleet.errors import FleetError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ipvs_fleet.rollout.gate_checks")
    p.add_argument("--inventory", required=True)
    p.add_argument("--limit", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("extra", nargs="*")
    args = p.parse_args(argv)
    from ipvs_fleet.compliance.runner import run_checks

    try:
        results = run_checks(args.inventory, [args.limit], extra_args=args.extra).results
    except FleetError as e:
        print(f"gate: {e}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps([r.to_dict() for r in results], default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
