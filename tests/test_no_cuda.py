"""A GPU that torch cannot use fails a trial before it trains, in one line: Ray on this CPU
machine with a logical GPU is exactly a node whose NVIDIA driver does not match torch's CUDA
(Ray hands out the GPU, torch.cuda.is_available() is False). Without the check the trial and the
stage-1 prewarm would silently train on the CPU."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import SWEEP_SMOKE, run_sweep
from tune.artifacts import ArtifactStore

NO_CUDA = "finds no CUDA device there: check `nvidia-smi` on that node"


@pytest.fixture(scope="module")
def gpu_without_cuda():
    """A one-node Ray with 2 CPUs and one logical GPU; shut down by this test alone."""
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.mark.slow  # about 80 s: a one-node Ray and a sweep in a subprocess
def test_a_trial_and_a_prewarm_task_given_a_gpu_without_cuda_fail_in_one_line(
        gpu_without_cuda, tmp_path):
    assert not __import__("torch").cuda.is_available()  # the premise: no CUDA on this machine
    proc = run_sweep("--address", gpu_without_cuda.address, "--setting", "synthetic_cifar10",
                     "--gpus-per-trial", "1", "--num-samples", "1", "--max-failures", "0",
                     "--storage", str(tmp_path), "--name", "nocuda", *SWEEP_SMOKE)
    said = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    # one line for the trial, one for the 20 stage-1 models of the prewarm (5 partitions x a
    # classifier and 3 CVAEs), each naming the cause and the fix
    failed = [line for line in said if NO_CUDA in line]
    assert len(failed) == 2 and failed[0].startswith("[trial ") and failed[1].startswith(
        "[sweep] 20 stage-1 models failed (classifier of partition 1"), said
    assert all("given 1 GPU on node" in line for line in said if NO_CUDA in line)
    assert "1 trials (0 complete, 0 pruned, 1 failed)" in proc.stdout + proc.stderr
    # nothing trained: no stage-1 training started, no partition finished
    store = ArtifactStore(str(tmp_path / "stage1"))
    assert store.keys() == [] and not list(tmp_path.glob("**/trainings/*.json"))
    assert not list(tmp_path.glob("nocuda/trial-*/partitions.jsonl"))
