"""What bench/stage1.py and bench/stage2.py share: the reference-style data path (a torchvision-style
Dataset with per-image ToTensor and a DataLoader), stage-1 models to benchmark with, timing and
peak memory, and the one-line JSON result."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmg.cli import add_data_root_arg, resolve_device  # noqa: E402
from cmg.config import budget_config  # noqa: E402
from cmg.data import SAME_DATASET_PARTITIONS, Setting, register_setting  # noqa: E402
from cmg.data.synthetic import load_synthetic_cifar10  # noqa: E402
from cmg.errors import describe, help_formatter  # noqa: E402
from cmg.metrics import ood_metrics  # noqa: E402
from cmg.pipeline import load_partition  # noqa: E402

# CIFAR shapes at CIFAR-10's size (50k train, 10k test images), for benchmarks without CIFAR-10
register_setting(Setting(
    "synthetic_cifar10_50k", family="cifar", partitions=SAME_DATASET_PARTITIONS,
    source=lambda root, download=False: load_synthetic_cifar10(root, download, 50000, 10000)))


class ReferenceDataset(torch.utils.data.Dataset):
    """Like torchvision's MNIST/CIFAR10: one PIL image per item, `ToTensor()` per image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        x = images.cpu().numpy()
        self.images = x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)  # HW or HWC
        self.labels = labels.cpu().numpy()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from torchvision.transforms.functional import to_tensor

        return to_tensor(Image.fromarray(self.images[i])), int(self.labels[i])


def reference_loader(images, labels, batch_size: int, device: torch.device, shuffle=True):
    # the reference used 8 workers on a GPU machine; worker processes cost more than they save
    # on this 2-core CPU, so none there
    workers = 8 if device.type == "cuda" else 0
    return torch.utils.data.DataLoader(ReferenceDataset(images, labels), batch_size=batch_size,
                                       shuffle=shuffle, num_workers=workers,
                                       pin_memory=device.type == "cuda")


def parser(doc: str, size: int, epochs: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=describe(doc), formatter_class=help_formatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--setting", default="same_dataset_mnist",
                   help="same_dataset_mnist, synthetic_cifar10_50k (CIFAR shapes and size), ...")
    p.add_argument("--partition", type=int, default=1, help="class partition, 1..5")
    p.add_argument("--size", type=int, default=size, help="IND training images")
    if epochs:
        p.add_argument("--epochs", type=int, default=2, help="epochs of each model")
    add_data_root_arg(p)
    return p


def setup(args, overrides: list[str]):
    device = resolve_device(args.device)
    torch.manual_seed(0)
    family = "cifar" if "cifar" in args.setting else "mnist"
    cfg = budget_config("smoke", family, [f"data.train_limit={args.size}", *overrides])
    split = load_partition(args.setting, args.partition, cfg, device, args.data_root)
    return device, cfg, split


@contextmanager
def timed(device: torch.device, out: dict, key: str):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
        out[f"{key}_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    out[f"{key}_s"] = time.perf_counter() - start


def peak_mem_mb(device: torch.device, measured: dict) -> float:
    """GPU: the larger of both ways' peak allocation; CPU: the process's peak resident size."""
    if device.type == "cuda":
        return round(max(v for k, v in measured.items() if k.endswith("_peak_mb")), 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def report(images: int, measured: dict, device: torch.device, extra: dict | None = None) -> dict:
    """Print both ways and their ratio; the last line is one JSON object."""
    ref, eng = images / measured["reference_s"], images / measured["engine_s"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"reference_ips": round(ref, 1), "engine_ips": round(eng, 1),
              "ratio": round(eng / ref, 2), "peak_mem_mb": peak_mem_mb(device, measured),
              "device": name, **(extra or {})}
    print(f"reference-style: {ref:10.1f} images/s ({measured['reference_s']:.2f} s)")
    print(f"engine:          {eng:10.1f} images/s ({measured['engine_s']:.2f} s)")
    print(f"ratio engine/reference: {result['ratio']}x on {name}")
    print(json.dumps(result))
    return result


def auroc(score_ind: torch.Tensor, score_ood: torch.Tensor) -> float:
    return ood_metrics(score_ind, score_ood)["auroc"]
