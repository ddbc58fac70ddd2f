"""Which stage-1 models the prewarm trains: every one the space can reach, once, partition by
partition (no Ray: the enumeration and the store's view of what is missing)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cmg.config import budget_config, cell_seed
from tune.artifacts import ArtifactStore, stage1_keys
from tune.prewarm import every_partition, missing_jobs, reachable_configs
from tune.replicate import point_cells
from tune.space import Param, default_space
from tune.spec import SweepOptions, SweepSpec
from tune.sweep import build_parser

BASE = budget_config("smoke")


def _spec(storage: str, partitions=(1, 2)) -> SweepSpec:
    """A sweep of the smoke budget's default space over PARTITIONS (every option at its
    default)."""
    options = SweepOptions.from_dict({**vars(build_parser().parse_args([])), "storage": storage,
                                      "name": "x", "data_root": "", "data_root_given": None})
    return SweepSpec(options, setting="same_dataset_mnist", modules=(), partitions=partitions,
                     modes=("CMG-energy",), base=BASE, space=default_space(BASE), first={})


def test_every_searched_latent_size_is_reachable_and_continuous_knobs_keep_the_base():
    space = default_space(BASE)
    configs = reachable_configs(BASE, space)
    assert configs[0] == BASE  # the base first: its models are ready first
    assert sorted(c.cvae.latent_dim for c in configs) == [16, 32, 64]
    assert {c.classifier for c in configs} == {BASE.classifier}  # stage 2's knobs: no new models
    fixed = {**space, "latent_dim": replace(space["latent_dim"], fixed=16)}
    assert [c.cvae.latent_dim for c in reachable_configs(BASE, fixed)] == [BASE.cvae.latent_dim, 16]
    wide = {"kl": Param("cvae.kl_weight", "float", 0.1, 1.0)}  # continuous: not enumerable
    assert reachable_configs(BASE, wide) == [BASE]
    few = {"epochs": Param("cvae.epochs", "int", 1, 3)}  # a small integer range: every value
    assert sorted(c.cvae.epochs for c in reachable_configs(BASE, few)) == sorted(
        {1, 2, 3, BASE.cvae.epochs})


def test_one_job_per_missing_key_partition_by_partition_classifier_first(tmp_path):
    spec = _spec(str(tmp_path))
    cells = every_partition(spec, reachable_configs(BASE, spec.space))
    jobs = missing_jobs(spec, cells)
    assert [(j.partition, j.kind) for j in jobs] == [
        (p, kind) for p in (1, 2) for kind in ("classifier", "cvae", "cvae", "cvae")]
    assert len({j.key for j in jobs}) == len(jobs) == 8  # 2 classifiers, 3 x 2 CVAEs
    store = ArtifactStore(spec.stage1_store)
    done = stage1_keys(spec.setting, 1, BASE)  # partition 1's base models are in the store
    for key in done:
        store.write_json(key, "meta.json", {})
    left = missing_jobs(spec, cells)
    assert {j.key for j in left} == {j.key for j in jobs} - set(done)


def test_a_replicate_point_runs_each_partition_on_its_own_seed_and_split():
    spec = _spec("")
    point = {"source_trial": "t1", "seed": 4, "arm": "none", "mode": "CMG-energy", "sigma": 2.0,
             "mask_prob": None, "latent_dim": 64}
    cells = point_cells(point, spec)
    assert [p for p, _ in cells] == [1, 2]
    for partition, cfg in cells:
        seed = cell_seed(4, partition)
        assert cfg.cvae.latent_dim == 64 and cfg.stage2.sigma == 2.0
        assert cfg.stage2.pseudo_ood == "none"  # the arm
        assert cfg.classifier.seed == cfg.cvae.seed == cfg.stage2.seed == cfg.data.split_seed \
            == seed
    assert len({cell_seed(s, p) for s in range(1, 6) for p in range(1, 6)}) == 25
    # CMG and a control arm of a cell share its stage-1 models
    mixed = point_cells({**point, "arm": "mixed"}, spec)
    assert [stage1_keys(spec.setting, p, c) for p, c in mixed] == [
        stage1_keys(spec.setting, p, c) for p, c in cells]


@pytest.mark.slow  # about a minute: a 2-node Ray, 2 stand-in trainings of 15 s
def test_on_a_cold_cluster_the_search_waits_until_every_stage1_task_holds_its_gpu(tmp_path):
    """No GPU up: the prewarm's tasks are pending, and so are any trials that would start now; a
    trial could take the first GPU and train a model inside its slot. So the search waits (the
    wait returned at once before: 2 models, fewer than the 5 slots of the node types) until a GPU
    node is up and each model left is in training under its lease, where a trial would wait."""
    import threading
    import time

    import ray
    from ray.cluster_utils import Cluster

    from bench.sim.harness import Stage1StandIn
    from tune.prewarm import Prewarm
    from tune.leases import create_leases

    spec = _spec(str(tmp_path), partitions=(1,))
    space = {k: p for k, p in spec.space.items() if not p.key.startswith("cvae.")}
    cells = every_partition(spec, reachable_configs(BASE, space))  # 1 classifier, 1 CVAE
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                            "include_dashboard": False})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        leases = create_leases(spec.stage1_store)
        prewarm = Prewarm(spec, cells, cpus=1, gpus=1,
                          task=Stage1StandIn(train_s=15, log_dir=tmp_path / "logs"))
        (tmp_path / "logs").mkdir()
        assert prewarm.submit(quiet=True) == 2
        keys = [job.key for job in prewarm.jobs]
        returned = threading.Event()
        waiting = threading.Thread(target=lambda: (prewarm.wait_for_slots(5), returned.set()))
        waiting.start()
        assert not returned.wait(6)  # cold: no GPU, both tasks pending, no trial may start
        assert ray.get(leases.taken.remote(keys)) == [False, False]
        cluster.add_node(num_cpus=2, num_gpus=2)  # the first GPU node boots
        assert returned.wait(240)
        # the moment trials may start: each model is published or in training under its lease
        assert ray.get(leases.taken.remote(keys)) == [True, True]
        assert not any(ArtifactStore(spec.stage1_store).exists(key) for key in keys)  # training
        assert prewarm.finish() == []
        store = ArtifactStore(spec.stage1_store)
        assert [[r["owner"] for r in store.trainings(key)] for key in keys] == [
            ["x/prewarm-classifier-p1"], ["x/prewarm-cvae-p1"]]
        waiting.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
