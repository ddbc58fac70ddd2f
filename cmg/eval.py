"""`python -m cmg.eval`: stage 2 and evaluation, compatible with the reference's `python -m eval`.

    python -m cmg.eval --task same_dataset_mnist --partition partition1 --device cpu \
        --params-dict-name ckpt/main_model_partition1.pt \
        --params-dict-name2 ckpt/cvae_partition1.pt --mode CMG-energy

Reports validation and test metrics of the head selected on validation data, beside the
max-softmax, energy and max-logit baselines of the same stage-1 classifier.
"""

from __future__ import annotations

import sys
import time

from cmg.cli import add_common_args, add_ood_dataset_arg, setup_run, summary_lines, write_json
from cmg.config import MODES
from cmg.data import setting_names
from cmg.errors import OneLineParser, command_parser, exit_on_usage_error
from cmg.pipeline import load_partition, result_dict
from cmg.stage1 import load_stage1_model
from cmg.stage2 import run_stage2


def build_parser() -> OneLineParser:
    p = command_parser("python -m cmg.eval", __doc__)
    p.add_argument("--task", default="same_dataset_mnist",
                   help=f"data setting: {', '.join(setting_names())}")
    p.add_argument("--partition", default="partition1", help="partition1..partition5 (or 1..5)")
    p.add_argument("--mode", default="CMG-energy", help=", ".join(MODES))
    p.add_argument("--params-dict-name", required=True, help="classifier checkpoint")
    p.add_argument("--params-dict-name2", required=True, help="CVAE checkpoint")
    p.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    add_ood_dataset_arg(p)
    add_common_args(p)
    return p


@exit_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setting, partition, cfg, device = setup_run(args, args.task, args.partition, args.mode)
    split = load_partition(setting.name, partition, cfg, device, args.data_root, args.download,
                           args.ood_dataset)
    classifier = load_stage1_model(args.params_dict_name, "classifier", split, device)
    cvae = load_stage1_model(args.params_dict_name2, "cvae", split, device)
    start = time.perf_counter()
    result = run_stage2(classifier, cvae, split, cfg.stage2, device, cfg.classifier.amp,
                        args.quiet)
    metrics = result_dict(split, cfg, result, {"stage2": time.perf_counter() - start},
                          args.budget)
    if args.out:
        write_json(args.out, metrics)
    print("\n".join(summary_lines(metrics)))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
