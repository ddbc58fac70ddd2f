"""Test hosts on this machine: N small Linux hosts, each its own network, PID, mount and UTS
namespace with its own sshd, for running Ray's real launcher (`ray up`) over SSH.

    with Hosts(3, Path("/work/cmg-hosts")) as hosts:
        hosts[0].ssh("ps -e")          # sees only its own processes; /tmp and ~ are its own
        hosts.kill(hosts[2])           # all its processes, its sshd and its network gone

    python bench/hosts.py up --hosts 3 --workdir /work/cmg-hosts   # prints them; Ctrl-C ends
    python bench/hosts.py clean --net 77                            # what a killed harness left

Each host is `ip netns add cmgnN-I` with one end of a veth pair in it (address 10.231.N.(10+I)/24)
and the other end on a bridge `cmgbrN` that the harness makes (10.231.N.1/24 on this machine's
side, no default route, no NAT: the hosts reach each other, this machine's bridge address and
loopback, nothing else). In it, `unshare --pid --mount --uts --fork --mount-proc` starts a small
init (PID 1: it bind-mounts the host's own folders over /tmp and /root, names the host, starts
sshd and reaps orphans); killing that init ends every process of the host at once. Root logs in
with a key the harness generates. The host folders are on disk, not tmpfs: a node's venv with
torch is ~6 GB.

Package installs on the hosts go through a CONNECT proxy that the harness runs on its bridge
address, and only to the package registries (REGISTRY_HOSTS); pip on a host finds it in the
host's pip.conf (with this machine's local wheel folders), not in https_proxy, since Ray's gRPC
would send its own connections between the hosts to an https_proxy too.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import configparser
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "cmg"  # every namespace, link and folder the harness makes starts with it
PROXY_PORT = 3128
REGISTRY_HOSTS = ("pypi.org", "files.pythonhosted.org")  # what the proxy forwards to, on 443 only
PACKAGES = {"/usr/sbin/sshd": "openssh-server", "/usr/bin/rsync": "rsync"}

# PID 1 of a host: the host's own /tmp, home, /etc/hosts (its name resolves to its address, as on
# a real machine: Ray finds its node address so when there is no default route) and an empty
# resolv.conf (no name server to reach), its name, then sshd; it reaps every orphan (Ray's daemons
# are re-parented to it) and ends when sshd ends (the kernel then kills the rest).
INIT = r"""
import os, subprocess, sys, socket
folder, name, config = sys.argv[1:4]
for target, source in (("/tmp", "tmp"), ("/root", "home"), ("/etc/hosts", "etc_hosts"),
                       ("/etc/resolv.conf", "resolv.conf")):
    subprocess.run(["mount", "--bind", os.path.join(folder, source), target], check=True)
socket.sethostname(name)
sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", config],
                        stderr=open(os.path.join(folder, "sshd.log"), "ab"))
while True:
    pid, _ = os.wait()
    if pid == sshd.pid:
        sys.exit(1)
"""


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, text=True, capture_output=True, **kw)


def ensure_packages() -> None:
    """Install sshd and rsync from Debian by package name when they are missing."""
    missing = [pkg for path, pkg in PACKAGES.items() if not Path(path).exists()]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh("apt-get", "update", "-q", env=env)
        sh("apt-get", "install", "-y", "-q", "--no-install-recommends", *missing, env=env)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder


class RegistryProxy:
    """HTTP CONNECT proxy on ADDRESS:PORT, in a thread, that tunnels only to REGISTRY_HOSTS:443."""

    def __init__(self, address: str, port: int = PROXY_PORT):
        self.address, self.port = address, port
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="registry-proxy")

    def start(self) -> "RegistryProxy":
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError(f"the proxy did not start on {self.address}:{self.port}")
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._client, self.address, self.port))
        self.ready.set()
        try:
            self.loop.run_forever()
        finally:
            server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            method, target, _ = request.split("\r\n", 1)[0].split(" ", 2)
            host, _, port = target.rpartition(":")
            if method != "CONNECT" or host not in REGISTRY_HOSTS or port != "443":
                writer.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
                return
            up_reader, up_writer = await asyncio.open_connection(host, 443)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


@dataclass
class Host:
    index: int
    name: str          # hostname, and the network namespace's name
    address: str
    folder: Path       # tmp/, home/, sshd_config, host key, sshd.log
    process: subprocess.Popen | None = None   # `unshare`; its child is the host's PID 1

    def ssh_args(self, key: Path) -> list[str]:
        return ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o",
                "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=10", f"root@{self.address}"]

    def pids(self) -> list[int]:
        """Every process in the host's network namespace (its PID 1 and what runs under it)."""
        out = sh("ip", "netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]


class Hosts:
    """N test hosts on bridge `cmgbrNET` (10.231.NET.0/24); a context manager that tears everything
    down on exit, on an exception, and at interpreter exit (atexit), whichever comes first."""

    def __init__(self, n: int, workdir: Path, net: int = 77):
        if not 1 <= n <= 200 or not 0 <= net <= 255:
            raise ValueError("1 to 200 hosts, NET in 0..255")
        self.net = net
        self.workdir = Path(workdir) / f"{PREFIX}-hosts-{net}"
        self.bridge = f"{PREFIX}br{net}"
        self.gateway = f"10.231.{net}.1"
        self.key = self.workdir / "id_ed25519"
        self.hosts = [Host(i, f"{PREFIX}n{net}-{i}", f"10.231.{net}.{10 + i}",
                           self.workdir / f"host{i}") for i in range(n)]
        self.proxy: RegistryProxy | None = None
        self._up = False

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def __enter__(self) -> "Hosts":
        atexit.register(self.down)
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # -- bring up ---------------------------------------------------------------------------

    def up(self) -> None:
        self._up = True
        ensure_packages()
        clean(self.net)  # what an earlier harness on this NET left after a SIGKILL
        remove_folder(self.workdir)
        self.workdir.mkdir(parents=True)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cmg-test-hosts", "-f",
           str(self.key))
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        self.proxy = RegistryProxy(self.gateway).start()
        for host in self.hosts:
            self._start(host)
        for host in self.hosts:
            self.wait_ssh(host)

    def _start(self, host: Host) -> None:
        veth = f"{PREFIX}v{self.net}-{host.index}"
        sh("ip", "netns", "add", host.name)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.name)
        sh("ip", "link", "set", veth, "master", self.bridge, "up")
        for cmd in (["ip", "addr", "add", f"{host.address}/24", "dev", "eth0"],
                    ["ip", "link", "set", "eth0", "up"], ["ip", "link", "set", "lo", "up"]):
            sh("ip", "netns", "exec", host.name, *cmd)
        for sub in ("tmp", "home/.ssh", "home/.config/pip"):
            (host.folder / sub).mkdir(parents=True, exist_ok=True)
        (host.folder / "tmp").chmod(0o1777)
        for skel in Path("/etc/skel").iterdir():  # a home as useradd makes it (.bashrc, .profile)
            shutil.copy(skel, host.folder / "home")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host.folder / "host_key"))
        shutil.copy(self.key.with_suffix(".pub"), host.folder / "authorized_keys")
        (host.folder / "sshd_config").write_text(self._sshd_config(host))
        (host.folder / "home/.config/pip/pip.conf").write_text(self._pip_conf())
        (host.folder / "etc_hosts").write_text("127.0.0.1 localhost\n" + "".join(
            f"{h.address} {h.name}\n" for h in self.hosts))
        (host.folder / "resolv.conf").write_text("# a test host: no name server\n")
        host.process = subprocess.Popen(
            ["ip", "netns", "exec", host.name, "unshare", "--pid", "--mount", "--uts", "--fork",
             "--mount-proc", "--kill-child", sys.executable, "-c", INIT, str(host.folder),
             host.name, str(host.folder / "sshd_config")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)

    def _sshd_config(self, host: Host) -> str:
        return "\n".join([
            f"ListenAddress {host.address}", "Port 22", f"HostKey {host.folder / 'host_key'}",
            f"AuthorizedKeysFile {host.folder / 'authorized_keys'}", "PidFile none",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no",        # the key files sit under a folder other users may write
            "MaxStartups 100:30:200", "MaxSessions 100",  # Ray opens many sessions at once
            "Subsystem sftp internal-sftp", ""])

    def _pip_conf(self) -> str:
        """This machine's pip settings (its own pip.conf and local wheel folder) plus the proxy."""
        conf = configparser.ConfigParser()
        conf.read([Path.home() / ".config/pip/pip.conf", Path.home() / ".pip/pip.conf"])
        if not conf.has_section("global"):
            conf.add_section("global")
        conf["global"]["proxy"] = f"http://{self.gateway}:{PROXY_PORT}"
        for env, option in (("PIP_FIND_LINKS", "find-links"), ("PIP_DEFAULT_TIMEOUT", "timeout")):
            if os.environ.get(env):
                conf["global"][option] = os.environ[env]
        conf["global"]["disable-pip-version-check"] = "true"
        out = []
        for section in conf.sections():
            out.append(f"[{section}]")
            out += [f"{k} = {v}" for k, v in conf[section].items()]
        return "\n".join(out) + "\n"

    def wait_ssh(self, host: Host, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.ssh(host, "true", check=False).returncode == 0:
                return
            if time.monotonic() > deadline or host.process.poll() is not None:
                log = (host.folder / "sshd.log")
                raise RuntimeError(f"{host.name}: no sshd on {host.address}:22 ("
                                   f"{log.read_text()[-500:] if log.exists() else 'no log'})")
            time.sleep(0.2)

    # -- use ----------------------------------------------------------------------------------

    def ssh(self, host: Host, command: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run COMMAND on HOST as root, over SSH with the harness's key."""
        return sh(*host.ssh_args(self.key), command, check=check, timeout=timeout)

    def kill(self, host: Host) -> None:
        """Take HOST away as a lost machine goes: every process in it (sshd and Ray's daemons at
        once: SIGKILL to its PID 1), then its network (namespace and link)."""
        if host.process is not None:
            host.process.kill()   # `unshare --kill-child` passes SIGKILL on to the host's PID 1
            host.process.wait()
        for pid in host.pids():   # belt and braces: anything that got into the namespace
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while host.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        sh("ip", "link", "del", f"{PREFIX}v{self.net}-{host.index}", check=False)
        sh("ip", "netns", "del", host.name, check=False)

    # -- tear down -----------------------------------------------------------------------------

    def down(self) -> None:
        """Every host's processes, namespaces and links, the bridge, the proxy, the folders.
        Idempotent, and each step runs even when an earlier one fails."""
        if not self._up:
            return
        self._up = False
        for host in self.hosts:
            try:
                self.kill(host)
            except Exception as e:  # noqa: BLE001 - the rest still has to go
                print(f"[hosts] tearing down {host.name}: {e}", file=sys.stderr)
        if self.proxy is not None:
            self.proxy.stop()
        sh("ip", "link", "del", self.bridge, check=False)
        remove_folder(self.workdir)
        atexit.unregister(self.down)


def remove_folder(folder: Path) -> None:
    """Rename FOLDER away at once and delete it in a process of its own: three venvs are ~60k
    files, minutes of `rm` on a busy machine, which the caller need not wait for."""
    if folder.exists():
        trash = folder.with_name(f".trash-{folder.name}-{time.time_ns()}")
        folder.rename(trash)
        subprocess.Popen(["rm", "-rf", str(trash)], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def clean(net: int) -> list[str]:
    """Remove what a harness on NET that was killed left: the processes in its namespaces, the
    namespaces, links and bridge. Returns their names. (Per NET only: another harness may be
    using another NET at the same time.)"""
    tag = f"{net}-"
    names = [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines()
             if line.startswith(f"{PREFIX}n{tag}")]
    for name in names:
        for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        sh("ip", "netns", "del", name, check=False)
    bridge = f"{PREFIX}br{net}"
    links = [line.split(":")[1].strip().split("@")[0]
             for line in sh("ip", "-o", "link", "show").stdout.splitlines()]
    links = [link for link in links if link.startswith(f"{PREFIX}v{tag}") or link == bridge]
    for link in links:
        sh("ip", "link", "del", link, check=False)
    return names + links


def main() -> None:
    p = argparse.ArgumentParser(prog="python bench/hosts.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="make the hosts, print them, keep them until Ctrl-C")
    up.add_argument("--hosts", type=int, default=3)
    up.add_argument("--workdir", type=Path, default=Path("/work/cmg-hosts"))
    up.add_argument("--net", type=int, default=77, help="the hosts get 10.231.NET.0/24")
    cleaner = sub.add_parser("clean", help="remove the namespaces and links a killed harness on "
                                           "NET left")
    cleaner.add_argument("--net", type=int, required=True)
    args = p.parse_args()
    if os.geteuid() != 0:
        p.exit(2, "python bench/hosts.py: needs root (namespaces, links, sshd): run it as root\n")
    if args.command == "clean":
        print("\n".join(clean(args.net)) or "nothing to clean")
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with Hosts(args.hosts, args.workdir, args.net) as hosts:
        for host in hosts.hosts:
            print(f"{host.name} {host.address}  ssh -i {hosts.key} root@{host.address}")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
