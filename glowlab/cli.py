"""The ``glowlab`` command: a dispatcher. Each job owns its options (``glowlab.jobs.*``).

``fit``, ``validate``, ``test`` and ``predict`` go to LightningCLI (:mod:`glowlab.training.cli`);
``density`` to the density lab's LightningCLI; every other command to a job module, imported only
when it runs, so ``glowlab prepare`` starts without loading torch or Lightning.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

# What `glowlab fit --help` (and validate, test, predict) says above the options, after the command's summary.
DESCRIPTION = (
    "The data is a folder written by `glowlab prepare`. Options come from config files (--config "
    "configs/digits.yaml) and --section.option flags, applied in order: model.flow.* define the model, model.* its "
    "optimisation, data.* the prepared shards, trainer.* Lightning's Trainer. --print_config shows the resulting "
    "config. `glowlab --help` lists every command."
)

# command -> (module, function taking the remaining arguments)
COMMANDS = {
    "prepare": ("glowlab.jobs.prepare", "main"),
    "sample": ("glowlab.jobs.pictures", "sample_main"),
    "interpolate": ("glowlab.jobs.pictures", "interpolate_main"),
    "manipulate": ("glowlab.jobs.pictures", "manipulate_main"),
    "evaluate": ("glowlab.jobs.evaluate", "main"),
    "score": ("glowlab.jobs.score", "main"),
    "export": ("glowlab.jobs.export", "main"),
    "verify": ("glowlab.jobs.verify", "main"),
    "lab": ("glowlab.jobs.density", "lab_main"),
    "fit-target": ("glowlab.jobs.target", "fit_target_main"),
    "distill": ("glowlab.jobs.target", "distill_main"),
    "report": ("glowlab.jobs.report", "main"),
}

# Commands that go to LightningCLI (glowlab.training.cli) rather than to a job module.
LIGHTNING = ("fit", "validate", "test", "predict")

# `glowlab --help`: every command, group by group, with what it does in one line. A new command goes
# into COMMANDS (how it runs) and here (how it is listed); tests/test_help.py checks that they agree.
HELP: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "data",
        (
            ("prepare", "write an image data set (digits, CIFAR, a folder, npz) as WebDataset shards"),
            ("verify", "check every shard of a prepared data set against its manifest"),
        ),
    ),
    (
        "train (LightningCLI: --config FILE and --section.option flags)",
        (
            ("fit", "train a multiscale image flow (Glow, RealNVP, NICE) on prepared shards"),
            ("validate", "bits/dim of a model on the validation split"),
            ("test", "bits/dim of a model on the test split, written to test_results.json"),
            ("predict", "Lightning's predict loop (the image models define no predict step: see sample, score)"),
        ),
    ),
    (
        "look at a model",
        (
            ("sample", "PNG grid of samples over temperatures or classes"),
            ("interpolate", "latent interpolation between real images, as a PNG strip"),
            ("manipulate", "move real images along an attribute direction in latent space"),
            ("score", "per-sample log-likelihood and bits/dim (anomaly scoring), as CSV"),
            ("evaluate", "bpd | fid | fid-merge | train-classifier, results as JSON"),
            ("report", "a run's curves, samples over training, reconstruction, neighbour and likelihood checks"),
            ("export", "a checkpoint as a folder that loads without Lightning (safetensors, config, card)"),
        ),
    ),
    (
        "density lab (flows over vectors; docs/density-lab.md)",
        (
            ("density", "fit, validate, test a vector flow (LightningCLI: `glowlab density fit --help`)"),
            ("lab", "train families x data sets; held-out NLL table and density plots"),
            ("fit-target", "fit a flow to an unnormalised 2-D density by reverse KL"),
            ("distill", "train an IAF student from a MAF teacher's density"),
        ),
    ),
)


def help_text() -> str:
    """What `glowlab --help` prints: the commands by group, one line each, and where to read more."""
    width = max(len(name) for _, rows in HELP for name, _ in rows) + 2
    lines = [
        "usage: glowlab COMMAND [options]",
        "",
        "glowlab: normalizing flows (Glow, RealNVP, NICE, vector flows), from one laptop to a SLURM cluster.",
    ]
    for group, rows in HELP:
        lines += ["", f"{group}:", *(f"  {name:<{width}}{summary}" for name, summary in rows)]
    lines += [
        "",
        "`glowlab COMMAND --help` (or `glowlab help COMMAND`) shows a command's options with their defaults;",
        "`glowlab density fit --help` the density lab's training options. A first run: README.md.",
    ]
    return "\n".join(lines)


def _summary(command: str) -> str:
    return next(summary for _, rows in HELP for name, summary in rows if name == command)


def _unknown(command: str) -> str:
    """The error for a command glowlab does not have, suggesting the nearest one."""
    import difflib

    known = [name for _, rows in HELP for name, _ in rows]
    close = difflib.get_close_matches(command, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"glowlab: error: unknown command {command!r}{hint}; `glowlab --help` lists the commands"


def density_cli(argv: list[str]) -> None:
    """``glowlab density {fit,validate,test}``: LightningCLI for the vector flows of the density lab."""
    from glowlab.training.cli import DensityCLI, density_trainer_defaults
    from glowlab.training.density import DensityModule, VectorDataModule

    DensityCLI(
        DensityModule,
        VectorDataModule,
        args=argv,
        parser_kwargs={
            "prog": "glowlab density",
            "description": "glowlab density: maximum-likelihood training of vector flows.",
            "exit_on_error": False,  # a bad option: one line from _run, not the parser's page of usage
        },
        trainer_defaults=density_trainer_defaults(),
        save_config_kwargs={"overwrite": True},
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``glowlab`` console script."""
    try:
        _run(argv)
    finally:
        _close_distributed()


def _close_distributed() -> None:
    """Destroy the process group a distributed job left behind.

    A gloo group still alive when the interpreter exits can abort the process (``terminate called
    without an active exception``) after its results were written, and SLURM marks the job FAILED.
    """
    if "torch" not in sys.modules:
        return  # nothing distributed can have started
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(argv: list[str] | None) -> None:
    explicit = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv == ["help"]:
        print(help_text())  # no torch or Lightning imported: instant
        return
    if argv[0] == "help":  # `glowlab help sample` is `glowlab sample --help`
        argv = [*argv[1:], "--help"]
    command = argv[0]
    from glowlab.console import quiet_console

    quiet_console()  # every command: Lightning's tips and library deprecations stay out of the output
    if not command.startswith("-") and command not in (*COMMANDS, *LIGHTNING, "density"):
        print(_unknown(command), file=sys.stderr)
        raise SystemExit(2)
    try:
        if command in COMMANDS:
            module, function = COMMANDS[command]
            getattr(importlib.import_module(module), function)(argv[1:])
        elif command == "density":
            command = " ".join(argv[:2])
            density_cli(argv[1:])
        else:
            from glowlab.training.cli import GlowCLI
            from glowlab.training.datamodule import ShardDataModule
            from glowlab.training.module import GlowModule

            GlowCLI(
                GlowModule,
                ShardDataModule,
                args=None if explicit is None else argv,  # None: LightningCLI reads sys.argv itself
                parser_kwargs=_lightning_parser_kwargs(),
                # A requeued SLURM job logs to the same folder again: its resolved config is the same.
                save_config_kwargs={"overwrite": True},
            )
    except argparse.ArgumentError as exn:
        # LightningCLI's parsers raise instead of printing their page of usage (exit_on_error=False).
        print(f"glowlab {command}: error: {_parser_message(exn)}", file=sys.stderr)
        raise SystemExit(2) from exn
    except Exception as exn:
        # Problems with files, options, data or a diverging run, and Lightning's refusals of a trainer
        # configuration: one clear line, no traceback (GLOWLAB_TRACEBACK=1 shows it). Anything else
        # is a bug, whose traceback is the useful report.
        expected = isinstance(exn, OSError | ValueError | KeyError | RuntimeError)
        if os.environ.get("GLOWLAB_TRACEBACK") or not (expected or type(exn).__name__ == "MisconfigurationException"):
            raise
        print(f"glowlab {command}: error: {_message(exn)}", file=sys.stderr)
        raise SystemExit(2) from exn


def _lightning_parser_kwargs() -> dict:
    """LightningCLI's parser options: descriptions for `glowlab fit --help` and co., errors raised, not printed."""
    kwargs: dict = {
        "description": f"glowlab: multiscale image flows with Lightning. {DESCRIPTION}",
        "exit_on_error": False,
    }
    for name in LIGHTNING:
        kwargs[name] = {"description": f"glowlab {name}: {_summary(name)}. {DESCRIPTION}", "exit_on_error": False}
    return kwargs


def _parser_message(exn: argparse.ArgumentError) -> str:
    """A parser error on one line; a value outside an option's choices says which they are."""
    text = " ".join(str(exn).split())
    # jsonargparse: 'Parser key "model.flow.coupling": Expected a typing.Literal['affine', ...]. Got value: bogus'
    found = re.search(r'key "([^"]+)": .*?Expected a (?:typing\.)?Literal\[(.*?)\]\. Got value: (\S+)', text)
    if found:
        key, choices, value = found.groups()
        names = choices.replace("'", "")
        return f"--{key} {value}: choose one of {names}"
    return re.sub(r'^Parser key "([^"]+)":', r"--\1:", text)


def _message(exn: BaseException) -> str:
    """The message of ``exn``, or of the exception behind it when the parser wrapped it."""
    cause = exn.__cause__ or exn.__context__
    text = str(exn)
    # jsonargparse wraps a failing constructor in a long parser error; the cause is the point.
    if cause is not None and ("Problem with given class_path" in text or "init_args" in text):
        return _message(cause)
    return text.strip() or type(exn).__name__


if __name__ == "__main__":
    main()
