"""``--config run.toml``: a command's flags kept in a TOML file, and the effective configuration.

Every flag of a subcommand can live in the file, keyed by its name without the leading dashes
(``batch-size = 16``, ``sequence-parallel = true``); flags on the command line override the
file. A key that is no flag of the subcommand is an error naming the nearest valid one. The
values are checked like the command line's: an ``int`` flag takes a TOML integer, a ``float``
flag an integer or a float, a switch ``true``/``false``, a flag with choices one of them.

:func:`write_effective` writes the configuration a run actually used (file, command line and
defaults merged) as TOML that ``--config`` reads back.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import tomllib
from collections.abc import Sequence
from typing import Any

from meshpar.errors import UsageError

#: Namespace entries that are no flag of their own (the subcommand, the config file itself).
_NOT_FLAGS = ("command", "config")


def _flags(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """``{"batch-size": action, ...}``: a subcommand's long options without their dashes."""
    out = {}
    for action in sub._actions:  # argparse has no public list of a parser's actions
        for option in action.option_strings:
            if option.startswith("--") and action.dest not in _NOT_FLAGS + ("help",):
                out[option[2:]] = action
    return out


def _value(key: str, value: Any, action: argparse.Action, path: str) -> Any:
    where = f"--config {path}: {key} = {value!r}"
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise UsageError(f"{where}: must be true or false")
        return value
    if isinstance(value, (dict, list)):
        raise UsageError(f"{where}: must be a single value, not a {type(value).__name__}")
    kind = action.type
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UsageError(f"{where}: must be an integer")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: must be a number")
        value = float(value)
    if kind is None and not isinstance(value, str):
        raise UsageError(f"{where}: must be a string (in quotes)")
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where}: must be one of {', '.join(map(str, action.choices))}")
    return value


def read_config(path: str, sub: argparse.ArgumentParser, command: str) -> dict[str, Any]:
    """The file's settings as ``{dest: value}`` for ``sub`` (the subcommand's parser).

    Raises:
        UsageError: the file is missing or not TOML, a key is not a flag of ``command`` (the
            nearest flag is named), or a value has the wrong type or is not a valid choice.

    Example:
        >>> import argparse, os, tempfile
        >>> train = argparse.ArgumentParser(prog="meshpar train")   # a subcommand's parser
        >>> _ = train.add_argument("--batch-size", type=int)
        >>> _ = train.add_argument("--steps", type=int)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = os.path.join(tmp.name, "run.toml")
        >>> with open(path, "w") as f:
        ...     _ = f.write("batch-size = 16\\nsteps = 100\\n")
        >>> read_config(path, train, "train")
        {'batch_size': 16, 'steps': 100}
        >>> tmp.cleanup()
    """
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"--config {path}: not valid TOML ({err})") from None
    flags = _flags(sub)
    out = {}
    for key, value in table.items():
        action = flags.get(key)
        if action is None:
            near = difflib.get_close_matches(key.replace("_", "-"), list(flags), n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise UsageError(
                f"--config {path}: unknown key {key!r} for meshpar {command}{hint} (keys are the "
                "flags' names without the leading dashes)"
            )
        out[action.dest] = _value(key, value, action, path)
    return out


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with the subcommand's ``--config`` file as its defaults.

    The command line is parsed twice: once to find the subcommand and its ``--config``, then with
    the file's values installed as the subcommand's defaults, so that flags given on the command
    line win.

    Raises:
        UsageError: see :func:`read_config`.

    Example:
        >>> import os, tempfile
        >>> from meshpar.cli.args import build_parser
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = os.path.join(tmp.name, "run.toml")
        >>> with open(path, "w") as f:
        ...     _ = f.write("batch-size = 16\\nsteps = 100\\n")
        >>> args = parse_args(build_parser(), ["train", "--config", path, "--steps", "5"])
        >>> args.batch_size, args.steps                 # the command line wins
        (16, 5)
        >>> tmp.cleanup()
    """
    first = parser.parse_args(argv)
    path = getattr(first, "config", None)
    if not path:
        return first
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = subs.choices[first.command]
    settings = read_config(path, sub, first.command)
    sub.set_defaults(**settings)
    try:
        return parser.parse_args(argv)
    finally:
        # The parser may be used again in this process (tests): leave its defaults as they were.
        sub.set_defaults(**{dest: _default(sub, dest) for dest in settings})


def _default(sub: argparse.ArgumentParser, dest: str) -> Any:
    for action in sub._actions:
        if action.dest == dest:
            return action.default
    return None


def effective_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``{flag name: value}`` of a parsed command, every flag (``None`` values left out).

    Example:
        >>> from meshpar.cli.args import build_parser
        >>> parser = build_parser()
        >>> args = parser.parse_args(["train", "--batch-size", "16"])
        >>> config = effective_config(args, parser)
        >>> config["batch-size"], config["mesh"]        # given, and a default
        (16, 'data=2,fsdp=2,tensor=2')
    """
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = _flags(subs.choices[args.command])
    return {name: getattr(args, action.dest) for name, action in sorted(flags.items())
            if getattr(args, action.dest, None) is not None}


def write_effective(path: str | os.PathLike, config: dict[str, Any], *, command: str) -> None:
    """Write ``config`` (:func:`effective_config`) as TOML that ``--config`` reads back.

    Example:
        >>> import os, tempfile
        >>> from meshpar.cli.args import build_parser
        >>> parser = build_parser()
        >>> args = parser.parse_args(["train", "--batch-size", "16"])
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = os.path.join(tmp.name, "config.toml")
        >>> write_effective(path, effective_config(args, parser), command="train")
        >>> again = parse_args(build_parser(), ["train", "--config", path])
        >>> effective_config(again, parser) == effective_config(args, parser)   # reads back
        True
        >>> tmp.cleanup()
    """
    lines = [f"# The effective configuration of `meshpar {command}` (defaults, --config file and "
             "command line merged);", f"# rerun it with: meshpar {command} --config {os.path.basename(path)}"]
    for key, value in config.items():
        # JSON's strings, numbers and booleans are valid TOML basic values.
        lines.append(f"{key} = {json.dumps(value)}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
