"""pyinfra facts about a host's IPVS stack: what is loaded, installed, set and in use."""

from __future__ import annotations

import re
import shlex
from typing import Any

from pyinfra.api import FactBase, QuoteString, StringCommand

from ipvs_fleet.kernel import MODINFO_REUSE, MODINFO_SET, MODULE_NAME
from ipvs_fleet.paths import DKMS_TREE, UPDATES_SUBDIR

# Custom modinfo fields that the fix module carries (see src/ipvs_fleet/kernel).
PATCHSET_FIELD = MODINFO_SET
REUSE_FIELD = MODINFO_REUSE


def updates_dir(kernel_release: str) -> str:
    return f"/lib/modules/{kernel_release}/{UPDATES_SUBDIR}"


class IpvsLoadedModules(FactBase[dict[str, dict[str, Any]]]):
    """
    The loaded IPVS modules (ip_vs*, xt_ipvs) and whether each is the build installed in
    updates/ipvs-fleet (the fix module ip_vs_reuse; the distro's own have taint "").

    .. code:: python

        {
            "ip_vs": {"version": None, "taint": "", "patched": False, ...},
            "ip_vs_reuse": {
                "version": "3.0+dcf6fb2558d2", "taint": "OE",
                "patched": True, "patchset": "3.0+dcf6fb2558d2", "reuse": "prekill",
            },
        }
    """

    default = dict

    def command(self) -> str:
        # sysfs describes the loaded code; modinfo on a name would describe the file that
        # modprobe would pick instead. Debian kernels publish no srcversion, so the patched
        # module carries MODULE_VERSION(<set id>), shown in /sys/module/<m>/version.
        # Shell builtins read sysfs and one modinfo reads every installed file of a loaded
        # module: a process start is the cost that counts on a busy host (about 50 ms of
        # CPU each under QEMU TCG; the former cat/modinfo per module and field made ~120).
        return (
            "read -r kr < /proc/sys/kernel/osrelease; "
            'u="/lib/modules/$kr/' + UPDATES_SUBDIR + '"; set --; '
            "for d in /sys/module/ip_vs /sys/module/ip_vs_* /sys/module/xt_ipvs; do "
            '[ -d "$d" ] || continue; m=${d##*/}; v=; sv=; t=; '
            '[ -r "$d/version" ] && read -r v < "$d/version"; '
            '[ -r "$d/srcversion" ] && read -r sv < "$d/srcversion"; '
            '[ -r "$d/taint" ] && read -r t < "$d/taint"; '
            'echo "loaded|$m|${v:--}|${sv:--}|${t:--}"; '
            '[ -f "$u/$m.ko" ] && set -- "$@" "$u/$m.ko"; done; '
            '[ $# -gt 0 ] && modinfo -- "$@"; true'
        )

    def process(self, output: list[str]) -> dict[str, dict[str, Any]]:
        loaded: list[list[str | None]] = []
        files: dict[str, dict[str, str]] = {}  # installed module name -> modinfo fields
        fields: dict[str, str] = {}
        for line in output:
            if line.startswith("loaded|"):
                parts = line.strip().split("|")
                if len(parts) == 5:
                    loaded.append([None if p == "-" else p for p in parts[1:]])
                continue
            key, sep, value = line.partition(":")
            if not sep:
                continue
            key, value = key.strip(), value.strip()
            if key == "filename":
                fields = files.setdefault(value.rsplit("/", 1)[-1].removesuffix(".ko"), {})
            elif key in ("version", "srcversion", PATCHSET_FIELD, REUSE_FIELD):
                fields.setdefault(key, value)
        mods: dict[str, dict[str, Any]] = {}
        for name, v, sv, taint in loaded:
            assert name is not None
            f = files.get(name, {})
            uv, usv = f.get("version"), f.get("srcversion")
            patched = bool((v and v == uv) or (sv and sv == usv))
            mods[name] = {
                "version": v,
                "srcversion": sv,
                "taint": taint or "",
                "patched": patched,
                "patchset": (f.get(PATCHSET_FIELD) or None) if patched else None,
                "reuse": (f.get(REUSE_FIELD) or None) if patched else None,
            }
        return mods


def _in_indexed_updates(kernel_release: str, listing: str) -> StringCommand:
    """Run `listing` in our updates dir; print depmod-missing first unless depmod indexed it.

    An install cut off between copying the files and its depmod must count as absent, so
    that the next run installs again instead of trusting files modprobe cannot see.
    """
    dep = f"/lib/modules/{kernel_release}/modules.dep"
    return StringCommand(
        "grep -q",
        QuoteString(f"^{UPDATES_SUBDIR}/{MODULE_NAME}.ko"),
        QuoteString(dep),
        "2>/dev/null || echo depmod-missing;",
        "cd",
        QuoteString(updates_dir(kernel_release)),
        "2>/dev/null &&",
        listing,
    )


def _depmod_missing(output: list[str]) -> bool:
    return any(line.strip() == "depmod-missing" for line in output)


class IpvsInstalledModules(FactBase[dict[str, str]]):
    """
    sha256 of each module file installed by ipvs-fleet for a kernel release; {} unless
    depmod has indexed them too (an install cut off before its depmod counts as absent).

    .. code:: python

        {"ip_vs_reuse.ko": "3f5c..."}
    """

    default = dict

    def command(self, kernel_release: str) -> StringCommand:
        return _in_indexed_updates(kernel_release, "sha256sum -- *.ko 2>/dev/null || true")

    def process(self, output: list[str]) -> dict[str, str]:
        if _depmod_missing(output):
            return {}
        out = {}
        for line in output:
            m = re.match(r"^([0-9a-f]{64})\s+\*?(\S+)$", line.strip())
            if m:
                out[m.group(2)] = m.group(1)
        return out


class IpvsInstalledSet(FactBase[dict[str, str]]):
    """
    The set id (module info `ipvs_fleet`) of each module installed by ipvs-fleet for a
    kernel release; {} unless depmod has indexed them (as IpvsInstalledModules).

    .. code:: python

        {"ip_vs_reuse.ko": "3.0+dcf6fb2558d2"}
    """

    default = dict

    def command(self, kernel_release: str) -> StringCommand:
        return _in_indexed_updates(
            kernel_release,
            # one modinfo for the whole set (a process per file costs on a busy host)
            'set -- *.ko; [ -f "$1" ] && modinfo -- "$@"; true',
        )

    def process(self, output: list[str]) -> dict[str, str]:
        if _depmod_missing(output):
            return {}
        out: dict[str, str] = {}
        current = None
        for line in output:
            key, sep, value = line.partition(":")
            if not sep:
                continue
            key, value = key.strip(), value.strip()
            if key == "filename":
                current = value.rsplit("/", 1)[-1]
                out[current] = ""
            elif key == PATCHSET_FIELD and current is not None:
                out[current] = value
        return out


class DkmsVersions(FactBase[list[str]]):
    """Versions of the ipvs-fleet DKMS package registered on the host (build mode)."""

    default = list

    def command(self) -> str:
        return f'for d in {DKMS_TREE}/*/; do [ -d "$d" ] && basename "$d"; done; true'

    def process(self, output: list[str]) -> list[str]:
        return sorted(
            v.strip()
            for v in output
            if v.strip() and v.strip() != "original_module" and not v.startswith("kernel-")
        )


class ManagedFile(FactBase[dict[str, Any]]):
    """
    A file the deploy manages and its rollback record, in one command (pyinfra's File,
    Directory and Sha256File facts cost a command each, about 0.15 s under TCG): whether the
    backup or its `.absent` note exists, whether the file exists, and a regular file's
    mode and sha256 (the sum the role's state probe and the staged copy's check use too).

    .. code:: python

        {"backup": True, "absent": False, "exists": True, "mode": "644", "sha256": "9f0c..."}
    """

    def command(self, path: str, backup: str) -> str:
        return (
            f"f={shlex.quote(path)}; b={shlex.quote(backup)}; "
            '{ [ -e "$b" ] || [ -L "$b" ]; } && echo backup=yes; '
            '{ [ -e "$b.absent" ] || [ -L "$b.absent" ]; } && echo absent=yes; '
            '{ [ -e "$f" ] || [ -L "$f" ]; } && echo exists=yes; '
            '[ -f "$f" ] && [ ! -L "$f" ] && echo "mode=$(stat -c %a "$f")" '
            '"sha256=$(sha256sum < "$f" | cut -d" " -f1)"; true'
        )

    @staticmethod
    def default() -> dict[str, Any]:
        """No output: neither record nor file (pyinfra skips `process` then)."""
        return {"backup": False, "absent": False, "exists": False, "mode": None, "sha256": None}

    def process(self, output: list[str]) -> dict[str, Any]:
        words = dict(w.partition("=")[::2] for line in output for w in line.split())
        return {
            "backup": words.get("backup") == "yes",
            "absent": words.get("absent") == "yes",
            "exists": words.get("exists") == "yes",
            "mode": words.get("mode"),
            "sha256": words.get("sha256"),
        }


class IpvsSysctls(FactBase[dict[str, int | list[int]]]):
    """
    The live net.ipv4.vs.* values of the host's initial network namespace ({} when
    ip_vs is not loaded).

    .. code:: python

        {"conn_reuse_mode": 1, "conn_reuse_old_conntrack": 1, "sync_threshold": [3, 50]}
    """

    default = dict

    def command(self) -> str:
        # One process for all keys (a process per key costs seconds on a loaded TCG guest);
        # shell `read` is no good here: dash reads byte by byte and proc sysctls end at
        # the first short read.
        return "grep -H '' /proc/sys/net/ipv4/vs/* 2>/dev/null; true"

    def process(self, output: list[str]) -> dict[str, int | list[int]]:
        out: dict[str, int | list[int]] = {}
        for line in output:
            path, sep, value = line.partition(":")
            if not sep:
                continue
            key = path.rsplit("/", 1)[-1]
            parts = value.split()
            if parts and all(re.fullmatch(r"-?\d+", p) for p in parts):
                ints = [int(p) for p in parts]
                out[key] = ints[0] if len(ints) == 1 else ints
        return out


class IpvsUsage(FactBase[dict[str, Any]]):
    """
    What on the host depends on conntrack staying tied to its real server, and the ruleset
    shapes a reuse design can be unsafe with (kernel/reuse_designs.yml): a conntrack
    INVALID-drop rule, and nat-table rules (they run only for a connection's first packet,
    as kube-proxy's masquerade mark does). Each shape comes with the first rule found.

    .. code:: python

        {"ftp": False, "ftp_reason": None, "connmark": False, "connmark_reason": None,
         "invalid_drop": True,
         "invalid_drop_rule": "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
         "nat_rule": "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"}
    """

    def command(self) -> str:
        return (
            "echo '## lsmod'; cat /proc/modules 2>/dev/null | cut -d' ' -f1; "
            # ipvsadm would load ip_vs on a host that has none: ask only when it is loaded.
            "echo '## ipvsadm'; [ -e /proc/net/ip_vs ] && ipvsadm -Ln 2>/dev/null; "
            "echo '## iptables'; (iptables-save 2>/dev/null; ip6tables-save 2>/dev/null); "
            "echo '## nft'; nft list ruleset 2>/dev/null; true"
        )

    def process(self, output: list[str]) -> dict[str, Any]:
        section = ""
        sections: dict[str, list[str]] = {}
        for line in output:
            if line.startswith("## "):
                section = line[3:].strip()
                continue
            sections.setdefault(section, []).append(line)
        modules = {m.strip() for m in sections.get("lsmod", [])}
        ftp_reason = None
        if "ip_vs_ftp" in modules:
            ftp_reason = "ip_vs_ftp is loaded"
        for line in sections.get("ipvsadm", []):
            if re.match(r"^(TCP|SCTP)\s+\S+:(21|ftp)\s", line.strip()):
                ftp_reason = f"FTP virtual service: {line.split()[1]}"
                break
        rules = sections.get("iptables", []) + sections.get("nft", [])
        connmark_reason = None
        invalid_drop_rule = None
        for line in rules:
            low = line.lower()
            if re.search(r"connmark|ct mark|-m state\b|\bmeta mark set ct mark", low):
                connmark_reason = connmark_reason or f"rule: {line.strip()}"
            if re.search(r"(--ctstate|--state|ct state) invalid\b.*(-j drop|\bdrop\b)", low):
                invalid_drop_rule = invalid_drop_rule or line.strip()
        nat_rule = _nat_rule(sections.get("iptables", []), sections.get("nft", []))
        return {
            "ftp": ftp_reason is not None,
            "ftp_reason": ftp_reason,
            "connmark": connmark_reason is not None,
            "connmark_reason": connmark_reason,
            "invalid_drop": invalid_drop_rule is not None,
            "invalid_drop_rule": invalid_drop_rule,
            "nat_rule": nat_rule,
        }


# A nat rule with a side effect names the shape best (the mark that decides masquerade).
_NAT_EFFECT = re.compile(r"-j (MARK|MASQUERADE|SNAT|DNAT)\b|\b(masquerade|snat|dnat|mark set)\b")


def _nat_rule(iptables_save: list[str], nft: list[str]) -> str | None:
    """The first rule of a nat table (iptables-save `*nat`, or an nft table that holds a
    `type nat` chain), preferring one with a side effect; None without nat rules."""
    found: list[str] = []
    table = ""
    for line in iptables_save:
        if line.startswith("*"):
            table = line[1:].strip()
        elif table == "nat" and line.startswith("-A "):
            found.append(line.strip())
    block: list[str] = []
    is_nat = False
    for line in nft:
        text = line.strip()
        if text.startswith("table "):
            block, is_nat = [], False
        elif "type nat hook" in text:
            is_nat = True
        elif text and not text.startswith(("chain ", "}", "policy ", "type ")):
            block.append(text)
        if line.startswith("}"):  # a table closes at column 0
            found += block if is_nat else []
            block = []
    for rule in found:
        if _NAT_EFFECT.search(rule):
            return rule
    return found[0] if found else None


class Lockdown(FactBase[dict[str, Any]]):
    """
    Whether the kernel would refuse an unsigned module (lockdown or Secure Boot with
    module signature enforcement).

    .. code:: python

        {"lockdown": "none", "secure_boot": False, "sig_enforce": False}
    """

    def command(self) -> str:
        return (
            "echo lockdown=$(cat /sys/kernel/security/lockdown 2>/dev/null | "
            "sed -n 's/.*\\[\\(.*\\)\\].*/\\1/p'); "
            "echo sig_enforce=$(cat /sys/module/module/parameters/sig_enforce 2>/dev/null); "
            "sb=$(od -An -t u1 /sys/firmware/efi/efivars/SecureBoot-* 2>/dev/null | "
            "awk '{print $NF}'); echo secure_boot=${sb:-0}"
        )

    def process(self, output: list[str]) -> dict[str, Any]:
        kv = dict(line.split("=", 1) for line in output if "=" in line)
        return {
            "lockdown": kv.get("lockdown") or "none",
            "secure_boot": kv.get("secure_boot", "0").strip() == "1",
            "sig_enforce": kv.get("sig_enforce", "").strip() == "Y",
        }


class DkmsReady(FactBase[dict[str, Any]]):
    """
    What build mode (`ipvs_install: dkms`) needs on the host: dkms and a compiler, and the
    headers of exactly the running kernel's package version.

    .. code:: python

        {"dkms": True, "tools_missing": [], "running": "6.1.192-2", "headers": "6.1.192-2",
         "build_dir": True}
    """

    def command(self, kernel_release: str) -> StringCommand:
        headers = f"linux-headers-{kernel_release}"
        return StringCommand(
            "command -v dkms >/dev/null && echo dkms=yes || echo dkms=no;",
            "for t in gcc make; do command -v $t >/dev/null || echo missing=$t; done;",
            "echo running=$(uname -v | sed -n 's/.*Debian \\([^ ]*\\).*/\\1/p');",
            "echo headers=$(dpkg-query -W -f '${Version}'",
            QuoteString(headers),
            "2>/dev/null);",
            "[ -e",
            QuoteString(f"/lib/modules/{kernel_release}/build"),
            "] && echo build=yes;",
            "true",
        )

    def process(self, output: list[str]) -> dict[str, Any]:
        kv: dict[str, str] = {}
        missing = []
        for line in output:
            k, _, v = line.strip().partition("=")
            if k == "missing":
                missing.append(v)
            else:
                kv[k] = v
        return {
            "dkms": kv.get("dkms") == "yes",
            "tools_missing": missing,
            "running": kv.get("running") or None,
            "headers": kv.get("headers") or None,
            "build_dir": kv.get("build") == "yes",
        }


def dkms_problems(ready: dict[str, Any], kernel_release: str) -> list[str]:
    """What keeps this host from building the fix module with DKMS ([] when nothing)."""
    want = ready["running"]
    headers = f"linux-headers-{kernel_release}"
    pin = f"={want}" if want else ""
    out = []
    if not ready["dkms"]:
        out.append("dkms is not installed")
    if ready["tools_missing"]:
        out.append(f"missing build tools: {', '.join(ready['tools_missing'])}")
    if not ready["headers"] or not ready["build_dir"]:
        out.append(f"{headers}{pin} is not installed")
    elif want and ready["headers"] != want:
        out.append(f"{headers} is {ready['headers']}, the running kernel is {want}")
    return out


def refuses_unsigned(lockdown: dict[str, Any]) -> str | None:
    """Why this host would refuse an unsigned out-of-tree module, or None."""
    if lockdown["lockdown"] in ("integrity", "confidentiality"):
        return f"kernel lockdown is {lockdown['lockdown']}"
    if lockdown["sig_enforce"]:
        return "module.sig_enforce is on"
    if lockdown["secure_boot"]:
        return "Secure Boot is on"
    return None
