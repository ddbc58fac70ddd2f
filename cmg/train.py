"""`python -m cmg.train`: stage 1, compatible with the reference's `python -m train` flags.

    python -m cmg.train --task same_dataset_mnist --partition partition1 \
        --command train_classifier --device cpu --params-dict-name ckpt/main_model_partition1.pt
    python -m cmg.train --task same_dataset_mnist --partition partition1 \
        --command train_cvae --params-dict-name ckpt/cvae_partition1.pt

Running the same command again resumes an interrupted training from its last epoch.
"""

from __future__ import annotations

import sys

from cmg.cli import add_common_args, setup_run
from cmg.data import setting_names
from cmg.errors import OneLineParser, command_parser, exit_on_usage_error, fail
from cmg.pipeline import load_partition
from cmg.stage1 import train_classifier, train_cvae

COMMANDS = {"train_classifier": "classifier", "train_cvae": "cvae"}


def build_parser() -> OneLineParser:
    p = command_parser("python -m cmg.train", __doc__)
    p.add_argument("--task", default="same_dataset_mnist",
                   help=f"data setting: {', '.join(setting_names())}")
    p.add_argument("--partition", default="partition1", help="partition1..partition5 (or 1..5)")
    p.add_argument("--command", default="train_classifier", help=", ".join(COMMANDS))
    p.add_argument("--params-dict-name", default=None,
                   help="checkpoint to write (default: ckpt/KIND_TASK_partitionN.pt)")
    add_common_args(p)
    return p


@exit_on_usage_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setting, partition, cfg, device = setup_run(args, args.task, args.partition)
    if args.command not in COMMANDS:
        fail(f"unknown command '{args.command}'; choose one of {', '.join(COMMANDS)}")
    kind = COMMANDS[args.command]
    path = args.params_dict_name or f"ckpt/{kind}_{setting.name}_partition{partition}.pt"
    split = load_partition(setting.name, partition, cfg, device, args.data_root, args.download,
                           ood_datasets=None)  # stage 1 trains on IND images only
    if kind == "classifier":
        train_classifier(split, cfg.classifier, device, path, quiet=args.quiet)
    else:
        train_cvae(split, cfg.cvae, device, path, quiet=args.quiet)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
