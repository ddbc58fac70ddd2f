"""Pack a sweep storage's records so that another machine can continue its experiments: every file
of the sweeps, their arms' studies and replicates, except what the run makes again or no report
reads: the stage-1 store (`STORAGE/stage1`: the prewarm trains those models again, first), the
stage-2 heads (`heads/`, read by tune.export only) and the per-image scores of trials that cannot
be a report's best (a sweep trial stopped early, and every replicate); the scores of complete
trials and of those Tune will go on with stay. The published stage-1 digests go beside, as
`NAME-stage1-digests.json`, to check the models trained again against.

With `--over EARLIER.tar.xz ...` the pack holds only what changed since those packs (a file they
hold with the same bytes is left out), so a repository that keeps the earlier packs grows by the
new records alone; unpack them in the order given, this one last (a later file wins). The
storage's files are only added to or rewritten while a headline runs (Tune's new state files
carry a timestamp), so nothing an earlier pack holds comes back wrongly.

    python scripts/pack_storage.py /work/headline results/headline-in-progress-1.tar.xz
    python scripts/pack_storage.py /work/headline results/headline-in-progress-2.tar.xz --over
        results/headline-in-progress-1.tar.xz             # (one line)
    for t in results/headline-in-progress-{1,2}.tar.xz; do tar -xJf "$t" -C /work; done
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmg.errors import atomic_write, command_parser  # noqa: E402
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


def sha256(data: bytes) -> str:
    """The hex SHA-256 of DATA: what says a file is unchanged since an earlier pack."""
    return hashlib.sha256(data).hexdigest()


def packed(earlier: Iterable[Path]) -> dict[str, str]:
    """The SHA-256 of each file the EARLIER packs hold, by its name there (a later pack's wins)."""
    held = {}
    for pack_file in earlier:
        with tarfile.open(pack_file) as tar:
            for member in tar:
                if member.isfile():
                    held[member.name] = sha256(tar.extractfile(member).read())
    return held


def pack(storage: Path, out: Path, partitions: int = 5,
         over: Iterable[Path] = ()) -> tuple[int, int, int]:
    """Write OUT (.tar.xz) from STORAGE, leaving out what the OVER packs hold unchanged; return
    (files packed, files left out, files unchanged since OVER)."""
    files = [p for p in sorted(storage.rglob("*")) if p.is_file()]
    keep = [p for p in files if kept(p, storage, partitions)]
    held = packed(over)
    name = {p: str(Path(storage.name) / p.relative_to(storage)) for p in keep}
    # (a file no earlier pack holds is not read here: without --over, none is)
    new = [p for p in keep if name[p] not in held or held[name[p]] != sha256(p.read_bytes())]
    digests = {meta.parent.name: json.loads(meta.read_text()).get("digests")
               for meta in sorted((storage / "stage1").glob("*/meta.json"))}
    with atomic_write(out) as handle, tarfile.open(fileobj=handle, mode="w:xz") as tar:
        for path in new:
            tar.add(path, arcname=name[path])
        data = json.dumps(digests, indent=1, sort_keys=True).encode()
        info = tarfile.TarInfo(f"{storage.name}-stage1-digests.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return len(new), len(files) - len(keep), len(keep) - len(new)


if __name__ == "__main__":
    parser = command_parser("scripts/pack_storage.py", __doc__)
    parser.add_argument("storage", type=Path, help="a sweep storage folder")
    parser.add_argument("out", type=Path, help="the pack to write (.tar.xz)")
    parser.add_argument("--over", type=Path, nargs="+", default=[], metavar="EARLIER",
                        help="earlier packs of the same storage: pack only what changed since")
    args = parser.parse_args()
    if not args.storage.is_dir():
        parser.error(f"{args.storage} is not a folder: name a sweep storage folder")
    if missing := [str(p) for p in args.over if not p.is_file()]:
        parser.error(f"--over: no pack at {', '.join(missing)}")
    n_new, n_left, n_same = pack(args.storage, args.out, over=args.over)
    since = f" ({n_same} unchanged since {len(args.over)} earlier pack(s))" if args.over else ""
    print(f"{args.out}: {n_new} files{since}, {n_left} left out, "
          f"{args.out.stat().st_size / 1e6:.1f} MB")
