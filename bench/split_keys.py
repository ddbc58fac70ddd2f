"""What separate classifier and CVAE keys save: the same sweep on fresh stores, split keys against
combined ones (format 1: a classifier per CVAE config), in one run.

    python bench/split_keys.py                          # demo budget, 3 latent sizes, 2 trials
    python bench/split_keys.py --budget smoke --num-samples 1

Each arm is a real `python -m tune.sweep` (local Ray, the prewarm of every reachable stage-1
model, then the trials) in its own process and storage. The combined arm runs the same code with
the classifier's key also hashing the CVAE's config (a setting module, imported by the driver and
every worker, patches `tune.artifacts.classifier_key`), so every latent size retrains an identical
classifier, as stores of format 1 did. The last line is one JSON object: each arm's wall seconds,
models trained and summed training seconds, and the ratios split / combined.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMBINED = '''
import tune.artifacts as artifacts

_classifier_key = artifacts.classifier_key


def combined_key(setting, partition, cfg, backbone=None):
    """Format 1: the classifier keyed with the CVAE's config too."""
    cvae = artifacts.cvae_key(setting, partition, cfg).rsplit("-", 1)[1]
    return f"{_classifier_key(setting, partition, cfg, backbone)}-{cvae}"


artifacts.classifier_key = combined_key
'''


def run_arm(name: str, work: Path, args: argparse.Namespace) -> dict:
    storage = work / name
    storage.mkdir()
    (storage / "space.yaml").write_text(f"latent_dim: {{choices: {args.latents}}}\n")
    setting = args.setting
    if name == "combined":
        (storage / "combined_keys.py").write_text(COMBINED)
        setting = f"combined_keys:{args.setting}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(storage), str(ROOT)])}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tune.sweep", "--setting", setting, "--budget",
                           args.budget, "--num-samples", str(args.num_samples), "--storage",
                           str(storage), "--name", "bench", "--space", str(storage / "space.yaml"),
                           "--scheduler", "none", "--no-report", "--quiet"],
                          cwd=storage, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"the {name} sweep failed:\n{proc.stderr[-3000:]}")
    metas = [json.loads(p.read_text()) for p in (storage / "stage1").glob("*/meta.json")]
    return {"wall_s": round(wall, 1),
            "classifiers": sum(m["kind"] == "classifier" for m in metas),
            "cvaes": sum(m["kind"] == "cvae" for m in metas),
            "train_s": round(sum(m["seconds"] for m in metas), 1),
            "classifier_train_s": round(sum(m["seconds"] for m in metas
                                            if m["kind"] == "classifier"), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="demo")
    p.add_argument("--setting", default="same_dataset_mnist")
    p.add_argument("--num-samples", type=int, default=2)
    p.add_argument("--latents", type=lambda s: [int(v) for v in s.split(",")],
                   default=[16, 32, 64], help="searched latent sizes (default 16,32,64)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="cmg-bench-keys-") as work:
        arms = {name: run_arm(name, Path(work), args) for name in ("split", "combined")}
    result = {"budget": args.budget, "setting": args.setting, "latents": args.latents,
              "num_samples": args.num_samples, **arms,
              "wall_ratio": round(arms["split"]["wall_s"] / arms["combined"]["wall_s"], 3),
              "train_s_ratio": round(arms["split"]["train_s"] / arms["combined"]["train_s"], 3)}
    print(f"split keys: {arms['split']['classifiers']} classifiers + {arms['split']['cvaes']} "
          f"CVAEs in {arms['split']['wall_s']} s; combined: {arms['combined']['classifiers']} + "
          f"{arms['combined']['cvaes']} in {arms['combined']['wall_s']} s; wall ratio "
          f"{result['wall_ratio']}, training-seconds ratio {result['train_s_ratio']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
