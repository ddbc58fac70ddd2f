"""User-facing errors and atomic file writes.

A `UsageError` is bad input that the user can fix (unknown setting, missing data, corrupt
checkpoint). Command lines catch it with `exit_on_usage_error` and print one line, exit code 2,
no traceback. Everything that writes a result file goes through `atomic_write`, so a crash or a
bad input never leaves a half-written file behind.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, NoReturn, TypeVar

T = TypeVar("T")


class UsageError(Exception):
    """Bad input with a fix the user can apply; the message names the fix."""


def fail(message: str) -> NoReturn:
    raise UsageError(message)


def exit_on_usage_error(main: Callable[..., T]) -> Callable[..., T]:
    """Decorate a command-line `main`: a UsageError becomes one stderr line and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse's default prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default once, and only when it says something: not for None, flags,
    empty lists, or a help text that already describes its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("(default" in text or default in (None, argparse.SUPPRESS) or isinstance(default, bool)
                or default == []):
            return text
        return super()._get_help_string(action)


def help_formatter(prog: str) -> argparse.HelpFormatter:
    return DefaultsFormatter(prog, max_help_position=32)


def describe(doc: str) -> str:
    """A command's --help description from its module docstring: the first paragraph, without a
    leading "`python -m NAME`: ", starting with a capital letter."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    if paragraph.startswith("`"):
        paragraph = paragraph.split("`: ", 1)[-1]
    return paragraph[:1].upper() + paragraph[1:]


def command_parser(prog: str, doc: str) -> OneLineParser:
    """The parser of a command line: one-line errors, its docstring as description, defaults once."""
    return OneLineParser(prog=prog, description=describe(doc), formatter_class=help_formatter)


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    """--quiet, the same in every command (here, not in cmg.cli, for `analysis`: no torch)."""
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress lines, only the result (--no-quiet turns them back on, e.g. "
                        "on a --resume of a quiet sweep)")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and prove it is writable, before any long work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe."):
            pass
    except OSError as err:
        fail(f"cannot write to output folder {path} ({err.strerror}); choose another with --out")
    return path
