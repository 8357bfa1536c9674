"""The ``glowlab`` command: a dispatcher. Each job owns its options (``glowlab.jobs.*``).

``fit``, ``validate``, ``test`` and ``predict`` go to LightningCLI (:mod:`glowlab.training.cli`);
``density`` to the density lab's LightningCLI; every other command to a job module, imported only
when it runs, so ``glowlab prepare`` starts without loading torch or Lightning.
"""

from __future__ import annotations

import importlib
import os
import sys

DESCRIPTION = """glowlab: train and evaluate multiscale Glow models.

subcommands: fit, validate, test, predict (LightningCLI; see `glowlab fit --help`), and
  prepare       write a data set as WebDataset shards (`glowlab prepare --help`)
  verify        check every shard of a prepared data set against its manifest
  sample        PNG grids over temperatures or classes
  evaluate      bpd | fid | fid-merge | train-classifier, results as JSON
  interpolate   latent interpolation between real images
  manipulate    attribute directions in latent space
  score         per-sample log-likelihood and bits/dim (anomaly scoring), as CSV
  export        a trained model as a folder that loads without Lightning (safetensors, config, card)
density lab (flows over vectors; see docs/density-lab.md):
  density       fit, validate, test a vector flow (LightningCLI; `glowlab density fit --help`)
  lab           train families x data sets, write the held-out NLL table and plots
  fit-target    fit a flow to an unnormalised 2-D density by reverse KL
  distill       train an IAF student from a MAF teacher's density"""

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
}


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
    command = argv[0] if argv else "fit"
    try:
        if argv[:1] and argv[0] in COMMANDS:
            module, function = COMMANDS[argv[0]]
            getattr(importlib.import_module(module), function)(argv[1:])
        elif argv[:1] == ["density"]:
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
                parser_kwargs={"description": DESCRIPTION},
                # A requeued SLURM job logs to the same folder again: its resolved config is the same.
                save_config_kwargs={"overwrite": True},
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exn:
        # Problems with files, options, data or a diverging run: one clear line, no traceback
        # (GLOWLAB_TRACEBACK=1 shows it).
        if os.environ.get("GLOWLAB_TRACEBACK"):
            raise
        print(f"glowlab {command}: error: {_message(exn)}", file=sys.stderr)
        raise SystemExit(2) from exn


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
