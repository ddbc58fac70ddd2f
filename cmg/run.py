"""`python -m cmg.run`: the whole CMG pipeline for one partition, written to DIR/metrics.json.

    python -m cmg.run --setting same_dataset_mnist --partition 1 --mode CMG-energy \
        --budget quick --out runs/mnist_p1
    python -m cmg.run --setting different_dataset --ood-dataset all --out runs/cifar_vs_all
    python -m cmg.run --setting different_dataset --backbone csi/last.model --backbone-format csi
"""

from __future__ import annotations

import sys

from cmg.cli import (add_backbone_args, add_common_args, add_compile_arg, add_ood_dataset_arg,
                     add_setting_args, backbone_from_args, setup_run, summary_lines, write_json)
from cmg.config import MODES
from cmg.errors import OneLineParser, command_parser, ensure_writable_dir, exit_on_usage_error
from cmg.pipeline import load_partition, run_partition


def build_parser() -> OneLineParser:
    p = command_parser("python -m cmg.run", __doc__)
    add_setting_args(p)
    p.add_argument("--partition", default="1", help="1..5 (or partition1..partition5)")
    p.add_argument("--mode", default="CMG-energy", help=f"stage-2 loss: {', '.join(MODES)}")
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/SETTING_pN_MODE); holds metrics.json "
                        "and the stage-1 checkpoints, which a rerun reuses")
    p.add_argument("--stage1-dir", default=None,
                   help="folder of the stage-1 checkpoints (default: --out); point runs of "
                        "both modes at one folder to train stage 1 once")
    add_ood_dataset_arg(p)
    add_backbone_args(p)
    add_compile_arg(p)
    add_common_args(p)
    return p


@exit_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setting, partition, cfg, device = setup_run(args, args.setting, args.partition, args.mode,
                                                args.setting_modules)
    backbone = backbone_from_args(args, (partition,))
    out = ensure_writable_dir(args.out or f"runs/{setting.name}_p{partition}_{args.mode}")
    if backbone is not None:  # a bad file fails before the data is loaded
        backbone.load(len(setting.ind_classes(partition)), setting.family,
                      cfg.classifier.head_width, trained_for=(setting.name, partition, cfg.data))
    split = load_partition(setting.name, partition, cfg, device, args.data_root, args.download,
                           args.ood_dataset)
    metrics = run_partition(split, cfg, device, workdir=args.stage1_dir or out,
                            budget=args.budget, quiet=args.quiet, backbone=backbone,
                            compile_model=args.compile)
    write_json(out / "metrics.json", metrics)
    print("\n".join(summary_lines(metrics)))
    print(f"wrote {out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
