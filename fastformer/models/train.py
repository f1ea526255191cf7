"""Training the Seq2SeqTransformer on a synthetic digit task: `python -m fastformer train`.

One process, or several under torchrun (gloo on CPU, nccl on CUDA) with DDP, or with FSDP2
(--fsdp: fully_shard per layer and at the root, parameters, gradients and optimizer state
sharded). Every rank draws the same global batch from the same seed and trains on its
contiguous share; the loss is normalised by the global batch's token count, so the averaged
gradients, and the trained weights, equal those of one process on the whole batch.

Writes to --out: checkpoint.pt (weights, model and training config, metrics), metrics.json
and loss.png (loss curve and held-out exact-match).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .backend import BACKENDS, check_backend
from .config import FIELD_BOUNDS, Bound, Seq2SeqConfig
from .seq2seq import Seq2SeqTransformer
from .tasks import TASKS, Batch, DigitTask

__all__ = [
    "TrainConfig",
    "TrainResult",
    "add_arguments",
    "check_out_folder",
    "checked_option",
    "config_from_args",
    "evaluate",
    "load_checkpoint",
    "number_option",
    "train",
]


@dataclass
class TrainConfig:
    task: str = "reverse"
    min_digits: int = 1
    max_digits: int = 12
    steps: int = 800
    batch_size: int = 128  # global, over all ranks
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2  # encoder layers and decoder layers each
    dim_feedforward: int = 512
    dropout: float = 0.0
    backend: str = "fastformer"
    seed: int = 0
    eval_every: int = 100
    eval_size: int = 500  # held-out strings for the periodic evaluation
    test_size: int = 2000  # other held-out strings for the final exact-match
    stop_at: float | None = None  # stop once the periodic exact-match reaches this
    fsdp: bool = False  # with several ranks: FSDP2 (fully_shard) instead of DDP
    gradient_checkpointing: bool = False
    autocast: bool = False  # bfloat16 autocast
    compile: bool = False  # torch.compile(fullgraph=True) of the loss
    threads: int | None = None
    out: str = "runs/seq2seq"
    progress: bool = True

    def __post_init__(self) -> None:
        """Every setting checked here, before any work (ValueError naming the field): the
        numbers against _BOUNDS, the task, backend and model sizes by building them."""
        for name, bound in _BOUNDS.items():
            value = getattr(self, name)
            if value is not None:  # threads and stop_at: None is their default
                bound.check("TrainConfig", name, value)
        check_backend(self.backend)
        self.model_config(DigitTask(self.task, self.min_digits, self.max_digits))

    def model_config(self, task: DigitTask) -> Seq2SeqConfig:
        return Seq2SeqConfig(
            vocab_size=task.vocab_size,
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_encoder_layers=self.n_layers,
            n_decoder_layers=self.n_layers,
            dim_feedforward=self.dim_feedforward,
            dropout=self.dropout,
            max_len=task.max_len,
            pad_id=task.pad_id,
            bos_id=task.bos_id,
            eos_id=task.eos_id,
        )


# TrainConfig's numeric fields (also the command line's option types); the model's sizes as
# Seq2SeqConfig bounds them, n_layers as the decoder's (both stacks get it).
_BOUNDS: dict[str, Bound] = {
    "min_digits": Bound(1),
    "max_digits": Bound(1),
    "steps": Bound(1),
    "batch_size": Bound(1),
    "lr": Bound(0, integer=False, low_open=True),
    "warmup": Bound(0),
    "weight_decay": Bound(0, integer=False),
    "grad_clip": Bound(0, integer=False, low_open=True),
    "d_model": FIELD_BOUNDS["d_model"],
    "n_heads": FIELD_BOUNDS["n_heads"],
    "n_layers": FIELD_BOUNDS["n_decoder_layers"],
    "dim_feedforward": FIELD_BOUNDS["dim_feedforward"],
    "dropout": FIELD_BOUNDS["dropout"],
    "eval_every": Bound(1),
    "eval_size": Bound(1),
    "test_size": Bound(1),
    "stop_at": Bound(0, 1, integer=False, low_open=True),
    "threads": Bound(1),
}


def check_out_folder(path: str | Path) -> None:
    """ValueError where `path` cannot become an output folder, so that a run fails before
    its work rather than when it saves: it, or a folder above it, is not a folder, or the
    deepest existing folder on the way is not writable."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:  # the deepest existing part
        existing = existing.parent
    where = "" if existing == Path(path) else f"cannot be created: {str(existing)!r} "
    if not existing.is_dir():
        raise ValueError(f"output folder {str(path)!r} {where}exists and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {str(path)!r} {where}is not writable")


@dataclass
class TrainResult:
    steps: int
    seconds: float  # training time, evaluations excluded
    tokens_per_second: float
    final_loss: float
    exact_match: float  # on test_size held-out strings, greedy decoding
    world_size: int
    history: dict[str, list[float]] = field(default_factory=dict)


class _LossModule(nn.Module):
    """The model's loss as a module's forward: what DDP and torch.compile wrap."""

    def __init__(self, model: Seq2SeqTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, tgt: Tensor, normalizer: Tensor) -> Tensor:
        return self.model.loss(src, tgt, normalizer=normalizer)


def _distributed() -> tuple[int, int]:
    """(rank, world size), joining the process group when torchrun started several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98))


@torch.no_grad()
def evaluate(model: Seq2SeqTransformer, task: DigitTask, batch: Batch, chunk: int = 500) -> float:
    """Exact-match rate of greedy decoding (KV cache) on batch."""
    correct = 0
    for start in range(0, batch.src.shape[0], chunk):
        src, tgt = batch.src[start : start + chunk], batch.tgt[start : start + chunk]
        generated = model.generate(src, task.max_digits + 1)
        correct += int(task.exact_match(generated, tgt).sum())
    return correct / max(1, batch.src.shape[0])


def _full_state_dict(model: Seq2SeqTransformer) -> dict[str, Tensor]:
    """The model's weights, whole: FSDP's shards gathered (a collective: call on every rank)."""
    from torch.distributed.tensor import DTensor

    return {
        name: value.full_tensor() if isinstance(value, DTensor) else value
        for name, value in model.state_dict().items()
    }


def _unsharded(model: Seq2SeqTransformer) -> Seq2SeqTransformer:
    """The model itself, or under FSDP a plain copy with the gathered weights (collective),
    for generate(), which calls sub-modules outside the forwards FSDP hooks into."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model
    copy = Seq2SeqTransformer(model.config, backend=model.backend)
    copy.load_state_dict(_full_state_dict(model))
    return copy.to(next(model.parameters()).device)


def _evaluate_everywhere(model: Seq2SeqTransformer, task: DigitTask, batch: Batch) -> float:
    """Rank 0 evaluates; every rank gets its result (so all stop at the same step)."""
    rank, world = _distributed()
    model = _unsharded(model)
    value = torch.tensor([evaluate(model, task, batch) if rank == 0 else 0.0])
    if world > 1:
        dist.broadcast(value, src=0)
    return float(value)


def _progress(enabled: bool, steps: int):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]train[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tokens_per_s]:>9,.0f} tok/s"),
        TextColumn("exact {task.fields[exact]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def train(config: TrainConfig) -> TrainResult:
    """Train, evaluate and (on rank 0) save; see the module docstring."""
    check_out_folder(config.out)
    rank, world = _distributed()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {world} ranks")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = (
        torch.device(f"cuda:{rank % torch.cuda.device_count()}")
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    task = DigitTask(config.task, config.min_digits, config.max_digits)
    torch.manual_seed(config.seed)
    model = Seq2SeqTransformer(config.model_config(task), backend=config.backend).to(device)
    model.gradient_checkpointing = config.gradient_checkpointing
    loss_module: nn.Module = _LossModule(model)
    if config.compile:
        loss_module = torch.compile(loss_module, fullgraph=True)
    if world > 1 and config.fsdp:
        from torch.distributed.fsdp import fully_shard

        # The layers return views (of the fused norm's output); nothing modifies them in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        for layer in [*model.encoder, *model.decoder]:
            fully_shard(layer)
        fully_shard(model)  # the rest: embeddings, final norms
    elif world > 1:
        loss_module = nn.parallel.DistributedDataParallel(loss_module)
    optimizer = _optimizer(model, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    data = torch.Generator().manual_seed(config.seed + 1)  # the same batches on every rank
    eval_set = task.held_out_set(config.eval_size, seed=config.seed + 2)
    test_set = task.held_out_set(config.test_size, seed=config.seed + 3)
    eval_set = Batch(eval_set.src.to(device), eval_set.tgt.to(device))
    test_set = Batch(test_set.src.to(device), test_set.tgt.to(device))

    history: dict[str, list[float]] = {"step": [], "loss": [], "eval_step": [], "exact": []}
    seconds, tokens, step, loss_value = 0.0, 0, 0, float("nan")
    with _progress(config.progress and rank == 0, config.steps) as progress:
        bar = None
        if progress is not None:
            bar = progress.add_task(
                "train", total=config.steps, loss=0.0, tokens_per_s=0.0, exact="-"
            )
        model.train()
        for step in range(1, config.steps + 1):
            started = time.perf_counter()
            batch = task.sample(config.batch_size, data)
            loss_value = _train_step(loss_module, optimizer, batch, task.pad_id, config, device)
            schedule.step()
            seconds += time.perf_counter() - started
            tokens += int((batch.src != task.pad_id).sum() + (batch.tgt != task.pad_id).sum())
            history["step"].append(step)
            history["loss"].append(loss_value)
            exact = None
            if step % config.eval_every == 0 or step == config.steps:
                exact = _evaluate_everywhere(model, task, eval_set)
                model.train()
                history["eval_step"].append(step)
                history["exact"].append(exact)
                if progress is not None:
                    progress.console.print(
                        f"step {step:>6}  loss {loss_value:.4f}  held-out exact-match "
                        f"{exact:.2%}  {tokens / seconds:,.0f} tok/s  {seconds:.0f} s"
                    )
            if progress is not None and bar is not None:
                fields: dict[str, Any] = {"loss": loss_value, "tokens_per_s": tokens / seconds}
                if exact is not None:
                    fields["exact"] = f"{exact:.1%}"
                progress.update(bar, advance=1, **fields)
            if exact is not None and config.stop_at is not None and exact >= config.stop_at:
                break

    exact_match = _evaluate_everywhere(model, task, test_set)
    result = TrainResult(
        steps=step,
        seconds=seconds,
        tokens_per_second=tokens / max(seconds, 1e-9),
        final_loss=loss_value,
        exact_match=exact_match,
        world_size=world,
        history=history,
    )
    weights = _full_state_dict(model)
    if rank == 0:
        _save(weights, model.config, config, result)
    if world > 1:
        dist.barrier()
    return result


def _train_step(
    loss_module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    pad_id: int,
    config: TrainConfig,
    device: torch.device,
) -> float:
    """One optimizer step on this rank's share of the global batch; returns the loss of the
    whole global batch."""
    rank, world = _distributed()
    src = batch.src.chunk(world)[rank].to(device)  # this rank's contiguous share
    tgt = batch.tgt.chunk(world)[rank].to(device)
    # Each rank divides its sum of token losses by (the global batch's token count / world):
    # DDP's average of the ranks' gradients is then the gradient of the global mean.
    normalizer = (batch.tgt[:, 1:] != pad_id).sum().to(device) / world
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast):
        loss = loss_module(src, tgt, normalizer)
    loss.backward()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()) if world == 1 else _global_loss(loss, world)


def _global_loss(loss: Tensor, world: int) -> float:
    """The loss of the whole batch from the ranks' shares, each a sum over its tokens divided
    by (global token count / world)."""
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / world


def _save(
    weights: dict[str, Tensor],
    model_config: Seq2SeqConfig,
    config: TrainConfig,
    result: TrainResult,
) -> None:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in asdict(result).items() if k != "history"}
    torch.save(
        {
            "model": weights,
            "model_config": model_config.to_dict(),
            "train_config": asdict(config),
            "result": summary,
        },
        out / "checkpoint.pt",
    )
    # JSON has no NaN or infinity (a diverged loss): null, and allow_nan=False guarantees it.
    metrics = json.dumps(_finite_or_none(asdict(result)), indent=2, allow_nan=False)
    (out / "metrics.json").write_text(metrics)
    _plot(result, out / "loss.png")


def _finite_or_none(value: Any) -> Any:
    """value with every NaN or infinite float, however nested in dicts and lists, as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def _plot(result: TrainResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = result.history
    fig, loss_axis = plt.subplots(figsize=(8, 4.5))
    loss_axis.plot(history["step"], history["loss"], color="tab:blue", alpha=0.35, lw=0.8)
    smooth, average = [], None
    for value in history["loss"]:
        average = value if average is None else 0.95 * average + 0.05 * value
        smooth.append(average)
    loss_axis.plot(history["step"], smooth, color="tab:blue", label="training loss (EMA)")
    loss_axis.set_yscale("log")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("cross-entropy per token", color="tab:blue")
    exact_axis = loss_axis.twinx()
    exact_axis.plot(history["eval_step"], history["exact"], "o-", color="tab:orange")
    exact_axis.set_ylim(0, 1.02)
    exact_axis.set_ylabel("held-out exact-match", color="tab:orange")
    loss_axis.set_title(
        f"{result.steps} steps, {result.seconds:.0f} s, {result.tokens_per_second:,.0f} tok/s, "
        f"test exact-match {result.exact_match:.2%}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> Seq2SeqTransformer:
    """The model saved by train() (in eval mode)."""
    saved = torch.load(path, map_location=map_location, weights_only=True)
    model = Seq2SeqTransformer(Seq2SeqConfig.from_dict(saved["model_config"]))
    model.load_state_dict(saved["model"])
    return model.eval()


# ----------------------------------------------------------------------------------------
# Command line: one option per TrainConfig field
# ----------------------------------------------------------------------------------------

_HELP = {
    "task": "reverse, sort or copy digit strings",
    "steps": "optimizer steps",
    "batch_size": "global batch (split over torchrun's ranks)",
    "backend": "fastformer, torch or reference",
    "out": "folder for checkpoint.pt, metrics.json and loss.png",
    "n_layers": "encoder layers and decoder layers (each)",
    "stop_at": "stop once the periodic held-out exact-match reaches this fraction",
    "gradient_checkpointing": "recompute each layer in backward (torch.utils.checkpoint)",
    "autocast": "bfloat16 autocast",
    "compile": "torch.compile(fullgraph=True) of the model and loss",
    "threads": "torch.set_num_threads (torchrun sets 1 per rank by default)",
    "progress": "show the progress bar",
    "fsdp": "under torchrun: shard with FSDP2 (fully_shard) instead of DDP",
}


def number_option(bound: Bound) -> Callable[[str], int | float]:
    """An argparse type: the option's text as a number within bound, else argparse's error
    "argument --name: expected <what bound allows>, got <text>"."""

    def parse(text: str) -> int | float:
        try:
            value = int(text) if bound.integer else float(text)
        except ValueError:
            value = None
        if not bound.accepts(value):
            raise argparse.ArgumentTypeError(f"expected {bound.describe()}, got {text!r}")
        return value

    return parse


def checked_option(check: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type: the option's text once check(text) passes; check's ValueError
    becomes argparse's error "argument --name: <message>"."""

    def parse(text: str) -> str:
        try:
            check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--option for every TrainConfig field (--steps, --batch-size, --backend, ...), each
    checked as TrainConfig checks it, while parsing."""
    for spec in fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        default = spec.default
        help_text = _HELP.get(spec.name, "") + f" (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif spec.name in _BOUNDS:
            option = number_option(_BOUNDS[spec.name])
            parser.add_argument(flag, type=option, default=default, help=help_text)
        elif spec.name == "out":
            option = checked_option(check_out_folder)
            parser.add_argument(flag, type=option, default=default, help=help_text)
        else:
            choices = None
            if spec.name == "task":
                choices = list(TASKS)
            elif spec.name == "backend":
                choices = list(BACKENDS)
            parser.add_argument(
                flag, type=type(default), default=default, choices=choices, help=help_text
            )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed options: ValueError for the settings no single option can
    check (min_digits > max_digits, d_model not divisible by n_heads)."""
    return TrainConfig(**{spec.name: getattr(args, spec.name) for spec in fields(TrainConfig)})


def run_command(config: TrainConfig) -> TrainResult:
    """`fastformer train`: train, print the result on rank 0, leave the process group."""
    result = train(config)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(
            f"trained {result.steps} steps on {result.world_size} process(es) in "
            f"{result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s); final loss "
            f"{result.final_loss:.4f}; held-out exact-match {result.exact_match:.2%}; "
            f"saved to {config.out}/"
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    return result
