"""A simulated Ray cluster on one machine: the project's real driver, searcher, scheduler, storage,
leases and result files on Ray's own multi-node `Cluster` (logical CPUs and GPUs), with stand-in
training of fixed duration where the real one would not fit this machine.

    python bench/sim_cluster.py scale --nodes 8 --trials 200 --part-s 2 --out scale.json
    python bench/sim_cluster.py leases --waiters 64 --keys 15 --out leases.json
    python bench/sim_cluster.py tpe --trials 1000 --running 64 --out tpe.json
    python bench/sim_cluster.py placement --out placement.json
    python bench/sim_cluster.py stage1 --out stage1.json

Each scenario lives in `bench/sim/<scenario>.py` (`add_arguments(parser)`, `run(args) -> dict`,
`verdict(result) -> str`); this file writes the JSON and prints the verdict line last. The loopback
cluster shares this machine's cores: it measures algorithmic growth, not bandwidth.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmg.errors import exit_on_usage_error  # noqa: E402  (bad input: one line, exit 2)

SCENARIOS = ("scale", "leases", "tpe", "placement", "stage1")


@exit_on_usage_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="scenario", required=True)
    modules = {}
    for name in SCENARIOS:
        if importlib.util.find_spec(f"bench.sim.{name}") is None:  # a scenario not written yet
            continue
        module = importlib.import_module(f"bench.sim.{name}")
        modules[name] = module
        sub = commands.add_parser(name, help=module.__doc__.split("\n")[0],
                                  description=module.__doc__)
        sub.add_argument("--out", type=Path, help="write the result JSON here")
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    module = modules[args.scenario]
    result = module.run(args)
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    print(module.verdict(result))


if __name__ == "__main__":
    main()
