"""Suite of whole encoder-decoder models: fastformer.nn.Transformer and
fastformer.models.Seq2SeqTransformer against torch.nn.Transformer, eager and compiled.

The model: d_model, heads, `layers` encoder and `layers` decoder layers, dim_feedforward,
GELU, pre-norm (norm_first=True, with the final LayerNorm of each stack), batch_first=True,
dropout 0 (so every provider does the same work, with no random masks to draw);
`--full` adds post-norm (norm_first=False) at the first length. Source and target have
the same length L; the decoder's self-attention is causal (tgt_mask =
generate_square_subsequent_mask(L) with tgt_is_causal=True), the encoder and the
cross-attention see everything. Parameters and inputs in the case's dtype (pure bf16 on
GPU, no autocast).

Providers:
- "fastformer": fastformer.nn.Transformer, the same constructor arguments, loaded with the
  eager model's state_dict (its own copy of the weights);
- "eager": torch.nn.Transformer (in "infer" torch's own inference fast path runs where
  it applies: eval mode without grad);
- "torch.compile": torch.compile(fullgraph=True) of a function running the eager model
  (and, in "train", its loss), compiled afresh per case; skipped when compilation fails;
- "fastformer (Seq2Seq)": fastformer.models.Seq2SeqTransformer of the same sizes
  (Seq2SeqConfig: vocab_size SEQ2SEQ_VOCAB, d_model, n_heads, n_encoder_layers =
  n_decoder_layers = layers, dim_feedforward, GELU, dropout 0, max_len L) on random token
  ids, with its own initialisation (its keys differ from torch.nn.Transformer's). It does
  more than the others: token and position embeddings, a source padding mask, the tied
  output projection to the vocabulary (2*B*L*d_model*vocab FLOPs forward) and, in "train",
  a cross-entropy loss. Skipped, with the reason, where fastformer.models does not import.

Modes:
- "train": one training step without the optimizer (its update is the same for every
  provider and only dilutes the ratios): train mode, a forward of src and tgt, the loss,
  and the gradients of every parameter through torch.autograd.grad (returned, not
  accumulated into .grad, so no step depends on the last one). Loss: mean(out ** 2) in
  float32 for the torch.nn.Transformer-API providers; cross-entropy of the logits against
  random token ids for Seq2Seq.
- "infer": eval mode under torch.inference_mode, one forward (the decoder output, or
  Seq2Seq's logits).

Throughput: tokens/s = B * (src_len + tgt_len) / median step time (every token of both
sides, the encoder's and the decoder's). No share of a device peak is reported. Peak
memory: the harness's (GPU: torch.cuda.max_memory_allocated during one step above what was
allocated before; CPU: growth of the process's peak resident memory), for a training step
including the gradients it returns. In "train" cases each provider's activation memory is
also recorded (harness.activation_memory: the tensors its forward saves for backward,
inputs and parameters excluded), where saved-tensor hooks see them (compiled code may not).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .device import Skip, one_line
from .harness import (
    Case,
    Context,
    Provider,
    Result,
    Suite,
    Target,
    compiled,
    input_sets,
    rotate,
    run_case,
)
from .measure import activation_memory, dtype_name

OP = "transformer"
PROVIDERS = ["fastformer", "eager", "torch.compile", "fastformer (Seq2Seq)"]
MODES = ("train", "infer")
# Seq2Seq's vocabulary: small, so that its output projection stays a small part of a step
# (d_model 512: 2*L*512*1024 FLOPs a target sequence, against about 24*L*512^2 per layer).
SEQ2SEQ_VOCAB = 1024
ACTIVATION = "gelu"
# A model step on CPU lasts 100x an op's call: with the run's timing budget (1 s per
# provider) a 0.25 s training step gets only the minimum 5 rounds, too few for a steady
# median on a shared machine. This suite's CPU cases take 3x the budget (about 13 rounds).
CPU_BUDGET_SCALE = 3.0


@dataclass(frozen=True)
class Model:
    d_model: int
    heads: int
    layers: int  # encoder layers, and as many decoder layers
    dim_feedforward: int


# CPU: a small model at one length for the default run (about a minute on 2 cores, most of
# it torch.compile compiling); --full sweeps 512..4096 with the same tokens per step.
CPU_MODEL = Model(256, 4, 2, 1024)
CPU_TOKENS = 1024  # batch x length of one side: batch 2 at length 512
CPU_LENGTHS = (512,)
CPU_FULL_LENGTHS = (512, 1024, 2048, 4096)
# GPU: the base Transformer (d_model 512, 8 heads, 6 + 6 layers, 2048 hidden), 16384 tokens
# per side (batch 32 at length 512 down to batch 4 at 4096); the default run takes two
# lengths (torch.compile compiles the 12-layer model per case), --full all four.
GPU_MODEL = Model(512, 8, 6, 2048)
GPU_TOKENS = 16384
GPU_LENGTHS = (1024, 4096)
GPU_FULL_LENGTHS = (512, 1024, 2048, 4096)


def _cases(ctx: Context) -> list[Case]:
    gpu = ctx.device.type == "cuda"
    model = GPU_MODEL if gpu else CPU_MODEL
    per_side = GPU_TOKENS if gpu else CPU_TOKENS
    lengths = ctx.pick(CPU_LENGTHS, CPU_FULL_LENGTHS, GPU_LENGTHS, GPU_FULL_LENGTHS)
    dtypes = ctx.dtypes([torch.float32], [torch.bfloat16, torch.float16])
    variants = [(length, True) for length in lengths]
    if ctx.full:
        variants.append((lengths[0], False))  # post-norm at the first length
    cases = []
    for dtype in dtypes:
        for mode in MODES:
            for length, norm_first in variants:
                batch = max(1, per_side // length)
                name = f"{batch}x{length} d{model.d_model} {model.layers}+{model.layers}" + (
                    "" if norm_first else " post-norm"
                )
                # Not the batch, which changes with the length: the plots' panels group
                # cases by every param but the length.
                params = {
                    "batch_x_length": per_side,
                    "length": length,
                    "d_model": model.d_model,
                    "heads": model.heads,
                    "layers": model.layers,
                    "dim_feedforward": model.dim_feedforward,
                    "norm_first": norm_first,
                    "dropout": 0.0,
                }
                tokens = batch * 2 * length  # src_len + tgt_len per sequence
                cases.append(Case(OP, name, dtype_name(dtype), mode, params, tokens=tokens))
    return cases


def _batch(case: Case) -> int:
    return max(1, case.params["batch_x_length"] // case.params["length"])


# ----------------------------------------------------------------------------- models


def _kwargs(case: Case) -> dict[str, object]:
    """torch.nn.Transformer's constructor arguments for the case."""
    p = case.params
    return {
        "d_model": p["d_model"],
        "nhead": p["heads"],
        "num_encoder_layers": p["layers"],
        "num_decoder_layers": p["layers"],
        "dim_feedforward": p["dim_feedforward"],
        "dropout": p["dropout"],
        "activation": ACTIVATION,
        "batch_first": True,
        "norm_first": p["norm_first"],
    }


def _torch_model(ctx: Context, case: Case) -> torch.nn.Transformer:
    with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... norm_first"
        warnings.simplefilter("ignore")
        model = torch.nn.Transformer(**_kwargs(case))
    return model.to(ctx.device, getattr(torch, case.dtype))


def _fastformer_model(case: Case, reference: torch.nn.Transformer) -> torch.nn.Module:
    import fastformer.nn  # here, not at module level: the harness must import without it

    model = fastformer.nn.Transformer(**_kwargs(case))
    model.load_state_dict(reference.state_dict())
    parameter = next(reference.parameters())
    return model.to(parameter.device, parameter.dtype)


def _seq2seq_model(ctx: Context, case: Case) -> torch.nn.Module:
    try:
        from fastformer.models import Seq2SeqConfig, Seq2SeqTransformer
    except ImportError as error:
        raise Skip(f"fastformer.models.Seq2SeqTransformer unavailable: {one_line(error)}") from None
    p = case.params
    config = Seq2SeqConfig(
        vocab_size=SEQ2SEQ_VOCAB,
        d_model=p["d_model"],
        n_heads=p["heads"],
        n_encoder_layers=p["layers"],
        n_decoder_layers=p["layers"],
        dim_feedforward=p["dim_feedforward"],
        dropout=p["dropout"],
        activation=ACTIVATION,
        max_len=p["length"],
        norm_first=p["norm_first"],
    )
    return Seq2SeqTransformer(config).to(ctx.device, getattr(torch, case.dtype))


# ----------------------------------------------------------------------------- inputs and steps


@dataclass
class _Inputs:
    src: torch.Tensor  # (B, L, d_model) embeddings, or (B, L) token ids for Seq2Seq
    tgt: torch.Tensor  # (B, L, d_model), or (B, L) token ids
    labels: torch.Tensor | None = None  # (B, L) token ids: Seq2Seq's training targets


def _embedding_sets(ctx: Context, case: Case) -> list[_Inputs]:
    batch, length, d_model = _batch(case), case.params["length"], case.params["d_model"]
    dtype = getattr(torch, case.dtype)
    set_bytes = 2 * batch * length * d_model * dtype.itemsize

    def tensor() -> torch.Tensor:
        return torch.randn(batch, length, d_model, device=ctx.device).to(dtype)

    return [_Inputs(tensor(), tensor()) for _ in range(input_sets(ctx, set_bytes))]


def _token_sets(ctx: Context, case: Case, count: int) -> list[_Inputs]:
    batch, length = _batch(case), case.params["length"]

    def ids() -> torch.Tensor:  # above pad, BOS and EOS (0, 1, 2): no padding anywhere
        return torch.randint(3, SEQ2SEQ_VOCAB, (batch, length), device=ctx.device)

    return [_Inputs(ids(), ids(), ids()) for _ in range(count)]


Forward = Callable[[_Inputs], torch.Tensor]  # one input set -> the loss or the output


def _transformer_forward(model: torch.nn.Module, mask: torch.Tensor, train: bool) -> Forward:
    def forward(i: _Inputs) -> torch.Tensor:
        out = model(i.src, i.tgt, tgt_mask=mask, tgt_is_causal=True)  # (B, L, d_model)
        return out.float().square().mean() if train else out

    return forward


def _seq2seq_forward(model: torch.nn.Module, train: bool) -> Forward:
    def forward(i: _Inputs) -> torch.Tensor:
        logits = model(i.src, i.tgt)  # (B, L, vocab)
        if not train:
            return logits
        assert i.labels is not None
        return F.cross_entropy(logits.flatten(0, 1).float(), i.labels.flatten())

    return forward


def _step(forward: Forward, model: torch.nn.Module, sets: list[_Inputs], mode: str):
    """One timed call on the next input set: a training step (forward, loss, gradients of
    every parameter) or an inference forward."""
    next_inputs = rotate(sets)
    if mode == "infer":
        model.eval()

        def infer() -> torch.Tensor:
            with torch.inference_mode():
                return forward(next_inputs())

        return infer
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def train() -> tuple[torch.Tensor, ...]:
        loss = forward(next_inputs())
        return torch.autograd.grad(loss, params)

    return train


def _bench(ctx: Context, case: Case) -> Result:
    train = case.mode == "train"
    reference = _torch_model(ctx, case)
    length = case.params["length"]
    mask = torch.nn.Transformer.generate_square_subsequent_mask(
        length, device=ctx.device, dtype=getattr(torch, case.dtype)
    )
    sets = _embedding_sets(ctx, case)
    # Each provider's forward, model and inputs, kept as built (a compiled one compiled
    # once) to measure activation memory after the timings.
    built: dict[str, tuple[Forward, torch.nn.Module, list[_Inputs]]] = {}

    def provider(
        name: str,
        build: Callable[[], tuple[Forward, torch.nn.Module, list[_Inputs]]],
        skip_on_error: str | None = None,
    ) -> Provider:
        def build_step():
            forward, model, inputs = built[name] = build()
            return _step(forward, model, inputs, case.mode)

        return Provider(name, build_step, skip_on_error)

    def fastformer():
        model = _fastformer_model(case, reference)
        return _transformer_forward(model, mask, train), model, sets

    def torch_compile():
        return compiled(_transformer_forward(reference, mask, train)), reference, sets

    def seq2seq():
        model = _seq2seq_model(ctx, case)
        return _seq2seq_forward(model, train), model, _token_sets(ctx, case, len(sets))

    providers = [
        provider("fastformer", fastformer),
        provider("eager", lambda: (_transformer_forward(reference, mask, train), reference, sets)),
        provider("torch.compile", torch_compile, skip_on_error="torch.compile failed"),
        provider("fastformer (Seq2Seq)", seq2seq),
    ]
    if ctx.device.type == "cpu":  # more rounds than the minimum 5 of a 0.25 s step
        ctx = dataclasses.replace(ctx, budget_s=CPU_BUDGET_SCALE * ctx.budget_s)
    result = run_case(ctx, case, providers)
    if train:
        _activation_memory(result, built)
    return result


def _activation_memory(
    result: Result, built: dict[str, tuple[Forward, torch.nn.Module, list[_Inputs]]]
) -> None:
    """Record what one training forward of each provider keeps for its backward."""
    for name, (forward, model, sets) in built.items():
        m = result.get(name)
        if m is None or m.status != "ok":
            continue
        i = sets[0]
        leaves = [i.src, i.tgt, *model.parameters()]
        try:
            model.train()
            m.activation_memory_bytes = activation_memory(lambda f=forward, i=i: f(i), leaves)
        except Exception:  # out of memory, or hooks that compiled code does not take
            continue


def _targets(ctx: Context) -> list[Target]:
    """The issue's goals, for the pre-norm model without dropout. CPU: 2 threads, float32,
    the default case (d_model 256, 2 + 2 layers, batch 2 x length 512): a training step
    >= 1.2x eager. GPU: bfloat16, the base model at every length 512..4096 (each length
    on its own, not a mean): a training step >= 1.3x eager and >= 1.1x torch.compile, and
    peak training memory at most 0.6x eager's at length 4096."""
    if ctx.device.type == "cpu":
        where = {
            "device": "cpu",
            "threads": 2,
            "dtype": "float32",
            "mode": "train",
            "d_model": CPU_MODEL.d_model,
            "layers": CPU_MODEL.layers,
            "batch_x_length": CPU_TOKENS,
            "length": 512,
            "norm_first": True,
            "dropout": 0.0,
        }
        return [Target("training step >= 1.2x eager", "speedup", 1.2, where, baseline="eager")]
    where = {
        "device": "cuda",
        "dtype": "bfloat16",
        "mode": "train",
        "d_model": GPU_MODEL.d_model,
        "layers": GPU_MODEL.layers,
        "length": list(GPU_FULL_LENGTHS),
        "norm_first": True,
        "dropout": 0.0,
    }
    return [
        Target("training step >= 1.3x eager", "speedup", 1.3, where, baseline="eager"),
        Target(
            "training step >= 1.1x torch.compile",
            "speedup",
            1.1,
            where,
            baseline="torch.compile",
        ),
        Target(
            "peak training memory <= 0.6x eager",
            "peak_memory",
            1 / 0.6,
            {**where, "length": 4096},
            baseline="eager",
        ),
    ]


SUITE = Suite(
    name=OP,
    title="Transformer models (fastformer.nn.Transformer, Seq2SeqTransformer)",
    providers=PROVIDERS,
    cases=_cases,
    bench=_bench,
    targets=_targets,
    plot_x="length",
)
