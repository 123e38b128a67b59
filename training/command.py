"""The exact command line of the running process, for manifests and provenance, and the
``python -m training.cli_TASK`` entry point each trainer front end shares (stdlib)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from training.assets import REPO_ROOT

#: The --time-schedule flag's help, shared by the trainers that have it.
TIME_SCHEDULE_HELP = ("with --max-minutes, run the learning-rate warm-up and cosine decay on "
                      "whichever is further along, steps or the clock, so a run the clock "
                      "stops still ends annealed (for a fixed time budget whose step rate is "
                      "unknown, as on a borrowed GPU)")


#: Where the parsed flags name the destinations of the flags given on the command line
#: (the rest took their defaults): what ``--resume`` carries over from the run it continues.
GIVEN_FLAGS = "given_flags"


def _recording(action_type: type[argparse.Action]) -> type[argparse.Action]:
    """``action_type`` that also adds its destination to ``namespace.given_flags`` when its
    flag is given (argparse calls an action only then; a default is set without it)."""

    class Recording(action_type):  # type: ignore[valid-type,misc]
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                     values: object, option_string: str | None = None) -> None:
            given = set(getattr(namespace, GIVEN_FLAGS, None) or ())
            given.add(self.dest)
            setattr(namespace, GIVEN_FLAGS, given)
            super().__call__(parser, namespace, values, option_string)

    Recording.__name__ = Recording.__qualname__ = f"Recording{action_type.__name__}"
    return Recording


def track_given_flags(parser: argparse.ArgumentParser) -> None:
    """Makes ``parser`` record which of its optional flags were given: the parsed namespace
    gets ``given_flags``, a set of destinations (empty when none was given), so that a
    ``--resume`` can tell a flag left out from one given with its default value."""
    parser.set_defaults(**{GIVEN_FLAGS: frozenset()})
    for action in parser._actions:  # argparse has no public list of a parser's actions
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            action.__class__ = _recording(type(action))


def command_line(argv: Iterable[str] | None = None) -> str:
    """``sys.argv`` shell-quoted, with ``percept`` for the console script and
    ``python -m package.module`` for modules run with ``-m`` (whose argv[0] is a path)."""
    parts = list(sys.argv if argv is None else argv)
    if parts and Path(parts[0]).name == "percept":
        parts[0] = "percept"
    elif parts and parts[0].endswith(".py"):
        try:
            module = Path(parts[0]).resolve().relative_to(REPO_ROOT).with_suffix("")
            parts[0:1] = ["python", "-m", ".".join(module.parts).removesuffix(".__main__")]
        except ValueError:
            parts.insert(0, "python")
    return " ".join(shlex.quote(p) for p in parts)


#: Adds one task's command to a group's subparsers (``percept train`` or ``percept eval``).
Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], object]


def run_task_cli(module: str, task: str, groups: Mapping[str, Register],
                 argv: Sequence[str] | None = None) -> int:
    """``python -m MODULE GROUP ARGS``, the same as ``percept GROUP TASK ARGS``: ``groups``
    maps each group ("train", "eval") to the function that registers TASK in it. The
    handler's provenance records the command as given (``args.command_line``), also when
    ``argv`` comes from a caller rather than ``sys.argv``."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    subparsers = parser.add_subparsers(dest="group", required=True)
    for group, register in groups.items():
        register(subparsers.add_parser(group).add_subparsers(dest="command", required=True))
    given = list(sys.argv[1:] if argv is None else argv)
    arguments = [given[0], task, *given[1:]] if given and given[0] in groups else given
    args = parser.parse_args(arguments)
    args.command_line = " ".join(["python", "-m", module, *(shlex.quote(a) for a in given)])
    return int(args.func(args))
