"""fastformer.models.Seq2SeqTransformer: torch.nn.Transformer's maths, the same on every
backend, generate() with and without the KV cache, activation checkpointing, torch.compile,
autocast."""

from __future__ import annotations

import pytest
import torch

from fastformer.models import (
    BACKENDS,
    Seq2SeqConfig,
    Seq2SeqTransformer,
    active_backend,
    use_backend,
)
from fastformer.models import backend as model_backend
from tests.conftest import requires_extension

pytestmark = requires_extension

PAD, BOS, EOS = 0, 1, 2


def _config(**overrides) -> Seq2SeqConfig:
    # Odd sizes on purpose; a large init so that greedy decoding is not one repeated token.
    values = dict(
        vocab_size=11,
        d_model=24,
        n_heads=3,
        n_encoder_layers=2,
        n_decoder_layers=2,
        dim_feedforward=40,
        max_len=16,
        init_std=0.3,
    )
    values.update(overrides)
    return Seq2SeqConfig(**values)


def _model(seed: int = 0, **overrides) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(_config(**overrides))
    with torch.no_grad():  # non-trivial norms and biases too
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def _batch(batch: int = 3, src_len: int = 7, tgt_len: int = 6, seed: int = 1):
    """src with padded rows (one not padded at all); tgt starting with BOS."""
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 11, (batch, src_len), generator=generator)
    lengths = torch.tensor([src_len, 2, 5, 1, 4][:batch])
    src = src.masked_fill(torch.arange(src_len) >= lengths[:, None], PAD)
    tgt = torch.randint(3, 11, (batch, tgt_len), generator=generator)
    tgt[:, 0] = BOS
    return src, tgt


def _loss_and_grads(model: Seq2SeqTransformer, src, tgt) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = model.loss(src, tgt)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


# ----------------------------------------------------------------------------------------
# The maths: torch.nn.Transformer with the same weights, and every backend alike
# ----------------------------------------------------------------------------------------


def _torch_transformer(model: Seq2SeqTransformer) -> torch.nn.Transformer:
    """torch.nn.Transformer holding the model's weights."""
    config = model.config
    theirs = torch.nn.Transformer(
        config.d_model,
        config.n_heads,
        config.n_encoder_layers,
        config.n_decoder_layers,
        config.dim_feedforward,
        dropout=0.0,
        activation=config.activation,
        batch_first=True,
        norm_first=config.norm_first,
    )
    ours = model.state_dict()
    state = {"encoder.norm.weight": ours["encoder_norm.weight"]}
    state["encoder.norm.bias"] = ours["encoder_norm.bias"]
    state["decoder.norm.weight"] = ours["decoder_norm.weight"]
    state["decoder.norm.bias"] = ours["decoder_norm.bias"]
    for stack in ("encoder", "decoder"):
        for key in theirs.state_dict():
            if not key.startswith(f"{stack}.layers."):
                continue
            i, rest = key.split(".")[2], ".".join(key.split(".")[3:])
            prefix = f"{stack}.{i}."
            kind = rest.split(".")[-1].replace("in_proj_", "")  # weight or bias
            if rest.startswith("self_attn.in_proj"):
                state[key] = ours[f"{prefix}self_attn.qkv.{kind}"]
            elif rest.startswith("self_attn.out_proj"):
                state[key] = ours[f"{prefix}self_attn.out.{kind}"]
            elif rest.startswith("multihead_attn.in_proj"):
                q, kv = ours[f"{prefix}cross_attn.q.{kind}"], ours[f"{prefix}cross_attn.kv.{kind}"]
                state[key] = torch.cat([q, kv])
            elif rest.startswith("multihead_attn.out_proj"):
                state[key] = ours[f"{prefix}cross_attn.out.{kind}"]
            elif rest.startswith("linear"):
                state[key] = ours[f"{prefix}feed_forward.{rest}"]
            else:  # norm1, norm2, norm3
                state[key] = ours[prefix + rest]
    theirs.load_state_dict(state)
    return theirs


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_matches_torch_nn_transformer(norm_first):
    model = _model(norm_first=norm_first)
    theirs = _torch_transformer(model)
    src, tgt = _batch()
    padding = src == PAD
    causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
    out = theirs(
        model._embed(src, model.src_pos),
        model._embed(tgt, model.tgt_pos),
        tgt_mask=causal,
        src_key_padding_mask=padding,
        memory_key_padding_mask=padding,
    )
    expected = model.output_logits(out)
    torch.testing.assert_close(model(src, tgt), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_backends_give_the_same_outputs_and_gradients(norm_first, activation):
    model = _model(norm_first=norm_first, activation=activation)
    src, tgt = _batch()
    results = {}
    for name in BACKENDS:
        with use_backend(name):
            logits = model(src, tgt).detach()
            results[name] = [logits, *_loss_and_grads(model, src, tgt)]
    for name in ("torch", "fastformer"):
        for ours, reference in zip(results[name], results["reference"], strict=True):
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=2e-5)


def test_each_backend_runs_its_own_functions(monkeypatch):
    """The table really switches implementations: count the calls into each row's
    attention function."""
    calls: dict[str, int] = dict.fromkeys(BACKENDS, 0)

    def spy(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return counted

    monkeypatch.setattr(model_backend, "sdpa_op", spy("fastformer", model_backend.sdpa_op))
    monkeypatch.setattr(model_backend, "torch_sdpa", spy("torch", model_backend.torch_sdpa))
    monkeypatch.setattr(
        model_backend.reference,
        "scaled_dot_product_attention",
        spy("reference", model_backend.reference.scaled_dot_product_attention),
    )
    model = _model(n_encoder_layers=1, n_decoder_layers=1)
    src, tgt = _batch()
    attention_calls = 3  # encoder self, decoder self, decoder cross
    for name in BACKENDS:
        model.set_backend(name)
        model(src, tgt)
        assert calls == {n: attention_calls if n == name else 0 for n in BACKENDS}
        calls.update(dict.fromkeys(BACKENDS, 0))


def test_use_backend_overrides_every_model_and_nests():
    model = _model().set_backend("torch")
    assert active_backend(model.backend) == "torch"
    with use_backend("reference"):
        assert active_backend(model.backend) == "reference"
        with use_backend("fastformer"):
            assert active_backend(model.backend) == "fastformer"
        assert active_backend(model.backend) == "reference"
    assert active_backend(model.backend) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"), use_backend("triton"):
        pass
    with pytest.raises(ValueError, match="backend must be one of"):
        model.set_backend("cuda")


def test_output_projection_is_the_embedding():
    model = _model()
    src, tgt = _batch()
    model.loss(src, tgt).backward()
    names = [name for name, _ in model.named_parameters()]
    assert "embed.weight" in names and not any("lm_head" in name for name in names)
    hidden = torch.randn(2, model.config.d_model)
    torch.testing.assert_close(model.output_logits(hidden), hidden @ model.embed.weight.T)


def test_config_checks_and_round_trip():
    config = _config(dropout=0.1)
    assert Seq2SeqConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="divisible"):
        _config(d_model=25)
    with pytest.raises(ValueError, match="eos_id"):
        _config(eos_id=11)
    with pytest.raises(ValueError, match="unknown fields"):
        Seq2SeqConfig.from_dict({"d_modle": 8})
    with pytest.raises(ValueError, match="max_len"):
        _model()(*_batch(src_len=17))


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 0),
        ("vocab_size", 11.0),  # a float, even a whole one, is not a size
        ("d_model", 0),
        ("n_heads", 0),  # was a ZeroDivisionError
        ("n_heads", -3),
        ("n_encoder_layers", -1),
        ("n_decoder_layers", 0),  # generate() with the cache failed with an IndexError
        ("n_decoder_layers", True),
        ("dim_feedforward", 0),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("dropout", float("nan")),
        ("max_len", 0),
        ("norm_eps", 0.0),
        ("norm_eps", float("inf")),
        ("init_std", -0.1),
        ("pad_id", -1),
    ],
)
def test_config_rejects_each_bad_field_by_name(field, value):
    with pytest.raises(ValueError, match=f"Seq2SeqConfig: {field} must be"):
        _config(**{field: value})


def test_config_rejects_bad_activation_and_shared_token_ids():
    with pytest.raises(ValueError, match="activation must be one of"):
        _config(activation="nope")
    with pytest.raises(ValueError, match="pad_id, bos_id and eos_id must differ"):
        _config(eos_id=PAD)


def test_no_encoder_layers_decode_over_the_embeddings():
    """n_encoder_layers=0 is allowed (the decoder attends over the normed embeddings): it
    trains, and generates the same tokens with and without the cache."""
    model = _model(n_encoder_layers=0)
    src, tgt = _batch(batch=4)
    model.loss(src, tgt).backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    cached = model.generate(src, 10)
    torch.testing.assert_close(cached, model.generate(src, 10, use_cache=False), rtol=0, atol=0)
    assert len(set(cached.flatten().tolist())) > 3  # a non-trivial model


# ----------------------------------------------------------------------------------------
# generate() and the KV cache
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["fastformer", "torch"])
def test_greedy_generate_same_with_and_without_cache(backend):
    model = _model().set_backend(backend)
    src, _ = _batch(batch=5)
    cached = model.generate(src, 12)
    uncached = model.generate(src, 12, use_cache=False)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    assert len(set(cached.flatten().tolist())) > 3  # a non-trivial model
    # Each greedy token is the argmax of the teacher-forced logits of the prefix before it.
    bos = torch.full((src.shape[0], 1), BOS)
    logits = model.eval()(src, torch.cat([bos, cached[:, :-1]], dim=1))
    unfinished = torch.cumsum(cached == EOS, dim=1) - (cached == EOS).long() == 0
    torch.testing.assert_close(logits.argmax(-1)[unfinished], cached[unfinished])


@pytest.mark.parametrize("top_k", [None, 4])
def test_sampling_same_with_and_without_cache(top_k):
    model = _model()
    src, _ = _batch(batch=5)
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        options = dict(do_sample=True, temperature=1.5, top_k=top_k, use_cache=use_cache)
        samples.append(model.generate(src, 12, **options))
    torch.testing.assert_close(samples[0], samples[1], rtol=0, atol=0)
    torch.manual_seed(8)
    assert not torch.equal(model.generate(src, 12, do_sample=True, top_k=top_k), samples[0])
    generator = torch.Generator().manual_seed(3)
    again = torch.Generator().manual_seed(3)
    torch.testing.assert_close(
        model.generate(src, 12, do_sample=True, generator=generator),
        model.generate(src, 12, do_sample=True, generator=again, use_cache=False),
    )


def test_generated_rows_end_with_eos_then_padding():
    model = _model()
    src, _ = _batch(batch=5)
    torch.manual_seed(0)
    tokens = model.generate(src, 16, do_sample=True, temperature=2.0)
    for row in tokens.tolist():
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1 :])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(src, 17)


@pytest.mark.parametrize("do_sample", [True, False], ids=["sample", "greedy"])
@pytest.mark.parametrize(
    "argument, value",
    [
        ("temperature", float("nan")),  # was accepted: every token became padding
        ("temperature", float("inf")),
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("top_k", 0),  # was an internal tensor error
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", True),
        ("max_new_tokens", 0),
        ("max_new_tokens", 17),  # max_len is 16
        ("max_new_tokens", 4.0),
    ],
)
def test_generate_rejects_bad_arguments_by_name(argument, value, do_sample):
    model = _model()
    src, _ = _batch()
    options = {"max_new_tokens": 4, argument: value}
    with pytest.raises(ValueError, match=f"generate: {argument} must be"):
        model.generate(src, do_sample=do_sample, **options)


def test_top_k_of_the_vocabulary_or_more_keeps_every_token():
    model = _model()
    src, _ = _batch(batch=5)
    samples = []
    for top_k in (None, 11, 1000):  # vocab_size is 11
        generator = torch.Generator().manual_seed(4)
        samples.append(model.generate(src, 12, do_sample=True, top_k=top_k, generator=generator))
    torch.testing.assert_close(samples[1], samples[0], rtol=0, atol=0)
    torch.testing.assert_close(samples[2], samples[0], rtol=0, atol=0)
    greedy = model.generate(src, 12)  # top_k=1 samples the argmax
    torch.testing.assert_close(model.generate(src, 12, do_sample=True, top_k=1), greedy)


def test_cache_fed_several_tokens_at_a_time():
    """Prefill chunks of several tokens after cached ones (the bottom-right causal mask)."""
    model = _model().eval()
    src, tgt = _batch(tgt_len=9)
    with torch.no_grad():
        memory = model.encode(src)
        full = model.decode(tgt, memory, src)
        cache = model.make_cache(memory, capacity=9)
        chunks = [model.decode(part, None, src, cache) for part in tgt.split(4, dim=1)]
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="capacity"), torch.no_grad():
        model.decode(tgt[:, :1], None, src, cache)


# ----------------------------------------------------------------------------------------
# Training features: activation checkpointing, torch.compile, autocast
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["fastformer", "torch"])
def test_gradient_checkpointing_same_gradients_with_dropout(backend):
    """Recomputed layers redraw the same dropout masks: identical loss and gradients."""
    model = _model(dropout=0.2).set_backend(backend).train()
    src, tgt = _batch()
    results = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(11)
        results.append(_loss_and_grads(model, src, tgt))
    for plain, recomputed in zip(*results, strict=True):
        torch.testing.assert_close(recomputed, plain, rtol=1e-6, atol=1e-6)
    torch.manual_seed(12)  # and dropout is really on
    assert not torch.equal(_loss_and_grads(model, src, tgt)[0], results[0][0])


def test_torch_compile_fullgraph_same_loss_and_gradients():
    model = _model(n_encoder_layers=1, n_decoder_layers=1)
    src, tgt = _batch()
    torch._dynamo.reset()
    compiled = torch.compile(model.loss, fullgraph=True, backend="aot_eager")
    eager = _loss_and_grads(model, src, tgt)
    model.zero_grad(set_to_none=True)
    compiled(src, tgt).backward()
    loss = compiled(src, tgt).detach()
    grads = [p.grad for p in model.parameters()]
    for got, expected in zip([loss, *grads], eager, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["fastformer", "torch"])
def test_autocast_bfloat16_trains(backend):
    model = _model(init_std=0.05).set_backend(backend)
    src, tgt = _batch()
    full = model.loss(src, tgt).detach()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(src, tgt)
        loss = model.loss(src, tgt)
    assert logits.dtype == torch.bfloat16
    loss.backward()
    torch.testing.assert_close(loss.detach(), full, rtol=0.03, atol=0.03)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the cache takes the bfloat16 keys
        assert model.generate(src, 8).shape[0] == src.shape[0]
