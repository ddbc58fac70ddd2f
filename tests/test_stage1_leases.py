"""Train-once-per-key under concurrency: two trials on one stage-1 key, on a real local Ray with
the sweep's real lease actor, train the models once (counted from the store's training log); the
lease service knows what is published and outlives the driver that started it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import ray
import torch
from pyarrow import fs as pafs

from cmg.config import budget_config
from cmg.data import make_split
from conftest import ROOT
from cmg.config import apply_overrides
from cmg.errors import UsageError
from cmg.stage1 import load_stage1_model
from tune.artifacts import PUBLISHER_FILE, ArtifactStore, stage1_keys
from tune.leases import PUBLISHED, Stage1Leases, create_leases, get_leases, node_id
from tune.shared_stage1 import CLAIM_SECONDS, SharedStage1

CFG = budget_config("smoke", overrides=["data.train_limit=96", "data.eval_limit=32",
                                        "classifier.epochs=1", "cvae.epochs=1"])


@pytest.fixture(scope="module")
def leases():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield Stage1Leases.remote()
    finally:
        ray.shutdown()


class StoreThatPausesAfterAMiss(ArtifactStore):
    """The real store, seen by a trial that is paused right after it found the key missing,
    until `resume` is set: the interleaving where another trial trains meanwhile."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self.missed, self.resume = threading.Event(), threading.Event()

    def exists(self, key: str, name: str = "meta.json") -> bool:
        found = super().exists(key, name)
        if name == "meta.json" and not found and not self.missed.is_set():
            self.missed.set()
            assert self.resume.wait(120), "the other trial never finished"
        return found


def test_a_trial_that_saw_the_key_missing_does_not_retrain_what_another_published(
        leases, tmp_path, mnist_available):
    split = make_split("same_dataset_mnist", 1, CFG.data)
    keys = stage1_keys(split.setting, 1, CFG)
    store = ArtifactStore(str(tmp_path))
    late = StoreThatPausesAfterAMiss(str(tmp_path))
    results = {}

    def trial(name, trial_store):
        shared = SharedStage1(trial_store, leases, owner=f"t/{name}", poll_seconds=0.05)
        results[name] = shared.ensure(split, CFG, torch.device("cpu"))

    waiting = threading.Thread(target=trial, args=("late", late))
    waiting.start()
    assert late.missed.wait(120)  # "late" found the key missing and has not asked for the lease
    try:
        trial("first", store)  # trains, publishes and frees the lease meanwhile
    finally:
        late.resume.set()
        waiting.join(300)
    assert not waiting.is_alive()
    for key in keys:  # each model trained exactly once
        assert [r["owner"] for r in store.trainings(key)] == ["t/first"]
        assert store.read_json(key)["trained_by"] == "t/first"
    assert results["first"].trained == 2 and results["late"].trained == 0
    for a, b in zip(results["first"].cvae.state_dict().values(),
                    results["late"].cvae.state_dict().values()):
        assert torch.equal(a, b)  # the late trial loaded the published models


def test_two_trials_started_together_train_once(leases, tmp_path, mnist_available):
    split = make_split("same_dataset_mnist", 2, CFG.data)
    store = ArtifactStore(str(tmp_path))
    start, results = threading.Barrier(2), {}

    def trial(name):
        start.wait()
        shared = SharedStage1(store, leases, owner=f"t/{name}", poll_seconds=0.05)
        results[name] = shared.ensure(split, CFG, torch.device("cpu"))

    threads = [threading.Thread(target=trial, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == ["a", "b"]
    keys = stage1_keys(split.setting, 2, CFG)
    assert [len(store.trainings(key)) for key in keys] == [1, 1]
    assert sum(r.trained for r in results.values()) == 2  # the two models, once each
    assert {r.keys for r in results.values()} == {keys} and set(store.keys()) == set(keys)
    # a published model keeps no per-epoch checkpoint beside it
    assert not any(store.exists(key, f"partial/{kind}.pt") for key, kind in zip(keys, keys._fields))


class StoreWithStaleMisses(ArtifactStore):
    """The real store, seen through a file system that keeps answering "meta.json missing" for
    its first `misses` looks (an NFS negative-lookup cache after another node wrote it)."""

    def __init__(self, uri: str, misses: int):
        super().__init__(uri)
        self.misses = misses

    def exists(self, key: str, name: str = "meta.json") -> bool:
        if name == "meta.json" and self.misses > 0:
            self.misses -= 1
            return False
        return super().exists(key, name)


def test_a_trial_whose_store_still_shows_the_key_missing_is_told_it_is_published(
        leases, tmp_path, mnist_available):
    split = make_split("same_dataset_mnist", 3, CFG.data)
    key = stage1_keys(split.setting, 3, CFG).classifier
    store = ArtifactStore(str(tmp_path))
    first = SharedStage1(store, leases, owner="t/first").ensure(split, CFG, torch.device("cpu"))
    assert ray.get(leases.acquire.remote(key, "t/anyone", node_id())) == PUBLISHED
    stale = StoreWithStaleMisses(str(tmp_path), misses=4)
    late = SharedStage1(stale, leases, owner="t/late", poll_seconds=0.05).ensure(
        split, CFG, torch.device("cpu"))
    assert stale.misses == 0  # it looked past the stale answers, and then loaded
    assert first.trained == 2 and late.trained == 0
    assert [r["owner"] for r in store.trainings(key)] == ["t/first"]  # trained exactly once


def test_a_new_latent_size_trains_only_a_cvae(leases, tmp_path, mnist_available):
    """The classifier's key leaves out the CVAE's knobs: a second latent size reuses the
    partition's classifier and its features, and trains only its own CVAE."""
    split = make_split("same_dataset_mnist", 4, CFG.data)
    store = ArtifactStore(str(tmp_path))
    wider = apply_overrides(CFG, {"cvae.latent_dim": 2 * CFG.cvae.latent_dim})
    first = SharedStage1(store, leases, owner="t/a").ensure(split, CFG, torch.device("cpu"))
    second = SharedStage1(store, leases, owner="t/b").ensure(split, wider, torch.device("cpu"))
    assert first.keys.classifier == second.keys.classifier != first.keys.cvae != second.keys.cvae
    assert (first.trained, second.trained) == (2, 1)
    assert second.cvae.latent_dim == 2 * first.cvae.latent_dim
    assert second.classifier is first.classifier  # the same classifier, loaded once here
    assert store.read_json(second.keys.cvae)["kind"] == "cvae"
    assert sorted(store.keys()) == sorted({*first.keys, *second.keys})


def test_a_store_of_another_format_is_refused_in_one_line(tmp_path):
    new = ArtifactStore(str(tmp_path / "new"))
    new.check_format()  # an empty store is marked with this format, and then accepted
    new.check_format()
    old = ArtifactStore(str(tmp_path / "old"))
    old.write_json("same_dataset_mnist-p1-0123456789abcdef", "meta.json", {"key": "old"})
    with pytest.raises(UsageError, match="format-1 models.*delete that folder"):
        old.check_format()


def test_the_lease_service_outlives_the_driver_that_started_it(leases, tmp_path):
    """One service per store, detached: another driver on the cluster starts it, publishes a key
    and exits; this driver then finds the same service, which still knows the key."""
    uri = str(tmp_path / "stage1")
    other_driver = textwrap.dedent(f"""
        import ray
        from tune.leases import NAMESPACE, create_leases
        ray.init(address={ray.get_runtime_context().gcs_address!r}, namespace=NAMESPACE,
                 log_to_driver=False)
        service = create_leases({uri!r})
        ray.get(service.publish.remote("p1-key"))
        print(service._actor_id.hex())
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", other_driver], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    started_by_other = proc.stdout.split()[-1]
    service = get_leases(uri)
    assert service._actor_id.hex() == started_by_other
    assert ray.get(service.acquire.remote("p1-key", "t/here", node_id())) == PUBLISHED
    assert create_leases(uri)._actor_id.hex() == started_by_other  # get_if_exists: no second one
    with pytest.raises(ValueError):  # another store has its own service (none started yet)
        get_leases(str(tmp_path / "another-store"))


class StoreThatLosesTheLeaseInTheLastEpoch(ArtifactStore):
    """The real store, whose first per-epoch checkpoint (the last epoch: 1 epoch) hands the lease
    to another owner, as a takeover after missed renewals would; then counts the trainer's looks
    for the published model while it waits."""

    def __init__(self, uri: str, leases, key: str):
        super().__init__(uri)
        self.leases, self.key, self.looks = leases, key, 0
        self.taken, self.waiting = threading.Event(), threading.Event()

    def put_file(self, key, name, local):
        super().put_file(key, name, local)
        if name.startswith("partial/") and not self.taken.is_set():
            ray.get(self.leases.release.remote(key, "t/first"))
            assert ray.get(self.leases.acquire.remote(key, "t/other", node_id())) == "granted"
            self.taken.set()

    def exists(self, key, name="meta.json"):
        if self.taken.is_set() and name == "meta.json":
            self.looks += 1
            if self.looks >= 3:
                self.waiting.set()
        return super().exists(key, name)


def test_a_trainer_whose_lease_was_taken_in_its_last_epoch_does_not_publish(
        leases, tmp_path, mnist_available):
    """Its renewals come every hour here, so only the check at publishing can see it."""
    cfg = apply_overrides(CFG, {"cvae.seed": 11})  # a key of its own on the module's service
    split = make_split("same_dataset_mnist", 5, cfg.data)
    key = stage1_keys(split.setting, 5, cfg).cvae
    store = StoreThatLosesTheLeaseInTheLastEpoch(str(tmp_path), leases, key)
    shared = SharedStage1(store, leases, owner="t/first", poll_seconds=0.05, renew_seconds=3600)
    results = {}
    trainer = threading.Thread(target=lambda: results.update(
        trained=shared.ensure_one("cvae", split, cfg, torch.device("cpu"))[0]))
    trainer.start()
    assert store.waiting.wait(300)  # it trained to the end, and now waits for "t/other"
    assert not store.exists(key) and not store.exists(key, PUBLISHER_FILE)  # nothing published
    ray.get(leases.release.remote(key, "t/other"))  # "t/other" gives up: "t/first" takes over
    trainer.join(300)
    assert results == {"trained": True}
    meta = store.read_json(key)
    assert meta["trained_by"] == "t/first" and meta["resumed_from"] == {"cvae": 1}
    assert [r["owner"] for r in store.trainings(key)] == ["t/first", "t/first"]


SECOND_USER_CFG = apply_overrides(CFG, {"cvae.seed": 12})  # a key of its own
LAPTOP = textwrap.dedent("""
    # a laptop on the cluster's store: no Ray, so no lease service to agree with
    import sys, torch
    from cmg.data import make_split
    from test_stage1_leases import SECOND_USER_CFG as cfg
    from tune.artifacts import ArtifactStore
    from tune.shared_stage1 import SharedStage1
    split = make_split("same_dataset_mnist", 5, cfg.data)
    shared = SharedStage1(ArtifactStore(sys.argv[1]), None, owner="laptop/t1")
    print(shared.ensure_one("cvae", split, cfg, torch.device("cpu"))[0])
""")


class StoreThatPausesInTraining(ArtifactStore):
    """The real store, seen by a trainer paused after its training started until `resume`."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self.started, self.resume = threading.Event(), threading.Event()

    def log_training(self, key, record):
        super().log_training(key, record)
        self.started.set()
        assert self.resume.wait(300)


def test_a_second_store_user_that_trained_the_same_key_is_refused_and_loads_the_first(
        leases, tmp_path, mnist_available):
    """A cluster (this Ray session) and a laptop (another process, no Ray) train the same key at
    once: their lease services are not the same, so both train; the laptop publishes first, and
    the cluster's publish is refused (logged), overwriting nothing: it loads the laptop's model."""
    cfg = SECOND_USER_CFG
    split = make_split("same_dataset_mnist", 5, cfg.data)
    key = stage1_keys(split.setting, 5, cfg).cvae
    store = StoreThatPausesInTraining(str(tmp_path))
    shared = SharedStage1(store, leases, owner="cluster/t1", poll_seconds=0.05)
    results = {}
    trainer = threading.Thread(target=lambda: results.update(
        trained=shared.ensure_one("cvae", split, cfg, torch.device("cpu"))[0],
        loaded=shared.ensure(split, cfg, torch.device("cpu")).cvae))
    trainer.start()
    try:
        assert store.started.wait(300)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
        env.pop("RAY_ADDRESS", None)
        laptop = subprocess.run([sys.executable, "-c", LAPTOP, str(tmp_path)], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        assert laptop.returncode == 0 and laptop.stdout.split()[-1] == "True", laptop.stderr
        published = store.read_bytes(key, "cvae.pt")
    finally:
        store.resume.set()
        trainer.join(300)
    assert results["trained"] is False  # it trained, and its publish was refused
    assert store.read_bytes(key, "cvae.pt") == published  # not overwritten
    meta, claim = store.read_json(key), store.read_json(key, PUBLISHER_FILE)
    assert meta["trained_by"] == claim["owner"] == "laptop/t1"
    assert claim["session"].startswith("no-ray/") and claim["digests"] == meta["digests"]
    refused = [store.read_json(key, f"refused/{info.base_name}") for info in store.fs.get_file_info(
        pafs.FileSelector(store.path(key, "refused")))]
    assert [(r["owner"], r["claimed_by"]["owner"]) for r in refused] == [
        ("cluster/t1", "laptop/t1")]
    assert sorted(r["owner"] for r in store.trainings(key)) == ["cluster/t1", "laptop/t1"]
    assert not store.exists(key, "partial/cvae.pt")
    laptops = load_stage1_model(store.path(key, "cvae.pt"), "cvae", split, torch.device("cpu"),
                                require_data=False).state_dict()
    for name, value in results["loaded"].state_dict().items():  # the laptop's model
        assert torch.equal(value, laptops[name])


def test_a_cached_copy_is_checked_against_the_published_digest(
        leases, tmp_path, mnist_available, monkeypatch):
    """A node's download cache is keyed by stage-1 key, not by store: a copy of the same key from
    another store (or from before it was published) is downloaded again; a store file changed
    after publishing is refused. The store is read as an object store is (through the cache)."""
    import tune.shared_stage1 as shared_stage1

    monkeypatch.setattr(shared_stage1, "CACHE", tmp_path / "cache")
    split = make_split("same_dataset_mnist", 5, CFG.data)
    key = stage1_keys(split.setting, 5, CFG).cvae
    stores = {}
    for seed, name in enumerate("ab"):  # two stores, one key, two seeds: different weights
        stores[name] = ArtifactStore(str(tmp_path / name))
        SharedStage1(stores[name], None, owner=f"{name}/t1").ensure_one(
            "cvae", split, apply_overrides(CFG, {"cvae.seed": seed}), torch.device("cpu"), key)
    a, b = stores["a"], stores["b"]
    assert a.read_bytes(key, "cvae.pt") != b.read_bytes(key, "cvae.pt")
    cached = tmp_path / "cache" / "stage1" / key / "cvae.pt"
    for store in (a, b):
        store.is_local = False  # read through the download cache, as from s3://
        path = shared_stage1._fetch(store, key, "cvae.pt")
        assert path == cached and path.read_bytes() == store.read_bytes(key, "cvae.pt")
    cached.unlink()
    b.write_bytes(key, "cvae.pt", a.read_bytes(key, "cvae.pt"))  # changed after publishing
    with pytest.raises(RuntimeError, match="is not the file published as"):
        shared_stage1._fetch(b, key, "cvae.pt")
    assert not cached.exists()


def test_a_claim_whose_publisher_died_mid_publish_is_taken_over_once_stale(tmp_path, capfd,
                                                                         mnist_available):
    """An interrupted sweep left KEY/publisher.json and no meta.json; its resumed run (another
    Ray session) publishes the key once that claim is CLAIM_SECONDS old, not never."""
    cfg = apply_overrides(CFG, {"cvae.seed": 13})
    split = make_split("same_dataset_mnist", 5, cfg.data)
    key = stage1_keys(split.setting, 5, cfg).cvae
    store = ArtifactStore(str(tmp_path))
    store.write_json(key, PUBLISHER_FILE, {"claim": "old", "owner": "sweep/t9",
                                           "session": "session_interrupted", "digests": {},
                                           "host": "elsewhere", "pid": os.getpid(),
                                           "time": time.time() - CLAIM_SECONDS - 1})
    trained, _ = SharedStage1(store, None, owner="sweep/t1").ensure_one(
        "cvae", split, cfg, torch.device("cpu"))
    assert trained and store.read_json(key)["trained_by"] == "sweep/t1"
    assert store.read_json(key, PUBLISHER_FILE)["owner"] == "sweep/t1"
    assert "taking over stage-1 key" in capfd.readouterr().err


def test_a_fresh_claim_whose_process_on_this_machine_is_gone_is_taken_over_at_once(
        tmp_path, capfd, mnist_available):
    """The same, killed a moment ago on this machine (a Ctrl-C while a model was written): its
    process is gone, so the claim is taken over without waiting CLAIM_SECONDS."""
    cfg = apply_overrides(CFG, {"cvae.seed": 14})
    split = make_split("same_dataset_mnist", 5, cfg.data)
    key = stage1_keys(split.setting, 5, cfg).cvae
    store = ArtifactStore(str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.write_json(key, PUBLISHER_FILE, {"claim": "old", "owner": "sweep/t9",
                                           "session": "session_interrupted", "digests": {},
                                           "host": socket.gethostname(), "pid": dead.pid,
                                           "time": time.time()})
    trained, _ = SharedStage1(store, None, owner="sweep/t1").ensure_one(  # else: 600 s, and
        "cvae", split, cfg, torch.device("cpu"))  # pytest's timeout first
    assert trained and store.read_json(key, PUBLISHER_FILE)["owner"] == "sweep/t1"
    assert "taking over stage-1 key" in capfd.readouterr().err
