"""Every command's --help reads right: a description that starts like a sentence, each default
shown once and only when it says something, shared options worded the same everywhere, and
--budget listing every budget. Add a new command to COMMANDS."""

import importlib
import re

import pytest

from cmg.config import BUDGETS

# every command line with a `build_parser()`; one list, extended when a command is added
COMMANDS = ["cmg.run", "cmg.train", "cmg.eval", "cmg.score", "tune.sweep", "tune.replicate",
            "tune.export", "analysis.report"]
# options declared once (cmg/cli.py) that must read the same in every command that has them
SHARED = ["--setting", "--setting-module", "--budget", "--set", "--device", "--data-root",
          "--download", "--quiet", "--ood-dataset", "--backbone", "--backbone-format",
          "--compile"]


def _parser(module):
    return importlib.import_module(module).build_parser()


def _option_blocks(text: str) -> dict[str, str]:
    """--help text -> {first option string: its whole help block}."""
    blocks, current = {}, None
    for line in text.splitlines():
        match = re.match(r"  (-{1,2}[\w-]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.parametrize("module", COMMANDS)
def test_help_reads_right(module, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    parser = _parser(module)
    description = parser.description or ""
    assert re.match(r"[A-Z]", description), description  # not a slice of the docstring
    text = parser.format_help()
    blocks = _option_blocks(text)
    options = [a.option_strings[0] for a in parser._actions if a.option_strings]
    assert sorted(blocks) == sorted(options)  # every option has its own help block
    for option, block in blocks.items():
        assert block.count("(default") <= 1, block
        for empty in ("(default: None)", "(default: True)", "(default: False)",
                      "(default: [])"):
            assert empty not in block, block
    if "--budget" in blocks:
        for budget in BUDGETS:
            assert f"{budget}:" in blocks["--budget"], blocks["--budget"]


def test_shared_options_read_the_same_everywhere():
    helps: dict[str, set[str]] = {}
    for module in COMMANDS:
        for action in _parser(module)._actions:
            for option in set(action.option_strings) & set(SHARED):
                helps.setdefault(option, set()).add(action.help)
    assert {"--set", "--data-root", "--quiet", "--budget"} <= set(helps)
    for option, texts in helps.items():
        assert len(texts) == 1, (option, texts)


def test_formatter_shows_a_meaningful_default_once():
    from cmg.errors import command_parser

    p = command_parser("prog", "`python -m prog`: does things.\n\nMore text.")
    p.add_argument("--n", type=int, default=3, help="count")
    p.add_argument("--out", default=None, help="folder (default: ./out)")
    p.add_argument("--no-x", dest="x", action="store_false", help="skip x")
    blocks = _option_blocks(p.format_help())
    assert p.description == "Does things."
    assert blocks["--n"].endswith("count (default: 3)")
    assert blocks["--out"].endswith("folder (default: ./out)")
    assert blocks["--no-x"].endswith("skip x")
