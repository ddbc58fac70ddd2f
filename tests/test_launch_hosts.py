"""Test hosts made on this machine (bench/hosts.py) and Ray's real launcher on them (bench/launch.py):
`ray up examples/cluster-onprem.yaml` over SSH, the documented sweep through `ray exec`, `ray down`.

Needs root (namespaces, links, sshd); the harness installs openssh-server and rsync by package
name. The full launch sets up three venvs with torch (13 to 14 minutes on 2 cores, 22 on busy
ones; 20 GB on disk under /work/cmg-test-hosts while it runs): it runs with `pytest -m launch`,
and is skipped, saying so, in a run that does not ask for the marker (CI's plain `pytest` has 16
minutes in all).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hosts import PREFIX, Hosts  # noqa: E402

pytestmark = [pytest.mark.launch,
              pytest.mark.skipif(os.geteuid() != 0, reason="test hosts need root")]

# Not under /tmp: each host mounts its own /tmp, and the host folders, keys and the shared
# storage must be seen at the same path by this machine and every host.
WORKDIR = Path(os.environ.get("CMG_TEST_HOSTS_DIR", "/work/cmg-test-hosts"))


def ours(net: int) -> list[str]:
    """The namespaces and links of NET that exist now."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return ([n.split()[0] for n in netns.splitlines() if n.startswith(f"{PREFIX}n{net}-")] +
            [n for n in (f"{PREFIX}br{net}", f"{PREFIX}v{net}-0", f"{PREFIX}v{net}-1")
             if f" {n}:" in links or f" {n}@" in links])


def test_hosts_are_separate_machines_and_go_away():
    net = 79
    with Hosts(2, WORKDIR, net) as hosts:
        a, b = hosts.hosts
        assert len(ours(net)) == 5  # 2 namespaces, the bridge, 2 veth ends
        # its own processes: its init is PID 1, and it sees a handful of processes, not ours
        ps = hosts.ssh(a, "ps -eo pid=,comm=").stdout.split("\n")
        assert ps[0].split() == ["1", "python"] and len([p for p in ps if p.strip()]) < 10, ps
        assert str(os.getpid()) not in hosts.ssh(a, "ls /proc").stdout.split()
        assert hosts.ssh(a, "hostname").stdout.strip() == a.name
        # its own /tmp and home: a file written on A is on neither B nor this machine
        hosts.ssh(a, f"echo a > /tmp/{a.name} && echo a > ~/{a.name}")
        assert hosts.ssh(b, f"ls /tmp/{a.name} ~/{a.name}", check=False).returncode != 0
        assert not Path(f"/tmp/{a.name}").exists() and not (Path.home() / a.name).exists()
        assert (a.folder / "tmp" / a.name).read_text() == "a\n"
        # its own network: the bridge's subnet and loopback only, and B is reachable over it
        assert hosts.ssh(a, "ip -4 -o route").stdout.split()[:3] == \
            [f"10.231.{net}.0/24", "dev", "eth0"]
        assert hosts.ssh(a, "ip -4 -o route | wc -l").stdout.strip() == "1"
        banner = f"import socket; print(socket.create_connection(('{b.address}', 22), 5).recv(7))"
        assert "SSH-2.0" in hosts.ssh(a, f"python3 -c \"{banner}\"").stdout
        # the proxy tunnels to the package registries only
        connect = (f"import socket; s = socket.create_connection(('{hosts.gateway}', 3128), 5); "
                   f"s.sendall(b'CONNECT example.com:443 HTTP/1.1\\r\\n\\r\\n'); print(s.recv(40))")
        assert "403" in hosts.ssh(a, f"python3 -c \"{connect}\"").stdout
        # a killed host: no process left, no network, unreachable from A
        hosts.kill(b)
        assert b.pids() == [] and len(ours(net)) == 3
        assert hosts.ssh(a, f"python3 -c \"{banner}\"", check=False).returncode != 0
    assert ours(net) == [] and not hosts.workdir.exists()


def test_hosts_are_torn_down_when_a_step_fails():
    net = 79
    with pytest.raises(RuntimeError, match="no sshd"):
        with Hosts(1, WORKDIR, net) as hosts:
            hosts.kill(hosts[0])
            hosts.wait_ssh(hosts[0], timeout=1)
    assert ours(net) == [] and not hosts.workdir.exists()


def test_the_launchers_private_tmp_keeps_a_checkout_under_tmp(tmp_path):
    """`ray` runs with its own /tmp; a checkout under /tmp (a fresh clone there, as in the first
    run on a fresh machine: `.venv/bin/ray: not found`) stays at its own path inside it."""
    from bench.launch import keep_visible

    checkout, private = tmp_path / "clone", WORKDIR / f"private-tmp-{os.getpid()}"
    checkout.mkdir()
    (checkout / "ray").write_text("#!/bin/sh\necho ran from $0\n")
    (checkout / "ray").chmod(0o755)
    private.mkdir(parents=True)
    try:
        line = keep_visible(checkout, private) + 'mount --rbind "$0" /tmp && exec "$@"'
        run = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                              line, str(private), str(checkout / "ray")],
                             capture_output=True, text=True)
        assert run.returncode == 0 and run.stdout == f"ran from {checkout / 'ray'}\n", run
        assert not any((private / checkout.relative_to("/tmp")).iterdir())  # bound in there only
        assert keep_visible(WORKDIR, private) == ""
    finally:
        subprocess.run(["rm", "-rf", str(private)], check=True)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_ray_up_on_test_hosts_runs_the_documented_sweep(request):
    if "launch" not in (request.config.option.markexpr or ""):
        pytest.skip("the real `ray up` takes about 14 minutes: pytest -m launch runs it")
    from bench.launch import LaunchOptions, run

    result = run(LaunchOptions(workdir=WORKDIR, net=80))
    assert result["checks"] == "passed" and result["sweep_rc"] == 0
    workers = {f"{PREFIX}n80-1", f"{PREFIX}n80-2"}
    assert workers <= set(result["trials_per_host"]), result["trials_per_host"]
    assert set(result["trainings_per_key"].values()) == {1}, result["trainings_per_key"]
    assert not any(result["ray_left_on_hosts"].values()), result["ray_left_on_hosts"]
    assert ours(80) == []
