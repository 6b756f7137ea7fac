"""Write docs/ansible.md's variable tables from the role's defaults/main.yml and the policy.

    .venv/bin/python docs/gen_ansible.py          # rewrite docs/ansible.md
    .venv/bin/python docs/gen_ansible.py --check  # exit 1 if it is out of date

Only the part between the GENERATED markers is rewritten; the rest of the page is prose.
A `# ---- Title` line in defaults/main.yml starts a section; the comment lines right above
a variable describe it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = REPO / "roles/ipvs_fleet/defaults/main.yml"
PAGE = REPO / "docs" / "ansible.md"
BEGIN = "<!-- GENERATED from roles/ipvs_fleet/defaults/main.yml by docs/gen_ansible.py -->"
END = "<!-- END GENERATED -->"
# Host data the policy reads (src/ipvs_fleet/policy.py HOST_KEYS), set in inventory or
# group_vars, never in the role's defaults (a default class would hide a missing one).
HOST_DATA = {
    "ipvs_host_class": "the host's class, a key of host_classes (required)",
    "ipvs_sysctls": "`{key: value}` merged over the class's `net.ipv4.vs.*` values",
    "ipvs_latency_budget": "merged over the class's latency budget (the checks read it)",
    "ipvs_activation": "`reload` (load the fix module live, IPVS never unloaded), `reboot` or "
    "`next-boot`, over the class's activation",
    "ipvs_allow_reuse_with": "a stated reason to allow knob=1 on a host that uses FTP or connmark",
    "ipvs_install": "`artifact` only in the role; `dkms` (build on the host) is the pyinfra "
    "deploy's, and the role refuses it by name",
    "ipvs_pre_activate": "drain hook(s): a shell command or a list, run in order right before an "
    "activation that changes something (the fix module loaded or unloaded, or a reboot; over "
    "the class's `pre_activate`); a failing one fails the host, its modules as they were",
    "ipvs_post_activate": "shell command(s) run right after that activation (over the class's "
    "`post_activate`)",
    "ipvs_lock_wait_seconds": "how long install, configure, activation and removal wait for the "
    "host lock another controller holds, then fail naming the holder (over the class's "
    "`lock_wait_seconds`, 300)",
}


def tables(text: str) -> str:
    """Markdown tables of the role's variables, one per `# ---- Section`, then host data."""
    defaults = yaml.safe_load(text) or {}
    out: list[str] = []
    comments: list[str] = []
    for line in text.splitlines():
        section = re.match(r"^# ---- (.+)$", line)
        var = re.match(r"^([a-z_][a-z0-9_]*):", line)
        if section:
            out += [
                "",
                f"### {section.group(1).strip()}",
                "",
                "| variable | default | meaning |",
                "|---|---|---|",
            ]
            comments = []
        elif line.startswith("#"):
            comments.append(line.lstrip("#").strip())
        elif var:
            name = var.group(1)
            value = defaults[name]
            if not isinstance(value, str):
                value = yaml.safe_dump(value, default_flow_style=True, width=1000)
                value = value.strip().removesuffix("...").strip()
            default = value.replace("|", "\\|")
            out.append(f"| `{name}` | `{default}` | {' '.join(comments)} |")
            comments = []
        else:
            comments = []
    out += ["", "### Host data (inventory or group_vars)", "", "| variable | meaning |"]
    out += ["|---|---|"]
    out += [f"| `{k}` | {v} |" for k, v in HOST_DATA.items()]
    return "\n".join(out).strip() + "\n"


def render(page: str, text: str) -> str:
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{PAGE}: needs the markers {BEGIN!r} and {END!r}")
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{tables(text)}{END}{tail}"


def main(argv: list[str]) -> int:
    page = PAGE.read_text()
    new = render(page, DEFAULTS.read_text())
    if "--check" in argv:
        if new != page:
            print(f"{PAGE} is out of date: run .venv/bin/python docs/gen_ansible.py")
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
