"""`python -m tune.sweep`: search CMG's hyperparameters with Optuna on Ray Tune, scoring each
configuration by its validation AUROC averaged over the five partitions (Setting 2,
`different_dataset`: over the OOD data sets present, in its single partition).

    python -m tune.sweep --setting same_dataset_mnist --budget quick --num-samples 16
    python -m tune.sweep --name demo --resume      # after Ctrl-C, a kill or a crash
    python -m tune.sweep --arms all --num-samples 16  # CMG and every control arm, alike

The experiment folder (STORAGE/NAME) holds `manifest.json` (how the sweep was launched: every
resolved option, the search space, the RunConfig, versions, git commit, host), Tune's state, one
folder per trial (params.json, result.json, checkpoints), the Optuna study (`optuna.journal`,
unless --study-storage) and, at the end, `summary.json` and `report/` (python -m
analysis.report: report.md, CSV, Parquet, PNGs). Stage-1 models live in STORAGE/stage1, shared
by every sweep there.

Ctrl-C (or SIGTERM) stops a sweep cleanly: Ray Tune saves its state, the driver prints
"interrupted after N of M configurations; continue with: ..." and exits with code 130 (a second
Ctrl-C exits at once). `--resume` continues it, after any interruption, as often as needed:
options left out are taken from manifest.json; a given one that changes the setting, budget,
space, seed or any other option that shapes results is refused, naming each difference;
--num-samples and --arms may grow. A sweep that fails before its first trial removes what it
created. The same command again, once the sweep has finished, prints its summary (exit 0); a
changed one on an existing name is refused, naming each difference.

`--arms` sweeps control arms (cmg.results.ARMS) beside CMG, each in its own study with the same
number of configurations, sampler seed, scheduler and stage-1 store (trained once, by the first
study's prewarm), searching only the knobs that act on it (tune.space.arm_space): CMG's study is
the experiment itself, each other arm's is EXPERIMENT/arm-ARM (the same layout, with its own
summary.json and report/). The arms run one after another; --resume continues all of them, and
the summary prints each arm's best beside the others.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

from cmg.cli import (add_backbone_args, add_budget_args, add_compile_arg, add_data_args,
                     add_ood_dataset_arg, add_setting_args, backbone_from_args, write_json)
from cmg.config import VAL_OOD, budget_config, seed_overrides
from cmg.results import ARMS, BASELINES, MANIFEST, SUMMARY, is_uri, parse_trial_dirname
from cmg.data import load_setting, make_split, resolve_data_root, setting_modules
from cmg.errors import OneLineParser, add_quiet_arg, command_parser, exit_on_usage_error, fail
from tune.artifacts import ArtifactStore
from tune.loggers import LOGGERS, check_loggers, parse_duration
from tune.manifest import (arm_manifest, build_manifest, differences, manifest_arms,
                           with_manifest_defaults)
from tune.space import (arm_choices, check_fixed, default_space, first_point, load_space_file,
                        mode_choices)
from tune.session import exit_interrupted
from tune.spec import SweepOptions, SweepSpec, space_from_dict


def build_parser() -> OneLineParser:
    p = command_parser("python -m tune.sweep", __doc__)
    add_setting_args(p)
    p.add_argument("--mode", default="CMG-energy", help="CMG-energy, CMG-softmax or both")
    p.add_argument("--arms", default=None, metavar="ARMS",
                   help="also sweep these control arms (stage2.pseudo_ood, comma-separated: "
                        + ", ".join(a for a in ARMS if a != "mixed") + "; or all), each in its "
                        "own study beside CMG's with the same number of configurations, sampler "
                        "seed, scheduler and stage-1 models, searching only the knobs that act "
                        "on it (default: CMG's study alone)")
    p.add_argument("--select-on", default="unseen", choices=list(VAL_OOD),
                   help="the validation OOD that selection (epoch, search, ASHA, leaderboard) "
                        "reads: 'unseen', held-out training images of the test's OOD classes, "
                        "or 'rotated', IND validation images turned by 90/180/270 degrees, so "
                        "that no unseen-class image is seen before the test (Setting 1)")
    add_budget_args(p)
    p.add_argument("--num-samples", type=int, default=16, help="configurations to try")
    p.add_argument("--time-budget", default=None, metavar="DURATION", type=parse_duration,
                   help="stop the search after this long (e.g. 90m, 2h, 3600 seconds; the "
                        "stage-1 prewarm counts): no new trial starts, running ones stop with the "
                        "partitions they finished, and the sweep ends with its summary and report")
    p.add_argument("--storage", default="experiments",
                   help="folder or pyarrow URI (s3://..., gs://...) for experiments and stage-1 models")
    p.add_argument("--name", default=None, help="experiment name (default: SETTING-MODE-BUDGET)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep (or a finished one, with more "
                        "--num-samples or --arms)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and of every model")
    p.add_argument("--space", default=None, help="YAML file that overrides search ranges")
    p.add_argument("--study-storage", default=None,
                   help="Optuna storage URL, e.g. postgresql://... (default: a journal file in "
                        "the experiment folder)")
    p.add_argument("--scheduler", default="asha", choices=["asha", "none"],
                   help="early stopping over partitions")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial, fractions pack trials on a GPU (default: a whole GPU "
                        "when the cluster or its autoscaler's node types have GPUs, 1/k of one "
                        "when --max-concurrent asks for k trials per GPU; else 0)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: as many as the cluster's nodes, or the node "
                        "types its autoscaler can add, run at once)")
    p.add_argument("--max-failures", type=int, default=5,
                   help="retries of a failed trial, each from its last finished partition: a "
                        "lost (spot) node costs one; a diverged configuration fails at once")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join, e.g. auto or HOST:6379 (default: a local Ray)")
    p.add_argument("--wait-for-nodes", default=parse_duration("20m"), metavar="DURATION",
                   type=parse_duration,
                   help="on an autoscaling cluster with no node up that can run a trial, exit "
                        "(code 2) if none joins within this long (default 20m)")
    p.add_argument("--logger", dest="loggers", action="append", default=[], choices=list(LOGGERS),
                   help="also send every trial's configuration and metrics to this tracker "
                        "(repeatable): tensorboard (event files in each trial folder), mlflow "
                        "($MLFLOW_TRACKING_URI, else EXPERIMENT/mlflow.db), wandb ($WANDB_PROJECT, "
                        "$WANDB_MODE=offline)")
    p.add_argument("--no-prewarm", dest="prewarm", action="store_false",
                   help="skip training the default stage-1 models of all partitions in "
                        "parallel before the search")
    add_data_args(p)
    add_ood_dataset_arg(p)
    add_backbone_args(p)
    add_compile_arg(p)
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip writing EXPERIMENT/report (python -m analysis.report) at the end")
    add_quiet_arg(p)
    return p


def _join(storage: str, *parts: str) -> str:
    return "/".join([storage.rstrip("/"), *parts])


def _resolve_storage(storage: str) -> str:
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options that `argv` gives explicitly."""
    bare = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:  # the same options, none with a default
        if action.option_strings and action.dest != "help":
            clone = argparse.Action.__new__(type(action))
            clone.__dict__.update(action.__dict__, default=argparse.SUPPRESS)
            bare._add_action(clone)
    return set(vars(bare.parse_known_args(argv)[0]))


class SweepFinished(Exception):
    """The command is the one that made a finished sweep: nothing to run, its summary to show."""

    def __init__(self, summary: dict, storage: str, name: str):
        super().__init__(f"sweep {name} is finished")
        self.summary, self.storage, self.name = summary, storage, name


def experiment_name(args: argparse.Namespace) -> str:
    """--name, else SETTING-MODE-BUDGET (a MODULE:NAME setting is named by its NAME)."""
    return args.name or f"{args.setting.rpartition(':')[2]}-{args.mode}-{args.budget}"


def _check_rerun(experiment: str, manifest: dict, spec: SweepSpec) -> None:
    """A command without --resume on an existing sweep: the same sweep, finished, raises
    SweepFinished (its summary is printed); any other is refused in one line saying what
    differs and what to do."""
    changed = differences(manifest, spec)
    if spec.options.num_samples != manifest["options"]["num_samples"]:
        changed.append(f"--num-samples {manifest['options']['num_samples']} -> "
                       f"{spec.options.num_samples}")
    if set(spec.arms) != set(manifest_arms(manifest)) and not any("--arms" in c for c in changed):
        changed.append(f"--arms {','.join(manifest_arms(manifest))} -> {','.join(spec.arms)}")
    again = "pass --resume to continue it as it was launched (more --num-samples or --arms may " \
            "be added) or choose another --name"
    if changed:
        fail(f"experiment {experiment} exists with other settings: {'; '.join(changed)}; {again}")
    summary = finished_summary(experiment, spec.options.num_samples, spec.arms)
    if summary is None:
        fail(f"experiment {experiment} exists and has not finished; {again}")
    raise SweepFinished(summary, spec.options.storage, spec.options.name)


def finished_summary(experiment: str, num_samples: int,
                     arms: tuple[str, ...] | None = None) -> dict | None:
    """The summary.json of a study (or, with `arms`, a sweep of those arms) that ended with
    `num_samples` configurations asked for (all run, or --time-budget spent); None while it has
    not (interrupted, or --num-samples or --arms grown since; a remote experiment writes no
    summary)."""
    path = Path(experiment) / SUMMARY
    if is_uri(experiment) or not path.is_file():
        return None
    summary = json.loads(path.read_text())
    done = (summary.get("num_samples", num_samples) == num_samples  # (older summaries: no count)
            and (arms is None or set(summary.get("arms", arms[:1])) == set(arms)))
    return summary if done else None


def _probe_address(address: str | None) -> None:
    """A HOST:PORT that nothing listens on fails in seconds, not after Ray's GCS timeouts."""
    if not address or address == "auto" or is_uri(address) or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        fail(f"no Ray cluster answers at {address} ({getattr(err, 'strerror', None) or err}); "
             "start one (ray start --head) or fix --address")


def _check_resources(options: SweepOptions) -> None:
    if options.cpus_per_trial <= 0:
        fail(f"--cpus-per-trial must be above 0 (got {options.cpus_per_trial:g})")
    if options.gpus_per_trial is not None and options.gpus_per_trial < 0:
        fail(f"--gpus-per-trial must be 0 or more (got {options.gpus_per_trial:g})")


def _make_experiment_dir(experiment: str) -> Path | None:
    """Create the local experiment folder; return the top folder this call created (to remove
    it if the sweep fails before its first trial), None for a URI or an existing folder."""
    if is_uri(experiment):
        return None
    path = Path(experiment)
    top = path
    while not top.parent.exists():
        top = top.parent
    if path.exists():
        return None
    try:
        path.mkdir(parents=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe."):
            pass
    except OSError as err:
        _remove_created(top, experiment)
        fail(f"cannot create the experiment folder {experiment} ({err.strerror}); "
             "fix --storage")
    return top


def _remove_created(top: Path | None, experiment: str) -> None:
    """Undo `_make_experiment_dir` unless a trial started (its results are kept)."""
    if top is None or not top.exists() or any(parse_trial_dirname(p.name)
                                              for p in Path(experiment).glob("*")):
        return
    shutil.rmtree(top, ignore_errors=True)


def build_spec(argv: list[str]) -> tuple[SweepSpec, dict | None, bool]:
    """The sweep the command line asks for, every input checked (bad input: a UsageError before
    anything is written), with the existing manifest (--resume) and whether Tune's state exists
    to restore."""
    parser = build_parser()
    args = parser.parse_args(argv)
    storage = _resolve_storage(args.storage)
    name = experiment_name(args)
    experiment = _join(storage, name)
    store = ArtifactStore(storage)
    manifest = store.read_json(name, MANIFEST) if store.exists(name, MANIFEST) else None
    restore = store.exists(name, "tuner.pkl")  # Tune's state: restore it, else start the search
    if manifest and manifest.get("arm_of"):
        fail(f"{experiment} is an arm of sweep {manifest['arm_of']}; continue that one "
             f"(--name {manifest['arm_of']} --resume)")
    if args.resume and not (restore or manifest):
        fail(f"no sweep to resume in {experiment}; drop --resume or fix --name/--storage")
    if not args.resume and not manifest and (restore or Path(experiment).exists()):
        fail(f"experiment {experiment} exists; pass --resume to continue it or choose "
             "another --name")
    given = given_options(parser, argv)
    if manifest and args.resume:  # options left out continue the sweep as it was launched
        args = argparse.Namespace(**with_manifest_defaults(vars(args), given, manifest))
    setting = load_setting(args.setting, args.setting_modules)
    check_loggers(args.loggers, args.storage)
    modes = mode_choices(args.mode)
    arms = arm_choices(args.arms) if args.arms else None
    if arms and any(o.partition("=")[0].strip() == "stage2.pseudo_ood" for o in args.overrides):
        fail("--arms and --set stage2.pseudo_ood both choose what stage 2 trains against; "
             "drop one")
    base = budget_config(args.budget, setting.family,
                         seed_overrides(args.seed) + [f"data.val_ood={args.select_on}"]
                         + list(args.overrides))
    space = default_space(base)
    if manifest and "space" not in given:  # the space it used, even if its file changed since
        space = space_from_dict(manifest["space"])
    elif args.space:
        space = load_space_file(args.space, space)
        check_fixed(args.space, space, base)
    if args.num_samples < 1:
        fail("--num-samples must be at least 1")
    data_root = str(resolve_data_root(args.data_root))
    data_root_given = (args.data_root if "data_root" in given
                       else manifest["options"].get("data_root_given") if manifest else None)
    options = SweepOptions.from_dict({**vars(args), "storage": storage, "name": name,
                                      "arms": arms if arms != ("mixed",) else None,
                                      "data_root": data_root, "data_root_given": data_root_given})
    _check_resources(options)
    first_partition = min(setting.partitions)
    split = make_split(setting, first_partition, base.data, data_root, options.download,
                       options.ood_dataset)  # data present? (Setting 2: which OOD sets?)
    backbone = backbone_from_args(args, tuple(setting.partitions))
    spec = SweepSpec(options, setting=setting.name,
                     modules=setting_modules(options.setting, options.setting_modules),
                     partitions=tuple(setting.partitions), modes=modes, base=base, space=space,
                     first=first_point(space, base, modes),
                     ood_sets=split.ood_sets, backbone=backbone)
    if manifest and not args.resume:
        _check_rerun(experiment, manifest, spec)
    if manifest:
        changed = differences(manifest, spec)
        if changed:
            fail(f"cannot resume {experiment} with changed settings: {'; '.join(changed)}; "
                 "leave them out (they default to its manifest.json) or choose another --name")
    if backbone is not None:  # strict load now: a bad file fails before Ray starts
        backbone.load(split.num_classes, split.family, base.classifier.head_width,
                      trained_for=(setting.name, first_partition, base.data))
    if split.skipped_ood_sets:
        print(f"warning: OOD sets not found, skipped: {', '.join(split.skipped_ood_sets)}; the "
              f"objective is the mean over {', '.join(n for n, _, _ in split.ood_sets)}",
              file=sys.stderr)
    if options.study_storage or is_uri(experiment):  # a bad URL, or a remote experiment
        spec.study_storage()  # without one, fails now, before the experiment folder exists
    _probe_address(options.address)
    return spec, manifest, restore


@exit_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        spec, manifest, _ = build_spec(argv)
    except SweepFinished as done:
        print(format_summary(done.summary))
        print(f"sweep {done.name} has finished; continue it with: python -m tune.sweep --storage "
              f"{done.storage} --name {done.name} --resume (with more --num-samples or --arms), "
              "or start another with --name")
        return done.summary
    options, experiment = spec.options, spec.experiment
    store = ArtifactStore(options.storage)
    created = _make_experiment_dir(experiment)
    started = time.time()
    summaries: dict[str, dict] = {}  # each arm's, as its study ends
    try:
        if manifest:
            manifest["options"]["num_samples"] = max(manifest["options"]["num_samples"],
                                                     options.num_samples)
            manifest["options"]["arms"] = list(options.arms) if options.arms else None
            manifest["resumed"].append({"command": shlex.join(["python", "-m", "tune.sweep",
                                                               *argv]),
                                        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        manifest = manifest or build_manifest(argv, spec)
        store.write_json(options.name, MANIFEST, manifest)
        for arm in spec.arms[1:]:
            store.write_json(spec.arm(arm).options.name, MANIFEST,
                             arm_manifest(manifest, spec, arm))

        from tune.driver import SweepInterrupted, run_sweep  # imports Ray: input known good

        try:
            for arm in spec.arms:  # one after another: each study has the whole cluster
                study = spec.arm(arm)
                done = finished_summary(study.experiment, options.num_samples)
                if done and done["trials"]["total"] >= options.num_samples:
                    # (--resume) every configuration ran: no Ray (a study that --time-budget
                    # ended is restored, as before)
                    summaries[arm] = {k: v for k, v in done.items() if k != "arms"}
                    continue
                arm_started = time.time()
                summaries[arm] = run_sweep(study, store.exists(study.options.name, "tuner.pkl"))
                summaries[arm].update(num_samples=options.num_samples,
                                      wall_seconds=round(time.time() - arm_started, 1))
                if not is_uri(study.experiment):  # the study has finished, whatever comes next
                    write_json(Path(study.experiment) / SUMMARY, summaries[arm])
        except (SweepInterrupted, KeyboardInterrupt) as stop:  # (between two studies: no Ray)
            created = None  # keep everything: the sweep continues with --resume
            _interrupted(getattr(stop, "done", 0) + sum(s["trials"]["total"]
                                                         for s in summaries.values()), spec)
    except BaseException:
        _remove_created(created, experiment)
        raise
    summary = {**summaries[spec.arms[0]], "wall_seconds": round(time.time() - started, 1)}
    if len(spec.arms) > 1:
        summary["arms"] = summaries
    try:
        if not is_uri(experiment):
            write_json(Path(experiment) / SUMMARY, summary)
        print(format_summary(summary))
        for arm in spec.arms:
            if options.report and summaries[arm]["trials"]["total"]:
                print(_write_report(spec.arm(arm).experiment, options.study_storage))
    except KeyboardInterrupt:  # while reporting: --resume writes the summary and report again
        _interrupted(sum(s["trials"]["total"] for s in summaries.values()), spec)
    return summary


def _interrupted(done: int, spec: SweepSpec) -> NoReturn:
    options, arms = spec.options, len(spec.arms)
    total = f"{options.num_samples * arms} configurations" + (
        f" ({arms} arms of {options.num_samples})" if arms > 1 else "")
    exit_interrupted(f"after {done} of {total}",
                     ["python", "-m", "tune.sweep", "--storage", options.storage, "--name",
                      options.name, "--resume"])


def _write_report(experiment: str, study_storage: str | None) -> str:
    """The analysis report beside the results, EXPERIMENT/report; for a URI (s3://...) it is
    made in a local folder, then copied there."""
    import tempfile

    from pyarrow import fs as pafs

    from analysis.report import write_report
    from cmg.results import open_storage

    local = Path(tempfile.mkdtemp(prefix="cmg-report-")) if is_uri(experiment) else None
    out = (local or Path(experiment)) / "report"
    try:
        files = write_report(experiment, out, study_storage)
        if local:
            filesystem, path = open_storage(experiment)
            filesystem.create_dir(f"{path}/report")  # (a local folder must exist first)
            pafs.copy_files(str(out), f"{path}/report", destination_filesystem=filesystem)
    except Exception as err:  # the sweep's results are safe; the report can be made again later
        return f"report not written ({type(err).__name__}: {err}); python -m analysis.report {experiment}"
    finally:
        if local:
            shutil.rmtree(local, ignore_errors=True)
    where = f"{experiment}/report/{files['report'].name}" if local else files["report"]
    return f"report: {where}"


def _mean_sd(metrics: dict, name: str) -> str:
    """'mean +- sample sd over partitions' (no sd for one partition: null in summary.json)."""
    mean, sd = metrics[f"{name}_mean"], metrics[f"{name}_std"]
    return f"{mean:.4f} +- {sd:.4f}" if sd is not None else f"{mean:.4f}"


def format_summary(s: dict) -> str:
    t = s["trials"]
    lines = [f"sweep {s['name']}: {t['total']} trials ({t['complete']} complete, {t['pruned']} "
             f"pruned, {t['failed']} failed) in {s.get('wall_seconds', 0):.0f} s"]
    best = s.get("best")
    if best:
        m = best["metrics"]
        lines.append(f"best configuration (trial {best['trial_id']}): {json.dumps(best['params'])}")
        for label, prefix in (("CMG", ""), *((v, f"{k}_") for k, v in BASELINES.items())):
            lines.append(f"  {label:<12} " + "   ".join(
                f"{part} AUROC {_mean_sd(m, f'{prefix}{part}_auroc')}" for part in ("val", "test")))
        if m.get("partitions_done") == 1:
            lines.append("  (one partition: no spread)")
    else:
        lines.append("no configuration finished all its partitions")
    lines += _arm_lines(s.get("arms", {}))
    kinds = s["stage1_trained_by_kind"]
    lines += [f"stage-1 models: {s['stage1_trained']} trained ({kinds['classifier']} classifiers, "
              f"{kinds['cvae']} CVAEs), reused in {s['stage1_reused']} trial partitions"]
    if "seconds" in s:  # (summaries before it: none) what to set beside another machine's times
        lines.append(f"times: search {s['seconds']['search']:.0f} s; stage-1 training "
                     f"{s['seconds']['stage1_training']:.0f} s, summed over its models")
    lines.append(f"experiment: {s['experiment']}")
    return "\n".join(lines)


def _arm_lines(arms: dict[str, dict]) -> list[str]:
    """Each arm's study beside the others: its trials, its best's val and test AUROC and
    configuration (the baselines are the same stage-1 classifiers' for every arm)."""
    if not arms:
        return []
    width = max(map(len, arms))
    lines = [f"each arm's own study ({', '.join(arms)}): best configuration on validation"]
    for arm, s in arms.items():
        t, best = s["trials"], s.get("best")
        head = (f"  {arm:<{width}}  {t['total']} trials ({t['complete']} complete, {t['pruned']} "
                f"pruned, {t['failed']} failed)")
        if best is None:
            lines.append(f"{head}, none finished all its partitions")
            continue
        m = best["metrics"]
        lines += [f"{head}, val AUROC {_mean_sd(m, 'val_auroc')}   test AUROC "
                  f"{_mean_sd(m, 'test_auroc')}",
                  f"  {'':<{width}}  trial {best['trial_id']}: {json.dumps(best['params'])}"]
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])
