"""The IPVS modules on the guest (standard library only): load the stock set from the
kernel's own tree and the fix module ip_vs_reuse on top, restore the host's own modules,
report what is loaded (taints, the fix module's counters).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

try:
    from ipvs_fleet.probe import cells, kernel
except ImportError:  # on a guest: sibling files, not a package
    import cells  # type: ignore[no-redef]
    import kernel  # type: ignore[no-redef]


IPVS_MODULES = ("ip_vs", "ip_vs_rr", "ip_vs_ftp")


# --- modules --------------------------------------------------------------------------------

FIX_MODULE = "ip_vs_reuse"  # the fix, loaded on top of the kernel's own ip_vs
REUSE_PROC = "ip_vs_reuse"  # /proc/net/ip_vs_reuse, per netns (the fix module's counters)
KILLED = ("killed_tcp", "killed_udp")


def loaded_ipvs_modules() -> list[str]:
    with open("/proc/modules") as f:
        return [ln.split()[0] for ln in f if re.fullmatch(r"ip_vs(_\w+)?|xt_ipvs", ln.split()[0])]


def loaded_taints() -> dict[str, str]:
    """Loaded IPVS modules -> their taint flags ("" for the kernel's own build)."""
    return {m: kernel.read_text(f"/sys/module/{m}/taint") for m in loaded_ipvs_modules()}


def foreign_ipvs(taints: dict[str, str]) -> list[str]:
    """Loaded IPVS modules other than the fix module that are out of tree (O taint): a
    patched set (the test-only `upstream` variant, a 2.x host), which only unloading the
    whole stack replaces."""
    return sorted(m for m, t in taints.items() if m != FIX_MODULE and "O" in t)


@dataclass(frozen=True)
class RestoreSteps:
    """How to get from the loaded IPVS modules back to the host's own (`restore_steps`)."""

    unload_all: bool  # unload the whole stack first (a loaded build is not the host's)
    remove: list[str]  # rmmod these (dependents first), IPVS staying loaded
    load: list[str]  # then modprobe these, in order


def restore_steps(
    taints: dict[str, str], trees: dict[str, str | None], wanted: list[str], fix_installed: bool
) -> RestoreSteps:
    """The steps back to `wanted` loaded, each module the build modprobe picks.

    + taints: loaded IPVS module -> taint flags (`loaded_taints`)
    + trees: module -> where modprobe finds it: "kernel" (the kernel's own tree), "other"
      (updates/, extra/: out of tree), None (nowhere)
    + fix_installed: the loaded ip_vs_reuse is the installed file (same srcversion)
    A loaded IPVS module whose taint does not fit where modprobe finds it (a patched set the
    probe loaded, or stock modules on a host whose own set is patched) is replaced only by
    unloading the whole stack; the fix module alone is swapped live.
    """
    order = sorted(wanted, key=lambda m: m != "ip_vs")  # ip_vs first: the others need it

    def own(m: str) -> bool:
        return ("O" in taints[m]) == (trees.get(m) == "other")

    if any(m in taints and m != FIX_MODULE and not own(m) for m in wanted):
        return RestoreSteps(True, [], order)
    remove = [m for m in taints if m not in wanted]
    if FIX_MODULE in taints and FIX_MODULE in wanted and not fix_installed:
        remove.append(FIX_MODULE)
    if "ip_vs" in remove:  # nothing of IPVS was loaded before
        return RestoreSteps(True, [], order)
    return RestoreSteps(False, sorted(remove), [m for m in order if m not in taints or m in remove])


def record_holds(
    record: dict[str, Any] | None, loaded: list[str], fix_srcversion: str | None
) -> bool:
    """Whether LOADED_RECORD still describes what is loaded (nothing reloaded since)."""
    if not record or "ip_vs" not in loaded:
        return False
    if record.get("module") == FIX_MODULE:
        return FIX_MODULE in loaded and record.get("srcversion") == fix_srcversion
    if record.get("module") is None:  # stock
        return FIX_MODULE not in loaded
    return True  # a patched set: its ip_vs is loaded


def parse_reuse_counters(text: str) -> dict[str, int] | None:
    """/proc/net/ip_vs_reuse (`enabled 1`, `killed_tcp 3`, `killed_udp 0`) as a dict; None
    for no text (the file is absent: the fix module is not loaded)."""
    out = {}
    for line in text.splitlines():
        key, _, val = line.strip().partition(" ")
        if key and val.strip().isdigit():
            out[key] = int(val)
    return out or None


def killed_delta(
    before: dict[str, int] | None, after: dict[str, int] | None
) -> dict[str, int | None]:
    """killed_tcp / killed_udp between two readings of /proc/net/ip_vs_reuse; None where a
    reading is missing (stock modules)."""
    return {
        k: after[k] - before[k] if before and after and k in before and k in after else None
        for k in KILLED
    }


NETNS_PREFIX = "ipvsp"


def cleanup_stale() -> list[str]:
    """Remove topologies an interrupted run left behind (their IPVS services pin the modules).

    Everything a run configures lives in its netns (devices, IPVS services, ipsets, iptables
    state of both backends), so deleting the netns removes it all.
    """
    gone = []
    for name in kernel.sh("ip netns list", check=False).split():
        if not name.startswith(NETNS_PREFIX):
            continue
        pids = kernel.sh(f"ip netns pids {name}", check=False).split()
        if pids:
            kernel.sh(f"kill -9 {' '.join(pids)}", check=False)
        kernel.sh(f"ip netns exec {name} ipvsadm -C", check=False)
        kernel.sh(f"ip netns del {name}", check=False)
        gone.append(name)
    return gone


def rmmod_all(mods: list[str]) -> None:
    """rmmod `mods` (ip_vs last: the others depend on it), retried while a deleted netns
    still holds them (netns teardown, and its IPVS flush, is asynchronous)."""
    for _ in range(10):
        left = [m for m in loaded_ipvs_modules() if m in mods]
        if not left:
            return
        for m in sorted(left, key=lambda m: m == "ip_vs"):
            kernel.sh(f"rmmod {m}", check=False)
        time.sleep(0.3)
    left = [m for m in loaded_ipvs_modules() if m in mods]
    if left:
        raise cells.Failed(f"cannot unload {', '.join(left)} (IPVS services still use them?)")


def unload_ipvs() -> None:
    """Unload every IPVS module; fails if an IPVS service holds them."""
    cleanup_stale()
    rmmod_all(loaded_ipvs_modules())


def unload_fix() -> None:
    """rmmod ip_vs_reuse if loaded: IPVS, its tables and its connections stay."""
    rmmod_all([FIX_MODULE])


def stock_module_path(name: str) -> str:
    rel = os.uname().release
    hits = glob.glob(f"/lib/modules/{rel}/kernel/net/netfilter/ipvs/{name}.ko*")
    if not hits:
        raise cells.Failed(f"no stock {name} in /lib/modules/{rel}/kernel")
    return hits[0]


def installed_tree(name: str) -> str | None:
    """Where modprobe finds `name`: "kernel" (the kernel's own tree), "other", or None."""
    path = kernel.sh(f"modinfo -n {name}", check=False).strip()
    if not path:
        return None
    own = f"/lib/modules/{os.uname().release}/kernel/"
    return "kernel" if path.startswith(own) or path == "(builtin)" else "other"


def modinfo(target: str, field: str) -> str | None:
    """One modinfo field of a module file or name; None if absent."""
    return kernel.sh(f"modinfo -F {field} {target}", check=False).strip() or None


def insmod(path: str) -> None:
    """insmod `path`, its dependencies outside IPVS (conntrack, nf_nat, ...) modprobed first."""
    if not os.path.exists(path):
        raise cells.Failed(f"{path} missing")
    for dep in filter(None, kernel.sh(f"modinfo -F depends {path}").strip().split(",")):
        if not dep.startswith("ip_vs"):
            kernel.sh(f"modprobe {dep}")
    kernel.sh(f"insmod {path}")


LOADED_RECORD = "/run/ipvs-probe-modules.json"


def load_modules(source: str) -> dict[str, Any]:
    """Load the stock IPVS modules (`stock`), or on top of them the fix module of a folder.

    + stock: ip_vs, ip_vs_rr, ip_vs_ftp from the kernel's own tree; ip_vs_reuse not loaded
    + DIR holding ip_vs_reuse.ko: the same stock modules, then DIR/ip_vs_reuse.ko (a build
      loaded before is removed first)
    + DIR holding an ip_vs.ko set instead (the test-only `upstream` variant, patched IPVS):
      the whole stack unloaded and the set loaded in its place
    Switching between stock and the fix is rmmod / insmod of ip_vs_reuse alone: IPVS, its
    tables and its connections stay. Only a loaded IPVS module that is not the kernel's own
    build makes the whole stack go first. Loads by path (insmod), so what is installed under
    /lib/modules is not touched; what was loaded is recorded in LOADED_RECORD.
    """
    fix = None if source == "stock" else os.path.join(source, FIX_MODULE + ".ko")
    if fix is not None and not os.path.exists(fix):
        return load_patched_set(source)
    if foreign_ipvs(loaded_taints()):
        unload_ipvs()
    else:
        unload_fix()
    files = []
    for name in IPVS_MODULES:
        path = stock_module_path(name)
        if name not in loaded_ipvs_modules():
            insmod(path)
        files.append(path)
    record: dict[str, Any] = {
        "source": source,
        "module": None,
        "files": files,
        "set_id": None,
        "reuse_design": None,
        "srcversion": None,
    }
    if fix is not None:
        insmod(fix)
        record.update(
            module=FIX_MODULE,
            files=[*files, fix],
            set_id=modinfo(fix, "ipvs_fleet"),
            reuse_design=modinfo(fix, "ipvs_fleet_reuse"),
            srcversion=modinfo(fix, "srcversion"),
        )
    return _recorded(record)


def load_patched_set(source: str) -> dict[str, Any]:
    """A patched ip_vs set from a folder in place of the whole IPVS stack (the `upstream`
    variant's kselftest)."""
    if not os.path.exists(os.path.join(source, "ip_vs.ko")):
        raise cells.Failed(
            f"{source} holds neither {FIX_MODULE}.ko (the fix module) nor an ip_vs.ko set"
        )
    unload_ipvs()
    files = [os.path.join(source, name + ".ko") for name in IPVS_MODULES]
    for path in files:
        insmod(path)
    return _recorded(
        {
            "source": source,
            "module": "ip_vs",
            "files": files,
            "set_id": modinfo(files[0], "ipvs_fleet"),
            "reuse_design": modinfo(files[0], "ipvs_fleet_reuse"),
            "srcversion": modinfo(files[0], "srcversion"),
        }
    )


def _recorded(record: dict[str, Any]) -> dict[str, Any]:
    with open(LOADED_RECORD, "w") as f:
        json.dump(record, f)
    return module_status()


def restore_modules(modules: list[str]) -> dict[str, Any]:
    """Back to the host's own state: exactly `modules` loaded, each the build modprobe picks
    (`restore_steps`: IPVS stays loaded unless a loaded build is not the host's own), then
    sysctl.d re-applied."""
    taints = loaded_taints()
    trees = {m: installed_tree(m) for m in {*taints, *modules}}
    loaded_src = kernel.read_text(f"/sys/module/{FIX_MODULE}/srcversion")
    fix_installed = bool(loaded_src) and loaded_src == modinfo(FIX_MODULE, "srcversion")
    steps = restore_steps(taints, trees, modules, fix_installed)
    if steps.unload_all:
        unload_ipvs()
    else:
        rmmod_all(steps.remove)
    with contextlib.suppress(OSError):
        os.unlink(LOADED_RECORD)
    for m in steps.load:
        kernel.sh(f"modprobe {m}")
    kernel.sh("sysctl -q --system", check=False)
    return module_status()


def fix_module_status(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The loaded ip_vs_reuse: version (the set id), srcversion, taint, and the modinfo of
    the file it was loaded from (the probe's, else the installed one if it is that build)."""
    sysfs = f"/sys/module/{FIX_MODULE}"
    if not os.path.isdir(sysfs):
        return None
    srcversion = kernel.read_text(f"{sysfs}/srcversion") or None
    if record and record.get("module") == FIX_MODULE:
        source = record["files"][-1]
    elif srcversion and modinfo(FIX_MODULE, "srcversion") == srcversion:
        source = FIX_MODULE  # modinfo resolves the name to the installed file
    else:
        source = None
    return {
        "version": kernel.read_text(f"{sysfs}/version") or None,
        "srcversion": srcversion,
        "taint": kernel.read_text(f"{sysfs}/taint"),
        "file": source and modinfo(source, "filename"),
        "set_id": source and modinfo(source, "ipvs_fleet"),
        "reuse_design": source and modinfo(source, "ipvs_fleet_reuse"),
    }


def module_status() -> dict[str, Any]:
    """What is loaded: the IPVS modules, ip_vs's taint ("" when stock), the fix module
    (`fix_module_status`), knob_present (ip_vs_reuse loaded: the knob exists in every
    netns), and the probe's LOADED_RECORD while it still holds."""
    loaded = loaded_ipvs_modules()
    try:
        with open(LOADED_RECORD) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = None
    if not record_holds(
        record, loaded, kernel.read_text(f"/sys/module/{FIX_MODULE}/srcversion") or None
    ):
        record = None
    return {
        "kernel_release": os.uname().release,
        "loaded": loaded,
        "ip_vs_taint": kernel.read_text("/sys/module/ip_vs/taint") if "ip_vs" in loaded else None,
        "fix_module": fix_module_status(record),
        "knob_present": FIX_MODULE in loaded,
        "loaded_by_probe": record,
    }
