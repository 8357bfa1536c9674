"""The jobs' command lines: one parser style, whose ``--help`` shows every option's default."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from glowlab.threads import AUTO, apply_threads


class JobHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that ends each option's line with its default (flags and options without one excepted)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.default is None
            or action.default is False
            or action.default is argparse.SUPPRESS
            or not action.option_strings
            or "%(default)" in text
        ):
            return text
        return f"{text} (default: %(default)s)"


class _SubParser(argparse.ArgumentParser):
    """A job's parser style; a sub-command's own parser (``evaluate bpd``) is of this kind.

    Every one takes ``--threads`` and ``--weights`` (before or after a sub-command's name); their defaults are set once,
    on the job's top parser, so a sub-command's parser never overwrites a value given before it.
    """

    def __init__(self, *args: Any, small_model: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", JobHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--threads",
            default=argparse.SUPPRESS,
            help="CPU threads of torch: an integer, or auto (the default: OMP_NUM_THREADS if set, else "
            + ("1 for these small models)" if small_model else "the cores this process may use)"),
        )
        self.add_argument(
            "--weights",
            choices=("auto", "ema", "trained"),
            default=argparse.SUPPRESS,
            help="which weights of a checkpoint to use: its weight average when it kept one (auto, the default; "
            "what the run evaluated and sampled with), the average (ema) or the optimizer's weights (trained)",
        )

    def _add_action(self, action: argparse.Action) -> argparse.Action:
        # argparse prints nothing for an option without help text: give it a line for its default.
        if action.help is None and action.option_strings and action.default is not None and action.default is not False:
            action.help = "default: %(default)s"
        return super()._add_action(action)


class JobParser(_SubParser):
    """An argument parser for a job, whose ``--threads`` is applied as soon as the arguments are parsed."""

    def __init__(self, *args: Any, small_model: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, small_model=small_model, **kwargs)
        self.small_model = small_model
        self.set_defaults(threads=AUTO, weights="auto")

    def add_subparsers(self, **kwargs: Any) -> argparse._SubParsersAction:
        kwargs.setdefault("parser_class", _SubParser)
        return super().add_subparsers(**kwargs)

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        try:
            apply_threads(parsed.threads, small_model=self.small_model)
        except ValueError as exn:
            self.error(f"--{exn}")
        from glowlab.models.io import set_default_weights  # torch only once a job runs, not for --help

        set_default_weights(parsed.weights)
        return parsed, rest


def job_parser(prog: str, description: str | None, small_model: bool = False) -> argparse.ArgumentParser:
    """The argument parser of ``glowlab PROG``: defaults in ``--help``, ``--threads``, the docstring as description."""
    return JobParser(prog=prog, description=description, small_model=small_model)
