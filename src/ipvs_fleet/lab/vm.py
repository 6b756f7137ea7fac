"""QEMU processes of the lab: start one VM daemonized, find out whether it runs, stop it.

A VM is identified by its pidfile; a pid counts as ours only while its command line
still names that pidfile, so a recycled pid of some other process is never signalled.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ipvs_fleet import debian
from ipvs_fleet.errors import FleetError
from ipvs_fleet.lab.image import Image


@dataclass(frozen=True)
class VmFiles:
    """Where one VM's files live inside the lab dir."""

    dir: Path  # <labdir>/vms/<name>

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def overlay(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def seed(self) -> Path:
        return self.dir / "seed.tar"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (QEMU binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pid_of(files: VmFiles) -> int | None:
    """The pid of the VM's QEMU if it is running, else None."""
    try:
        pid = int(files.pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if str(files.pidfile).encode() in cmdline else None


def kvm_usable(image: Image, timeout: float = 10.0) -> bool:
    """Whether KVM really boots a guest kernel here (cached per host kernel and QEMU).

    The probe boots the lab kernel without a root disk: under a working KVM it panics
    ("VFS: Unable to mount root") within seconds; where nested KVM hangs, it times out.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True
    ).stdout.split("\n")[0]
    key = f"{os.uname().release} {qemu}"
    cache = debian.CACHE / "kvm-probe.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return bool(known[key])
    try:
        r = subprocess.run(
            [
                "qemu-system-x86_64",
                "-accel",
                "kvm",
                "-m",
                "256",
                "-nodefaults",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
                "-kernel",
                str(image.kernel),
                "-append",
                "console=ttyS0 panic=-1",
            ],
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        ok = b"Unable to mount root" in r.stdout or b"Kernel panic" in r.stdout
    except subprocess.TimeoutExpired:
        ok = False
    known[key] = ok
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(known, indent=2))
    return ok


def accel(image: Image) -> str:
    """KVM where a probe showed it boots the guest kernel, else TCG.

    IPVS_FLEET_ACCEL=tcg|kvm forces one; the default `auto` probes (once per host kernel).
    """
    want = os.environ.get("IPVS_FLEET_ACCEL", "auto")
    if want == "auto":
        return "kvm" if kvm_usable(image) else "tcg"
    if want not in ("tcg", "kvm"):
        raise FleetError(f"IPVS_FLEET_ACCEL={want!r}: expected tcg, kvm or auto")
    return want


def lan_segment(labdir: Path) -> str:
    """The Ethernet segment of one lab dir: a multicast group on the controller's loopback
    that every lab VM with a lan_address joins (VRRP, the IPVS sync daemon and the clients
    need one L2 segment; slirp gives each VM a network of its own). The port comes from
    the lab dir, so that labs running at once do not hear each other."""
    port = 20000 + zlib.crc32(str(labdir.absolute()).encode()) % 20000
    return f"230.0.9.1:{port}"


def lan_nic(name: str, segment: str) -> list[str]:
    """QEMU's arguments for a VM's NIC on `segment`, its MAC derived from its name."""
    mac = zlib.crc32(name.encode()).to_bytes(4, "big")[1:]
    return [
        "-netdev",
        f"socket,id=lan0,mcast={segment},localaddr=127.0.0.1",
        "-device",
        "virtio-net-pci,netdev=lan0,mac=52:54:00:" + ":".join(f"{b:02x}" for b in mac),
    ]


def start(
    name: str,
    image: Image,
    files: VmFiles,
    port: int,
    memory_mb: int,
    accel_: str,
    kernel_args: Sequence[str] = (),
    lan: str = "",
) -> int:
    """Start the VM daemonized on a fresh overlay; return QEMU's pid.

    + lan: the lab's Ethernet segment ("group:port", lan_segment()) for a second NIC, eth1
    """
    files.dir.mkdir(parents=True, exist_ok=True)
    files.overlay.unlink(missing_ok=True)
    r = subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            str(image.rootfs),
            str(files.overlay),
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise FleetError(f"{name}: qemu-img create failed: {r.stderr.strip()}")
    files.console.unlink(missing_ok=True)
    # nosoftlockup: a lab vCPU is a TCG thread on a shared host; starved for 20 s (seen in CI,
    # in clear_page while udev and modprobe start), the guest taints itself L, and the `taint`
    # check then fails for the emulator, not for anything on the host under test.
    append = " ".join(
        [
            f"root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.hostname={name}",
            "nosoftlockup",
            *kernel_args,
        ]
    )
    cmd = [
        "qemu-system-x86_64",
        "-name",
        name,
        "-accel",
        accel_,
        "-smp",
        "1",
        "-m",
        str(memory_mb),
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        append,
        "-drive",
        f"file={files.overlay},if=virtio,format=qcow2",
        "-drive",
        f"file={files.seed},if=virtio,format=raw,readonly=on",
        "-netdev",
        f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device",
        "virtio-net-pci,netdev=net0",
        *(lan_nic(name, lan) if lan else []),
        "-device",
        "virtio-rng-pci",
        "-serial",
        f"file:{files.console}",
        "-pidfile",
        str(files.pidfile),
        "-daemonize",
    ]
    with files.qemu_log.open("w") as out:
        started = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    pid = pid_of(files)
    if started.returncode != 0 or pid is None:
        raise FleetError(
            f"{name}: qemu failed to start (exit {started.returncode}): "
            f"{files.qemu_log.read_text().strip()[-500:]}"
        )
    return pid


def stop(files: VmFiles, timeout: float = 10.0) -> bool:
    """Stop the VM if it runs (SIGTERM, then SIGKILL). True if it was running."""
    pid = pid_of(files)
    if pid is None:
        files.pidfile.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_of(files) == pid and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_of(files) == pid:
        os.kill(pid, signal.SIGKILL)
        while pid_of(files) == pid:
            time.sleep(0.1)
    files.pidfile.unlink(missing_ok=True)
    return True
