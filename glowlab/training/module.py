"""The LightningModule that trains a Glow by maximum likelihood."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric

from glowlab.console import glowlab_logger
from glowlab.flows.base import check_option
from glowlab.likelihood import bits_per_dim, variational_bits_per_dim
from glowlab.models import MultiscaleConfig, image_flow
from glowlab.optim import Adamax
from glowlab.training.capture import CapturedStep, average_gradients, first_line

OPTIMIZERS = {"adam": torch.optim.Adam, "adamax": Adamax}
# Their names as a type, so that `glowlab fit --help` lists them and the parser refuses others
# (tests/test_help.py checks it names exactly the entries of OPTIMIZERS).
OptimizerName = Literal["adam", "adamax"]
# A tensor summed over the DDP processes (every process gets the sum).
SumOverProcesses = Callable[[Tensor], Tensor]


def optimizer_with_warmup(module: nn.Module, hp: Any, loss_scaling: bool = False) -> dict[str, Any]:
    """``hp.optimizer`` over the module's parameters, the learning rate rising linearly over ``hp.warmup_steps``.

    The update runs as few operators as the optimizer allows: Adam's fused kernel (one operator for
    all parameters), Adamax multi-tensor (:class:`glowlab.optim.Adamax`), rather than a loop over the
    hundreds of parameter tensors of a Glow. The results are the same update, and both skip a
    non-finite step on the device (:class:`NonFiniteGuard`). With ``loss_scaling`` (16-bit mixed
    precision's gradient scaler) Adam runs multi-tensor: a fused Adam would unscale the gradients
    itself, after gradient clipping had seen them scaled.
    """
    params = [p for p in module.parameters() if p.requires_grad]  # not a weight average's copy
    fused = hp.optimizer == "adam" and not loss_scaling and _fused_adam_supported(params)
    options = {} if hp.optimizer == "adamax" else {"fused": True} if fused else {"foreach": True}
    optimizer = OPTIMIZERS[hp.optimizer](params, lr=hp.lr, weight_decay=hp.weight_decay, **options)
    warmup = max(1, hp.warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def check_training_options(lr: float, weight_decay: float, warmup_steps: int) -> None:
    """Errors naming ``model.lr``, ``model.weight_decay`` or ``model.warmup_steps`` when out of range."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"model.lr={lr} must be a positive number")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"model.weight_decay={weight_decay} must be >= 0")
    if warmup_steps < 0:
        raise ValueError(f"model.warmup_steps={warmup_steps} must be >= 0")


def refuse_nonfinite(state_dict: dict[str, Tensor]) -> None:
    """Raise naming the first tensor of ``state_dict`` with a NaN or infinite value: never save one."""
    for name, value in state_dict.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NonFiniteTraining(f"refusing to write a checkpoint: parameter {name} has non-finite values")


def _fused_adam_supported(params: list[nn.Parameter]) -> bool:
    # Fused Adam runs on CPU and CUDA tensors of floating dtypes (PyTorch 2.4 and later).
    return all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)


def logs_this_step(module: L.LightningModule) -> bool:
    """Whether Lightning writes this training step's per-step metrics to the loggers.

    It writes them every ``log_every_n_steps`` (Lightning's own learning-rate monitor asks the same
    question). A per-step-only value logged on another step is never written, yet each
    ``self.log`` costs Lightning's result bookkeeping host time (about 0.7 ms on a 2-core CPU),
    which a GPU step bound by its host cannot hide. Outside a trainer: always.
    """
    trainer = module._trainer
    if trainer is None:
        return True
    return bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs


def configure_clipping(
    module: L.LightningModule,
    gradient_clip_val: float | None,
    algorithm: str | None,
    params: list[nn.Parameter] | None = None,
) -> Tensor | None:
    """Log the gradient norm (before clipping) and clip, with one multi-tensor pass over the gradients.

    Lightning's default clipping computes one norm per parameter tensor on the CPU; this computes
    the total norm once, logs it as ``grad_norm`` and, with ``gradient_clip_val``, clips by it (or by
    value). No value is read back on the host, so it costs a GPU step no synchronisation. Returns
    the norm (None without gradients). ``params`` (default: the module's) are those to clip.
    """
    params = [p for p in (module.parameters() if params is None else params) if p.grad is not None]
    if not params:
        return None
    grads = [p.grad for p in params]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if logs_this_step(module):
        module.log("grad_norm", norm, on_step=True, on_epoch=False)
    if gradient_clip_val:
        if algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
        else:
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm, foreach=True)
    return norm


class NonFiniteTraining(RuntimeError):
    """A run whose loss or gradients stayed non-finite for ``max_nonfinite_steps`` steps in a row."""


class NonFiniteGuard:
    """Skips every optimizer step whose loss or gradient norm is not finite; stops a run that keeps at it.

    A skipped step changes no parameter and no optimizer state. glowlab's optimizers (fused Adam,
    :class:`glowlab.optim.Adamax`) skip it on the device through their ``found_inf`` input, with no
    host synchronisation; for any other optimizer the gradients are dropped, which makes ``step()``
    pass over every parameter, after reading one value on the host. Skipped steps are counted and
    logged as ``nonfinite_steps``; after ``limit`` in a row the run stops with
    :class:`NonFiniteTraining`. When the skip is decided on the device that count is read when
    metrics are logged, so a run stops within ``log_every_n_steps`` steps of reaching the limit,
    its parameters untouched by the skipped steps either way.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"model.max_nonfinite_steps must be >= 1, got {limit}")
        self.limit = limit
        self.total: Tensor | None = None  # skipped steps (device counters, no host read per step)
        self.run: Tensor | None = None  # skipped steps in a row

    def __call__(self, module: L.LightningModule, optimizer: torch.optim.Optimizer, loss: Tensor, norm: Tensor) -> None:
        bad = ~(torch.isfinite(norm) & torch.isfinite(loss))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # The norm is of the gradients averaged over the processes, the loss is this process's
            # own: a loss that is not finite on one process only (a class term at a -inf logit has
            # finite gradients) would skip the step there alone and the replicas would drift apart
            # unseen. Every process takes the decision of all (a one-value all-reduce, no host read).
            flag = bad.to(torch.float32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = flag > 0
        if self.total is None:
            self.total = torch.zeros((), dtype=torch.int64, device=norm.device)
            self.run = torch.zeros((), dtype=torch.int64, device=norm.device)
        self.total = self.total + bad
        self.run = (self.run + 1) * bad
        if logs_this_step(module):
            module.log("nonfinite_steps", self.total.float(), on_step=True, on_epoch=False)
        if skips_on_device(optimizer):
            optimizer.found_inf = bad.to(torch.float32)  # the update skips the step on the device
            every = module.trainer.log_every_n_steps if module._trainer is not None else 1
            if module.global_step % max(1, every):
                return
        elif bool(bad):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # step() passes over parameters without a gradient: nothing changes
        if int(self.run) >= self.limit:
            lr = optimizer.param_groups[0]["lr"]
            raise NonFiniteTraining(
                f"training stopped at step {module.global_step}: {int(self.run)} optimizer steps in a row had a "
                f"non-finite loss or gradient and were skipped (model.max_nonfinite_steps={self.limit}). The "
                f"parameters are those before the first of them; no checkpoint holds a non-finite value. Is the "
                f"learning rate too high (model.lr={lr:g} now), or the data broken (glowlab verify DATA)?"
            )


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours a ``found_inf`` device tensor: fused Adam and glowlab's Adamax."""
    fused_adam = isinstance(optimizer, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))
    return fused_adam or isinstance(optimizer, Adamax)


class EpochMeans:
    """Training values averaged over an epoch on the device: each batch's mean weighted by its size.

    What Lightning's ``self.log(..., on_epoch=True)`` computes, without its per-call host
    bookkeeping at every step. The sums are device tensors, added to without a host read. They
    start again with the first batch of another epoch, not when an epoch ends: a checkpoint written
    at an epoch's end (or at a stop within it) holds them (:meth:`state_dict`), so the mean of an
    epoch a run was resumed in covers the batches before the stop too. Under DDP each process sums
    its own batches; ``reduce`` (a sum over the processes) makes the mean and the checkpoint's sums
    those of every process's batches.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | float] = {}  # a float: restored from a checkpoint, not yet on a device
        self.count = 0
        self.epoch = -1

    def add(self, means: dict[str, Tensor], batch_size: int, epoch: int) -> None:
        """Add one batch's ``means`` (scalars) of ``batch_size`` examples, a batch of ``epoch``."""
        if epoch != self.epoch:
            self.sums, self.count, self.epoch = {}, 0, epoch
        for name, mean in means.items():
            total = self.sums.get(name, 0.0)
            if isinstance(total, Tensor):
                total.add_(mean.detach(), alpha=batch_size)
            else:
                self.sums[name] = mean.detach() * batch_size + total
        self.count += batch_size

    def _totals(self, reduce: SumOverProcesses | None) -> tuple[dict[str, Tensor | float], float]:
        if reduce is None:
            return self.sums, self.count
        # One collective for every value: the sums and the count stacked, in float64 so that a count
        # and a sum over many batches stay exact. Every process holds the same names in the same
        # order (a process restored without sums holds zeros under the same names).
        names = sorted(self.sums)
        device = next((s.device for s in self.sums.values() if isinstance(s, Tensor)), None)
        stacked = torch.tensor([0.0] * len(names) + [float(self.count)], dtype=torch.float64, device=device)
        for i, name in enumerate(names):
            stacked[i] = self.sums[name]
        stacked = reduce(stacked)
        return dict(zip(names, stacked[:-1], strict=True)), float(stacked[-1])

    def means(self, reduce: SumOverProcesses | None = None) -> dict[str, Tensor | float]:
        """The epoch's means so far (none before the first batch); over every process's batches with ``reduce``."""
        sums, count = self._totals(reduce)
        return {name: total / count for name, total in sums.items()} if count else {}

    def state_dict(self, reduce: SumOverProcesses | None = None) -> dict[str, Any]:
        """The sums and count so far, of every process's batches with ``reduce``."""
        sums, count = self._totals(reduce)
        return {"sums": {name: float(total) for name, total in sums.items()}, "count": int(count), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any], keep: bool = True) -> None:
        """Restore :meth:`state_dict`'s sums; with ``keep=False`` (every process but one under DDP)
        the same names at zero, so the saved batches are counted once whatever the number of processes."""
        sums, count = dict(state["sums"]), int(state["count"])
        self.sums = sums if keep else dict.fromkeys(sums, 0.0)
        self.count, self.epoch = count if keep else 0, int(state["epoch"])


class GuardedTraining:
    """The Lightning hooks every glowlab module shares: clipping that feeds the non-finite guard,
    checkpoints that refuse non-finite values, and training values logged at little host cost.

    The module sets ``self.nonfinite`` (a :class:`NonFiniteGuard`) and ``self.epoch_means`` (an
    :class:`EpochMeans`) when built, and ``self._step_loss`` (the current step's loss) in its
    training step.
    """

    nonfinite: NonFiniteGuard
    epoch_means: EpochMeans
    _step_loss: Tensor | None

    def log_training_values(self, means: dict[str, Tensor], batch_size: int, prog_bar: str) -> None:
        """Log a training batch's ``means`` as ``NAME_step`` and, at the epoch's end, ``NAME_epoch``.

        Each ``self.log`` costs Lightning's result bookkeeping host time (about 0.7 ms on a 2-core
        CPU), which a GPU step bound by its host cannot hide: the per-step
        values are logged only on the steps the loggers write (:func:`logs_this_step`), and the
        epoch means are summed on the device (:class:`EpochMeans`). ``prog_bar`` names the value the
        progress bar shows.
        """
        self.epoch_means.add(means, batch_size, self.current_epoch)
        if logs_this_step(self):
            for name, mean in means.items():
                self.log(f"{name}_step", mean, on_step=True, on_epoch=False, prog_bar=name == prog_bar)

    def _sum_over_processes(self) -> SumOverProcesses | None:
        """A sum over the DDP processes, or None in a single process."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        strategy, device = self.trainer.strategy, self.device
        return lambda totals: strategy.reduce(totals.to(device), reduce_op="sum")  # NCCL reduces device tensors

    def on_train_epoch_end(self) -> None:
        reduce = self._sum_over_processes()
        # Under DDP every process logs the same mean of all processes' batches; Lightning's
        # cross-process reduction of equal values by max returns the value itself.
        sync = {} if reduce is None else {"sync_dist": True, "reduce_fx": "max"}
        for name, mean in self.epoch_means.means(reduce).items():
            self.log(f"{name}_epoch", mean, on_step=False, on_epoch=True, **sync)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        norm = configure_clipping(self, gradient_clip_val, gradient_clip_algorithm, self._trained_parameters())
        if norm is not None and self._step_loss is not None:
            self.nonfinite(self, optimizer, self._step_loss, norm)

    def _trained_parameters(self) -> list[nn.Parameter]:
        params = getattr(self, "_gradient_params", None)
        if params is None:
            # Walking the module tree for its parameters was most of a small model's clipping host time.
            params = self._gradient_params = list(self.parameters())
        return params

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        refuse_nonfinite(checkpoint["state_dict"])
        # Every DDP process writes a checkpoint's dictionary (rank 0 saves it), so the sum is collective.
        checkpoint["train_epoch_means"] = self.epoch_means.state_dict(self._sum_over_processes())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "train_epoch_means" in checkpoint:
            self.epoch_means.load_state_dict(checkpoint["train_epoch_means"], keep=self.global_rank == 0)


class WeightAverage(nn.Module):
    """An exponential moving average of a model's weights, kept as a second model for evaluation and sampling.

    After each optimizer step ``ema = decay_t · ema + (1 - decay_t) · weights`` (one multi-tensor
    ``lerp`` over the parameters, no host synchronisation), with ``decay_t = min(decay, (1 + n) /
    (10 + n))`` after ``n`` updates, so the average is not dominated by the first weights. The
    first update copies the model whole (parameters and buffers), so the average starts from
    weights whose ActNorm layers are initialised. Buffers (fixed permutations, ActNorm flags) are
    the trained model's. As a submodule of the LightningModule its weights are in every checkpoint
    (``ema.model.`` keys) and the update count beside them, so a resumed run continues the same
    average; its parameters take no gradient and no optimizer sees them.

    References: Polyak & Juditsky, "Acceleration of Stochastic Approximation by Averaging", 1992;
    Kingma & Dhariwal, "Glow", 2018 (Polyak averaging of the evaluated weights).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        # Train/eval mode follows the LightningModule's; the average only ever runs in evaluation.
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.updates = 0

    def update(self, model: nn.Module) -> None:
        if self.updates == 0:
            self.model.load_state_dict(model.state_dict())
        else:
            decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
            averaged = list(self.model.parameters())
            torch._foreach_lerp_(averaged, [p.detach() for p in model.parameters()], 1.0 - decay)
        self.updates += 1


class GlowModule(GuardedTraining, L.LightningModule):
    """Trains :class:`glowlab.models.Glow`; the loss is the negative log-likelihood in bits/dim.

    ``flow`` is the model's config (:class:`~glowlab.models.MultiscaleConfig`; ``model.flow.*`` on the
    command line); its ``image_shape`` and ``n_bins`` come from the data module when run through the
    ``glowlab`` CLI, and it is stored in checkpoints, so a model loads without data or Lightning
    (:func:`glowlab.load`). For class-conditional models (``flow.num_classes``) the loss adds
    ``class_weight`` times the class cross-entropy in bits per image, as in the paper's code. The
    learning rate warms up linearly over ``warmup_steps`` optimizer steps. With variational
    dequantization (``flow.dequantization``) the loss and every reported bits/dim are the bound with
    its ``log q`` term. A transformer flow (``flow.architecture="transformer"``) trains on images
    plus ``flow.noise_std`` Gaussian noise and drops ``flow.label_dropout`` of its labels. With
    ``ema_decay`` a :class:`WeightAverage` of the weights is kept; validation, test and sample grids
    use it (:attr:`eval_model`) and checkpoints hold it.

    The training step never waits for the device: no value is read back on the host between the
    batch and the optimizer step. Two options take the host further out of the loop, and change
    no result beyond float rounding; checkpoints are those of the plain model:

    * ``compile=True`` compiles each flow step with ``torch.compile`` once ActNorm is initialised:
      one graph per step shape, shared by every step of that shape (:meth:`Glow.compile_steps`), so
      compilation takes a handful of small graphs however deep the model is.
    * ``cuda_graphs=True`` captures the training step's forward and backward pass as one CUDA graph
      after two eager steps, and replays it for every batch of the captured shape
      (:class:`~glowlab.training.capture.CapturedStep`); the optimizer step, gradient clipping and
      the learning-rate schedule run outside it as usual. Where a capture would be wrong it is not
      made and one line says why: not on a CUDA device, a distributed strategy other than DDP,
      gradient accumulation, 16-bit loss scaling; a batch of another shape runs eagerly. Under DDP,
      whose reduction runs from autograd hooks that a replay does not run, the gradients are
      averaged over the processes after each step in one all-reduce outside the graph. A capture
      that fails (an operator it cannot record) leaves the run training eagerly. Opt-in until it
      has been measured on a GPU.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(
        self,
        flow: MultiscaleConfig = MultiscaleConfig(),
        class_weight: float = 0.01,
        optimizer: OptimizerName = "adamax",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 1000,
        compile: bool = False,
        cuda_graphs: bool = False,
        max_nonfinite_steps: int = 10,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__()
        check_option("model.optimizer", optimizer, tuple(OPTIMIZERS))
        check_training_options(lr, weight_decay, warmup_steps)
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"model.ema_decay={ema_decay} must be in (0, 1), or null for no weight averaging")
        if isinstance(flow, dict):  # a config given (or linked by the CLI) as plain values
            flow = MultiscaleConfig(**flow)
        self.save_hyperparameters()
        self.model = image_flow(flow)
        self.ema = WeightAverage(self.model, ema_decay) if ema_decay is not None else None
        # Evaluation averages per image over all ranks exactly (sums and counts are all-reduced).
        names = ["bpd", "class_bits", "class_acc"] if self.model.predicts_class else ["bpd"]
        self.eval_metrics = nn.ModuleDict(
            {f"{stage}_{name}": MeanMetric() for stage in ("val", "test") for name in names}
        )
        self._compiled = False
        self._graph: CapturedStep | None = None
        self._capture_error: str | None = None  # why a capture failed: the run then trains eagerly
        self._replayed = False  # whether this training step's gradients came from the graph
        self._eager_steps = 0
        self._said: set[str] = set()
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.epoch_means = EpochMeans()
        self._step_loss: Tensor | None = None
        # "emulated" replays run the step eagerly into the graph's tensors: the CPU tests use it.
        self.capture_backend = "cuda"

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        num_classes = self.model.num_classes
        if num_classes and datamodule is not None:
            found = getattr(datamodule, "num_classes", None)
            if found is None:
                raise ValueError("model.num_classes is set but the data has no labels")
            if found > num_classes:
                raise ValueError(f"model.num_classes={num_classes} but the data has labels up to {found - 1}")

    @property
    def eval_model(self) -> nn.Module:
        """The weights evaluation and sampling use: the moving average with ``ema_decay``, else the trained ones."""
        return self.ema.model if self.ema is not None else self.model

    def losses(
        self, x: Tensor, y: Tensor | None, levels: Tensor | None = None, model: nn.Module | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss of a batch and the per-image values (bits/dim, class bits) it is made of.

        ``levels`` are the integer images of ``x`` (a model with variational dequantization redraws
        its noise in their bins; the bound then has its ``log q`` term); ``model`` defaults to the
        trained weights. Pure tensor work, with no value read back on the host: what a captured
        step records.
        """
        model = self.model if model is None else model
        config = model.config
        log_q = None
        if model.dequantizer is not None:
            if levels is None:
                raise ValueError("variational dequantization needs the batch's integer images (levels)")
            x, log_q = model.redequantize(x, levels)
        if model.training and config.architecture == "transformer":
            generator = self._batch_generator(x.device)
            if config.noise_std > 0:  # TarFlow's noise augmentation: the model learns the data plus N(0, σ²)
                x = x + config.noise_std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if y is not None and config.label_dropout > 0:  # unlabelled examples teach classifier-free guidance
                y = model.drop_labels(y, generator)
        out = model.evaluate(x, y)
        if log_q is None:
            values = {"bpd": bits_per_dim(out.log_prob, model.num_dims, model.n_bins)}
        else:
            values = {"bpd": variational_bits_per_dim(out.log_prob, log_q, model.num_dims, model.n_bins)}
        loss = values["bpd"].mean()
        if out.class_logits is not None:
            values["class_bits"] = F.cross_entropy(out.class_logits, y, reduction="none") / math.log(2.0)  # per image
            values["class_acc"] = (out.class_logits.argmax(dim=1) == y).to(values["bpd"].dtype)
            loss = loss + self.hparams.class_weight * values["class_bits"].mean()
        return loss, values

    def _batch_generator(self, device: torch.device) -> torch.Generator:
        """A generator seeded by the data seed, the rank and the training batch number.

        Draws made in the training step from it (the transformer flow's noise and dropped labels)
        are those of the uninterrupted run after a resume, as the data module's dequantization is.
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        seed = getattr(datamodule, "seed", 0)
        batch = getattr(datamodule, "train_batches", self.global_step)
        generator = torch.Generator(device=device)
        # Another stream than the data module's dequantization noise (other constants: no shared seeds).
        generator.manual_seed(((seed * 999_983 + self.global_rank + 7_919) * 1_000_000_009 + batch) % 2**63)
        return generator

    def _inputs(self, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor | None]:
        return batch[0], batch[1] if self.model.num_classes is not None else None

    @staticmethod
    def _levels(batch: tuple[Tensor, ...]) -> Tensor | None:
        return batch[3] if len(batch) > 3 else None

    def _compile_once_initialised(self) -> None:
        if self.hparams.compile and not self._compiled and self.model.initialized:
            self.model.compile_steps()
            self._compiled = True

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y = self._inputs(batch)
        self._compile_once_initialised()
        graph = self._training_graph(x, y)
        self._replayed = graph is not None
        loss, values = graph.replay(x, y) if graph is not None else self.losses(x, y, self._levels(batch))
        self.log_training_values({f"train_{k}": v.mean() for k, v in values.items()}, x.shape[0], "train_bpd")
        if logs_this_step(self):
            self.log("train_loss", loss, on_step=True, on_epoch=False)
        self._step_loss = loss.detach()
        return loss

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        if self._replayed:
            return  # the replayed graph has already run this batch's backward pass
        super().backward(loss, *args, **kwargs)

    def on_after_backward(self) -> None:
        # Before clipping and the optimizer step, as DDP's reduction would be; DDP's own is off once a
        # graph is captured (_training_graph).
        if self._graph is not None and self.trainer.world_size > 1:
            average_gradients(self._trained_parameters())

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        # Lightning zeroes gradients after training_step; a replay has just written this batch's.
        if not self._replayed:
            optimizer.zero_grad(set_to_none=True)

    def _training_graph(self, x: Tensor, y: Tensor | None) -> CapturedStep | None:
        """The captured step to replay for this batch, capturing it when it is time; None: run eagerly."""
        if not self.hparams.cuda_graphs:
            return None
        if self._graph is not None:
            if self._graph.matches(x, y):
                return self._graph
            self._say(
                f"a batch of shape {tuple(x.shape)} runs eagerly (the CUDA graph was captured for "
                f"{tuple(self._graph.static_x.shape)})"
            )
            return None
        reason = self._why_not_capture(x)
        if reason is not None:
            self._say(f"cuda_graphs: training runs eagerly: {reason}")
            return None
        if not self.model.initialized or self._eager_steps < 2:
            self._eager_steps += 1  # ActNorm's initialisation, compilation and autotuning happen eagerly
            return None
        try:
            self._graph = CapturedStep(self.losses, list(self.model.parameters()), x, y, backend=self.capture_backend)
        except RuntimeError as error:
            # An operator the capture cannot record (one that waits for the device, a library call
            # barred during a capture): the run trains eagerly, as without the option, and says so.
            self._capture_error = first_line(error)
            for p in self.model.parameters():
                p.grad = None  # the failed warm-up's or capture's gradients are no batch's
            self._say(f"cuda_graphs: training runs eagerly: {self._why_not_capture(x)}")
            return None
        if self.trainer.world_size > 1:
            # DDP reduces gradients from autograd hooks, which a replay does not run: its reduction is
            # off for the rest of the run (set before this step's DDP forward ends, so it expects no
            # hooks), and on_after_backward averages the gradients of every step, replayed or eager,
            # in one collective outside the graph.
            self.trainer.strategy.model.require_backward_grad_sync = False
        self._say(
            f"cuda_graphs: training step captured for batches of shape {tuple(x.shape)} "
            f"in {self._graph.capture_seconds:.1f} s"
        )
        return self._graph

    def _why_not_capture(self, x: Tensor) -> str | None:
        if self._capture_error is not None:
            return f"the capture failed ({self._capture_error})"
        trainer = self.trainer
        if self.capture_backend == "cuda" and x.device.type != "cuda":
            return f"it needs a CUDA device and this run is on {x.device.type}"
        if trainer.world_size > 1 and not isinstance(trainer.strategy.model, DistributedDataParallel):
            return (
                f"{trainer.world_size} processes under {type(trainer.strategy).__name__}: a replayed graph's "
                "gradients are averaged over processes for DDP only"
            )
        if trainer.accumulate_grad_batches > 1:
            return (
                f"accumulate_grad_batches={trainer.accumulate_grad_batches}: a replay computes one "
                "micro-batch's gradients, not their sum"
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return f"precision {trainer.precision} scales the loss outside the graph (use bf16-mixed or 32-true)"
        if self.model.dequantizer is not None:
            return "variational dequantization takes the integer images too; a captured step takes the images only"
        if self.model.config.architecture == "transformer":
            return "the transformer flow's noise augmentation and label dropout draw new values each step"
        return None

    def _say(self, message: str) -> None:
        """Print ``message`` once per run (rank 0)."""
        if message not in self._said:
            self._said.add(message)
            rank_zero_only(glowlab_logger().info)(f"glowlab: {message}")

    def _eval_step(self, batch: tuple[Tensor, ...], stage: str) -> None:
        x, y = self._inputs(batch)
        self._compile_once_initialised()
        _, values = self.losses(x, y, self._levels(batch), self.eval_model)
        bad = ~torch.isfinite(values["bpd"])
        if bool(bad.any()):  # an evaluation reads values back anyway: one more read per batch
            which = batch[2][bad].tolist()[:5] if len(batch) > 2 else f"{int(bad.sum())} of {len(bad)}"
            raise NonFiniteTraining(
                f"{stage} bits/dim is not finite for image(s) {which} of the {stage} split: the model gives them no "
                "density or its parameters are broken; no mean is reported over the other images"
            )
        for name, value in values.items():
            metric = self.eval_metrics[f"{stage}_{name}"]
            metric.update(value)
            self.log(f"{stage}_{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "bpd")

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_skipped(self) -> None:
        skipped = getattr(self.trainer.datamodule, "skipped_samples", None) if self._trainer is not None else None
        if skipped is not None:
            self.log("data_skipped", float(skipped), reduce_fx="sum", sync_dist=True)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._log_skipped()

    def on_validation_epoch_end(self) -> None:
        self._log_skipped()

    def on_test_epoch_end(self) -> None:
        self._log_skipped()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ema is not None:
            checkpoint["ema_updates"] = self.ema.updates

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.ema is not None:
            self.ema.updates = int(checkpoint.get("ema_updates", 0))

    def configure_optimizers(self) -> Any:
        scaler = self._trainer is not None and getattr(self.trainer.precision_plugin, "scaler", None) is not None
        return optimizer_with_warmup(self, self.hparams, loss_scaling=scaler)
