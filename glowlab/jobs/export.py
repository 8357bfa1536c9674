"""``glowlab export CKPT OUT``: a trained model as a framework-free folder (safetensors, JSON, model card)."""

from __future__ import annotations

from pathlib import Path

from glowlab.jobs.args import job_parser


def main(argv: list[str]) -> Path:
    """``glowlab export CKPT OUT``: write the model of a checkpoint as a folder that loads without Lightning.

    The folder holds ``model.safetensors``, ``config.json`` (the model's config, its data contract,
    the run's test metrics) and a ``README.md`` model card; ``glowlab.load(OUT)`` and every job's
    ``--ckpt`` take it. Test metrics come from the run's ``test_results.json`` when it was written
    for this checkpoint.
    """
    parser = job_parser("glowlab export", main.__doc__)
    parser.add_argument("ckpt", type=Path, help="checkpoint of glowlab fit or glowlab density fit")
    parser.add_argument("out", type=Path, help="the folder to write")
    args = parser.parse_args(argv)
    from glowlab.models.io import export

    out = export(args.ckpt, args.out)
    print(f"exported {args.ckpt} -> {out}")
    return out
