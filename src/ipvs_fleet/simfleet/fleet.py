"""A simulated fleet: N hosts inside ONE lab VM, each a real sshd in its own namespaces.

>>> sim = SimFleet()          # $IPVS_FLEET_SIM_DIR or <repo>/.simfleet
>>> sim.up(50)               # boots the VM (bookworm lab image), makes sim-01..sim-50
>>> sim.host_run("sim-07", "hostname; ip -br addr show eth0").stdout
>>> sim.install_counts()     # {host: installs seen by the host's own depmod log}
>>> sim.down()

Each host is a network namespace (own address on a bridge, own net.ipv4.vs.* sysctls, own
iptables) and a mount + UTS namespace with private /etc, /lib/modules/<kr>, /var/lib/ipvs-fleet,
/tmp and /run/netns (overlays over the VM's tree), running its own sshd with its own host key.
The controller reaches sim-NN at 127.0.0.1:<port> (QEMU forwards it to the VM's port
22000+NN, DNAT'ed to the host's sshd), so pyinfra and the checks talk plain SSH to each.
What it does not simulate (one kernel for all hosts: loaded modules, taint, boot) is in
docs/rollout.md.

Files in the sim dir: `state.json`, `ssh/` (client key, known_hosts), `ssh_config`,
`vm/` (overlay, pidfile, console).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ipvs_fleet.errors import FleetError
from ipvs_fleet.lab import vm
from ipvs_fleet.lab.image import Image, build_image, seed_tar
from ipvs_fleet.paths import UPDATES_SUBDIR
from ipvs_fleet.resources import workdir
from ipvs_fleet.simfleet import scripts

INVENTORY = Path(__file__).with_name("inventory.py")
ROLLOUT_CONFIG = Path(__file__).with_name("rollout.yml")
RELEASE = "bookworm"
HOST_CLASS = "k8s_node"


def default_dir() -> Path:
    return Path(os.environ.get("IPVS_FLEET_SIM_DIR", workdir() / ".simfleet")).absolute()


def host_name(i: int) -> str:
    return f"sim-{i:02d}"


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


class SimFleet:
    """One simulated fleet living in its own directory."""

    def __init__(self, simdir: Path | str | None = None) -> None:
        self.dir = Path(simdir).absolute() if simdir else default_dir()
        self.vmfiles = vm.VmFiles(self.dir / "vm")

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def key(self) -> Path:
        return self.dir / "ssh" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "ssh" / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def inventory_path(self) -> Path:
        """The pyinfra inventory (it reads $IPVS_FLEET_SIM_DIR, else <repo>/.simfleet)."""
        return INVENTORY

    def state(self) -> dict:
        try:
            return dict(json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            return {}

    @property
    def hosts(self) -> dict[str, dict]:
        return dict(self.state().get("hosts", {}))

    def is_running(self) -> bool:
        return vm.pid_of(self.vmfiles) is not None

    # -- lifecycle --------------------------------------------------------------------------

    def up(self, size: int = 50, memory_mb: int = 1536, timeout: float = 600) -> None:
        """Boot the VM (unless running) and make sure sim-01..sim-<size> answer SSH."""
        if not 1 <= size <= 200:
            raise FleetError(f"simulated fleet size must be 1..200, not {size}")
        st = self.state()
        if self.is_running() and st.get("size", 0) >= size:
            self._setup(st["size"])
            return
        self.down()
        image = build_image(RELEASE, log=lambda m: None)
        self._keys()
        t0 = time.monotonic()
        ports = {host_name(i): vm.free_port() for i in range(1, size + 1)}
        vm_port = vm.free_port()
        self._start_vm(image, vm_port, ports, memory_mb)
        st = {
            "size": size,
            "vm_port": vm_port,
            "kernel_release": image.pin.kernel_release,
            "hosts": {
                n: {"port": p, "ip": f"10.77.1.{i}", "index": i}
                for i, (n, p) in enumerate(ports.items(), 1)
            },
        }
        self.state_path.write_text(json.dumps(st, indent=2))
        self._wait_vm(t0 + timeout)
        self._setup(size)
        st["up_seconds"] = round(time.monotonic() - t0, 1)
        self.state_path.write_text(json.dumps(st, indent=2))

    def down(self) -> bool:
        """Stop the VM (all simulated hosts with it)."""
        return vm.stop(self.vmfiles)

    def reset(self) -> None:
        """Every host back to its first state: no deploy, no modules loaded, fresh logs."""
        n = self.state()["size"]
        names = " ".join(host_name(i) for i in range(1, n + 1))
        self.vm_run(
            f"for h in {names}; do /srv/simfleet/host-down.sh $h; done; "
            "rmmod ip_vs_reuse 2>/dev/null; "
            "modprobe -r ip_vs_sh ip_vs_wrr ip_vs_rr ip_vs_ftp ip_vs 2>/dev/null; "
            "for h in /srv/simfleet/hosts/*; do "
            "rm -rf $h/etc.upper/sysctl.d $h/etc.upper/modprobe.d $h/etc.upper/modules-load.d "
            "$h/mod.upper/* $h/mod.work/* $h/varlib/* $h/state/events.log; done",
            timeout=120,
        )
        self._setup(n)

    def kernel_modules(self, artifacts_dir: Path) -> None:
        """Make the shared kernel's own module loads (autoload, e.g. by `ipvsadm`) find the
        fix module beside the stock IPVS modules, without putting it in any simulated host's
        /lib/modules, and load it (the simulated hosts share one kernel: a host's deploy
        finds it loaded from the build it installs).

        The kernel runs its usermode modprobe in the VM's root namespaces, not in the host that
        caused the load, so it would load the stock ip_vs from the VM's tree. It is pointed at
        a private module root (/srv/simfleet/kroot, an overlay of the stock tree plus the
        artifact) instead; the hosts' trees stay stock until the deploy installs the set.
        """
        from ipvs_fleet.build.artifact import load_artifact

        kr = self.state()["kernel_release"]
        art = load_artifact(Path(artifacts_dir), kr)
        art.verify()
        data = art.tarball.read_bytes()
        r = subprocess.run(
            [
                "ssh",
                "-i",
                str(self.key),
                "-p",
                str(self.state()["vm_port"]),
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                f"UserKnownHostsFile={self.known_hosts}",
                "-o",
                "HostKeyAlias=simvm",
                "-o",
                "LogLevel=ERROR",
                "root@127.0.0.1",
                "cat > /srv/simfleet/kmods.tar.gz",
            ],
            input=data,
            capture_output=True,
            timeout=120,
        )
        if r.returncode != 0:
            raise FleetError(f"simfleet: cannot copy the artifact: {r.stderr.decode()[-300:]}")
        self.vm_run(
            "set -e; K=/srv/simfleet/kroot; M=$(readlink -f /lib/modules/$(uname -r)); "
            "mkdir -p $K/lib/modules/$(uname -r) $K.upper $K.work; "
            "mountpoint -q $K/lib/modules/$(uname -r) || mount -t overlay overlay "
            "-o lowerdir=$M,upperdir=$K.upper,workdir=$K.work $K/lib/modules/$(uname -r); "
            f"U=$K/lib/modules/$(uname -r)/{UPDATES_SUBDIR}; rm -rf $U; mkdir -p $U; "
            "tar -xzf /srv/simfleet/kmods.tar.gz -C $U; /usr/sbin/depmod -b $K $(uname -r); "
            "printf '#!/bin/sh\\nexec /usr/sbin/modprobe -d /srv/simfleet/kroot \"$@\"\\n' "
            "> /srv/simfleet/kmodprobe; chmod 755 /srv/simfleet/kmodprobe; "
            "echo /srv/simfleet/kmodprobe > /proc/sys/kernel/modprobe; "
            "/srv/simfleet/kmodprobe ip_vs && /srv/simfleet/kmodprobe ip_vs_reuse"
        )

    # -- access -----------------------------------------------------------------------------

    def _ssh(self, port: int, cmd: str, timeout: float) -> Result:
        argv = [
            "ssh",
            "-i",
            str(self.key),
            "-p",
            str(port),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=60",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "HostKeyAlias="
            + ("simvm" if port == self.state().get("vm_port") else f"[127.0.0.1]:{port}"),
            "-o",
            "LogLevel=ERROR",
            "root@127.0.0.1",
            "--",
            cmd,
        ]
        for attempt in range(3):
            try:
                r = subprocess.run(
                    argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
                )
            except subprocess.TimeoutExpired as e:
                what = f"ssh port {port}: `{cmd[:80]}`"
                raise FleetError(f"{what} timed out after {timeout} s") from e
            # The connection never got up (a saturated TCG VM answers its banner late): the
            # command did not run, so trying again cannot run it twice.
            if r.returncode != 255 or "banner exchange" not in r.stderr or attempt == 2:
                break
            time.sleep(5)
        return Result(r.returncode, r.stdout, r.stderr)

    def vm_run(self, cmd: str, *, check: bool = True, timeout: float = 120) -> Result:
        """Run a command in the VM itself (root namespaces): the fleet's "hypervisor"."""
        r = self._ssh(int(self.state()["vm_port"]), cmd, timeout)
        if check and not r.ok:
            raise FleetError(f"simfleet VM: `{cmd[:120]}` failed ({r.rc}): {r.stderr[-800:]}")
        return r

    def host_run(self, name: str, cmd: str, *, check: bool = True, timeout: float = 60) -> Result:
        """Run a command on a simulated host through its own sshd."""
        r = self._ssh(int(self.hosts[name]["port"]), cmd, timeout)
        if check and not r.ok:
            raise FleetError(f"{name}: `{cmd[:120]}` failed ({r.rc}): {r.stderr[-800:]}")
        return r

    def kill_host(self, name: str) -> None:
        """Fault: the host crashes (all its processes killed, link down): unreachable."""
        self.vm_run(f"/srv/simfleet/host-down.sh {shlex.quote(name)}")

    def revive_host(self, name: str) -> None:
        self.vm_run(f"/srv/simfleet/host-up.sh {shlex.quote(name)}")

    def events(self) -> dict[str, list[str]]:
        """Each host's own depmod log (`<ts> depmod install|remove <args>`), read in the VM."""
        out = self.vm_run(
            "cd /srv/simfleet/hosts && for h in *; do "
            '[ -f $h/state/events.log ] && sed "s/^/$h /" $h/state/events.log; done; true'
        ).stdout
        ev: dict[str, list[str]] = {n: [] for n in self.hosts}
        for line in out.splitlines():
            host, _, rest = line.partition(" ")
            ev.setdefault(host, []).append(rest)
        return ev

    def install_counts(self) -> dict[str, int]:
        """How many times the deploy installed the module set on each host (host-side log)."""
        return {h: sum(1 for e in es if " depmod install " in e) for h, es in self.events().items()}

    # -- internals --------------------------------------------------------------------------

    def _keys(self) -> None:
        self.key.parent.mkdir(parents=True, exist_ok=True)
        self.key.parent.chmod(0o700)
        for k in (self.key, self.dir / "ssh" / "vm_host_key"):
            if not k.exists():
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)],
                    check=True,
                    capture_output=True,
                )

    def _start_vm(self, image: Image, vm_port: int, ports: dict[str, int], mem: int) -> None:
        f = self.vmfiles
        f.dir.mkdir(parents=True, exist_ok=True)
        vm_key = self.dir / "ssh" / "vm_host_key"
        seed_tar(f.seed, self.key.with_suffix(".pub").read_text(), vm_key)
        pub = vm_key.with_name("vm_host_key.pub").read_text().split()
        self.known_hosts.write_text(f"simvm {pub[0]} {pub[1]}\n")
        f.overlay.unlink(missing_ok=True)
        subprocess.run(
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
                str(f.overlay),
            ],
            check=True,
        )
        fwd = [f"hostfwd=tcp:127.0.0.1:{vm_port}-:22"] + [
            f"hostfwd=tcp:127.0.0.1:{p}-:{22000 + i}" for i, p in enumerate(ports.values(), 1)
        ]
        cmd = [
            "qemu-system-x86_64",
            "-name",
            "simfleet",
            "-accel",
            os.environ.get("IPVS_FLEET_ACCEL", "tcg"),
            "-smp",
            "2",
            "-m",
            str(mem),
            "-nodefaults",
            "-display",
            "none",
            "-kernel",
            str(image.kernel),
            "-initrd",
            str(image.initrd),
            "-append",
            "root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.hostname=simvm",
            "-drive",
            f"file={f.overlay},if=virtio,format=qcow2",
            "-drive",
            f"file={f.seed},if=virtio,format=raw,readonly=on",
            "-netdev",
            "user,id=net0,restrict=on," + ",".join(fwd),
            "-device",
            "virtio-net-pci,netdev=net0",
            "-device",
            "virtio-rng-pci",
            "-serial",
            f"file:{f.console}",
            "-pidfile",
            str(f.pidfile),
            "-daemonize",
        ]
        with f.qemu_log.open("w") as out:
            r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
        if r.returncode != 0 or vm.pid_of(f) is None:
            raise FleetError(f"simfleet VM did not start: {f.qemu_log.read_text()[-500:]}")

    def _wait_vm(self, deadline: float) -> None:
        while True:
            if not self.is_running():
                raise FleetError(f"simfleet VM died; console: {self.vmfiles.console}")
            try:
                if self.vm_run("true", check=False, timeout=30).ok:
                    return
            except FleetError:
                pass
            if time.monotonic() > deadline:
                raise FleetError(f"simfleet VM: no SSH in time; console: {self.vmfiles.console}")
            time.sleep(3)

    def _setup(self, size: int) -> None:
        """Install the scripts, make/start the hosts, learn their host keys."""
        files = {
            "setup.sh": scripts.SETUP_SH,
            "host-up.sh": scripts.HOST_UP_SH,
            "host.sh": scripts.HOST_SH,
            "host-down.sh": scripts.HOST_DOWN_SH,
        }
        install = " && ".join(
            f"cat > /srv/simfleet/{n} <<'EOF_{n}'\n{body}EOF_{n}\nchmod 755 /srv/simfleet/{n}"
            for n, body in files.items()
        )
        self.vm_run(f"mkdir -p /srv/simfleet && {install}")
        self.vm_run(f"/srv/simfleet/setup.sh {size}", timeout=600)
        keys = self.vm_run(
            "cd /srv/simfleet/hosts && for h in *; do "
            'echo "$h $(cut -d" " -f1,2 $h/etc.upper/ssh/ssh_host_ed25519_key.pub)"; done'
        ).stdout
        hosts = self.hosts
        lines = [ln for ln in self.known_hosts.read_text().splitlines() if ln.startswith("simvm")]
        for line in keys.splitlines():
            name, ktype, kdata = line.split()
            if name in hosts:
                lines.append(f"[127.0.0.1]:{hosts[name]['port']} {ktype} {kdata}")
        self.known_hosts.write_text("\n".join(lines) + "\n")
        self._write_ssh_config()

    def _write_ssh_config(self) -> None:
        out = []
        for name, h in sorted(self.hosts.items()):
            out += [
                f"Host {name}",
                "  HostName 127.0.0.1",
                f"  Port {h['port']}",
                "  User root",
                f"  IdentityFile {self.key}",
                "  IdentitiesOnly yes",
                f"  UserKnownHostsFile {self.known_hosts}",
                "  StrictHostKeyChecking yes",
                "  BatchMode yes",
                "  LogLevel ERROR",
                "",
            ]
        self.ssh_config.write_text("\n".join(out))
