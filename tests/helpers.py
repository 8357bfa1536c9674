"""Shared test utilities: brute-force Jacobians, parameter perturbation, small modules and trainers."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn


def flat(out: Tensor | list[Tensor]) -> Tensor:
    """A layer's output (a tensor or a list of per-level latents) as (B, D)."""
    if isinstance(out, Tensor):
        return out.reshape(out.shape[0], -1)
    return torch.cat([z.reshape(z.shape[0], -1) for z in out], dim=1)


def per_example_slogdet(fn: Callable[[Tensor], Tensor | list[Tensor]], x: Tensor) -> Tensor:
    """log|det| of the Jacobian of ``fn`` at each example of ``x``, by autograd, shape (B,).

    ``fn`` acts on a batch; examples are independent, so the full Jacobian is block diagonal and
    each example's block is read off it.
    """
    b = x.shape[0]
    jac = torch.autograd.functional.jacobian(lambda inp: flat(fn(inp)), x)  # (B, D_out, *x.shape)
    jac = jac.reshape(b, -1, b, x[0].numel())  # (B, D_out, B, D_in)
    blocks = torch.stack([jac[i, :, i, :] for i in range(b)])  # (B, D_out, D_in)
    sign, logabsdet = torch.linalg.slogdet(blocks)
    assert torch.all(sign != 0), "Jacobian is singular"
    return logabsdet


@torch.no_grad()
def perturb(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Add noise to every parameter so zero-initialised layers stop being the identity."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[Path]:
    """Run a block in ``path`` (configs write to ./runs), then return to where we were."""
    before = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(before)


def glow_module(**options):
    """A GlowModule from flat keyword options: the model's go into its ``flow`` config, the rest to the module."""
    from glowlab.models import MultiscaleConfig
    from glowlab.training import GlowModule

    fields = MultiscaleConfig.__dataclass_fields__
    flow = MultiscaleConfig(**{k: v for k, v in options.items() if k in fields})
    return GlowModule(flow, **{k: v for k, v in options.items() if k not in fields})


class SignalAfterStep(L.Callback):
    """Sends this process ``signum`` (default SIGTERM, as a cluster stopping a job does) after training step ``at``."""

    def __init__(self, at: int, signum: int = signal.SIGTERM) -> None:
        self.at, self.signum = at, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), self.signum)


def quiet_trainer(**options) -> L.Trainer:
    """A CPU ``L.Trainer`` for tests: no logger, checkpoints, progress bar or model summary unless ``options`` say."""
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**{**defaults, **options})
