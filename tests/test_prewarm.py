"""Which stage-1 models the prewarm trains: every one the space can reach, once, partition by
partition (no Ray: the enumeration and the store's view of what is missing)."""

from __future__ import annotations

from dataclasses import replace

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
