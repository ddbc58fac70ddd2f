"""Pack a sweep storage's records so that another machine can continue its experiments: every file
of the sweeps, their arms' studies and replicates, except what the run makes again or no report
reads: the stage-1 store (`STORAGE/stage1`: the prewarm trains those models again, first), the
stage-2 heads (`heads/`, read by tune.export only) and the per-image scores of trials that cannot
be a report's best (a sweep trial stopped early, and every replicate); the scores of complete
trials and of those Tune will go on with stay. The published stage-1 digests go beside, as
`NAME-stage1-digests.json`, to check the models trained again against.

    python scripts/pack_storage.py /work/headline results/headline-in-progress.tar.xz
    tar -xJf results/headline-in-progress.tar.xz -C /work     # later, elsewhere: /work/headline
"""

from __future__ import annotations

import functools
import io
import json
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmg.results import ROWS_FILE  # noqa: E402


@functools.cache
def going_on(study: Path) -> frozenset[str]:
    """The trial ids that Tune's latest saved state of STUDY holds as not terminated (paused,
    running, pending): a resume goes on with them."""
    states = sorted(study.glob("experiment_state-*.json"))
    if not states:
        return frozenset()
    trials = (json.loads(entry[0]) for entry in json.loads(states[-1].read_text())["trial_data"])
    return frozenset(t["trial_id"] for t in trials if t.get("status") != "TERMINATED")


def kept(path: Path, storage: Path, partitions: int) -> bool:
    """Whether PATH (a file under STORAGE) goes into the pack."""
    parts = path.relative_to(storage).parts
    if parts[0] == "stage1" or "heads" in parts:
        return False
    if "scores" not in parts:
        return True
    trial = path.parent.parent
    return "replicate" not in parts and (
        complete(trial, partitions) or trial.name.rsplit("-", 1)[-1] in going_on(trial.parent))


@functools.cache
def complete(trial: Path, partitions: int) -> bool:
    """Whether TRIAL has a row for every partition (read once per trial, not per scores file)."""
    rows = trial / ROWS_FILE
    return rows.exists() and len(rows.read_text().splitlines()) >= partitions


def pack(storage: Path, out: Path, partitions: int = 5) -> tuple[int, int]:
    """Write OUT (.tar.xz) from STORAGE; return (files kept, files left out)."""
    files = [p for p in sorted(storage.rglob("*")) if p.is_file()]
    keep = [p for p in files if kept(p, storage, partitions)]
    digests = {meta.parent.name: json.loads(meta.read_text()).get("digests")
               for meta in sorted((storage / "stage1").glob("*/meta.json"))}
    with tarfile.open(out, "w:xz") as tar:
        for path in keep:
            tar.add(path, arcname=str(Path(storage.name) / path.relative_to(storage)))
        data = json.dumps(digests, indent=1, sort_keys=True).encode()
        info = tarfile.TarInfo(f"{storage.name}-stage1-digests.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return len(keep), len(files) - len(keep)


if __name__ == "__main__":
    if len(sys.argv) != 3 or not Path(sys.argv[1]).is_dir():
        print("usage: python scripts/pack_storage.py STORAGE OUT.tar.xz (STORAGE: a sweep "
              "storage folder)", file=sys.stderr)
        sys.exit(2)
    n_kept, n_left = pack(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{sys.argv[2]}: {n_kept} files, {n_left} left out, "
          f"{Path(sys.argv[2]).stat().st_size / 1e6:.1f} MB")
