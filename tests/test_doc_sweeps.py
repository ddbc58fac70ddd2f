"""The documented sweep lines run as written, in the order written: read with tune.sweep's own
parser and naming rule, each line that starts a sweep names an experiment of its own, or is the
very command that made it (which prints that sweep's summary and exits 0), and each --resume
continues a sweep an earlier line started. A line whose --name is a placeholder (NAME) is a
template, not a command. Nothing runs: the behaviour each rule relies on is tests/test_arms.py's.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from conftest import ROOT
from tune.sweep import build_parser, experiment_name

COMMAND = re.compile(r"python -m tune\.sweep((?:[^\n\\#]|\\\n)*)")
PLACEHOLDER = re.compile(r"[A-Z][A-Z_]+")


def sweep_lines(page: Path) -> list[tuple[str, list[str]]]:
    """(where, argv) of every `python -m tune.sweep` line in the page's bash blocks, in order."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for match in COMMAND.finditer(block):
            argv = shlex.split(match[1].replace("\\\n", " "))
            lines.append((f"{page.name}: {match[0].splitlines()[0].strip()}", argv))
    return lines


def conflicts(lines: list[tuple[str, list[str]]]) -> list[str]:
    """What would fail if the lines ran in this order on one storage."""
    parser, started, out = build_parser(), {}, []
    for where, argv in lines:
        args = parser.parse_args(argv)
        if args.name and PLACEHOLDER.fullmatch(args.name):
            continue
        key = (args.storage, experiment_name(args))
        if args.resume and key not in started:
            out.append(f"{where}: resumes {key[1]}, which no earlier line starts")
        elif not args.resume and key in started and started[key][1] != argv:
            out.append(f"{where}: {key[1]} was started by {started[key][0]} with other options; "
                       "give it its own --name")
        if not args.resume:
            started.setdefault(key, (where, argv))
    return out


def test_docs_sweeps_lines_run_in_the_order_written():
    lines = sweep_lines(ROOT / "docs" / "sweeps.md")
    assert len(lines) >= 6
    assert conflicts(lines) == []


def test_readme_then_docs_sweeps_lines_run_in_the_order_written():
    lines = sweep_lines(ROOT / "README.md") + sweep_lines(ROOT / "docs" / "sweeps.md")
    assert conflicts(lines) == []


def test_a_reused_name_or_a_resume_of_nothing_is_found():
    lines = [("a", ["--budget", "quick"]), ("b", ["--budget", "quick"]),
             ("c", ["--budget", "quick", "--num-samples", "200"]),
             ("d", ["--name", "x", "--resume"]), ("e", ["--name", "NAME", "--resume"]),
             ("f", ["--name", "x"]), ("g", ["--name", "x", "--resume"])]
    assert [c.split(":")[0] for c in conflicts(lines)] == ["c", "d"]
