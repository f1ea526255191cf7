"""attn_implementation="fastformer" in Hugging Face transformers 5.x against "eager".

Tiny models built from configs (nothing downloaded), each built once and switched between
implementations with set_attn_implementation, so both run the same weights: logits agree on
the positions the attention mask keeps (padding rows may differ: eager gives a fully masked
row uniform weights, SDPA zeros), greedy generate() gives the same tokens, and a spy checks
that fastformer's attention really ran. On CPU both fastformer paths run: its C++ CPU kernels
and the Triton kernel through the interpreter; on a GPU, the Triton kernel.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import fastformer
from fastformer import backend
from fastformer.integrations import transformers as integration
from tests.conftest import HAS_CUDA, HAS_INTERPRETER

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers not installed")

# The kernel's float32 multiply of T5's masked entries (the dtype's minimum) by log2(e)
# overflows, which numpy reports under the interpreter; the kernel clamps the result back.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")

DEVICE = "cuda" if HAS_CUDA else "cpu"
# fastformer's attention path: the Triton kernel (natively on a GPU, else through the
# interpreter), and on CPU also the C++ kernels, fastformer's CPU default.
PATHS = ["triton"] if HAS_CUDA else ["c++"] + (["triton"] if HAS_INTERPRETER else [])
# fp32 logits: the same maths in another order (a GPU's eager matmuls may use other kernels).
ATOL = 1e-4 if HAS_CUDA else 1e-5
VOCAB, PAD = 100, 0


@pytest.fixture(scope="module", autouse=True)
def enabled():
    fastformer.enable_transformers()


@pytest.fixture(params=PATHS)
def path(request, use_implementation):
    use_implementation(DEVICE, request.param)
    return request.param


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[dict]:
    """Records the arguments of each fastformer.scaled_dot_product_attention call the
    integration makes."""
    calls: list[dict] = []
    real = integration.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        calls.append({"query": query.shape, "key": key.shape, **kwargs})
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(integration, "scaled_dot_product_attention", spy)
    return calls


def _build(config_class, model_class, **config):
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=VOCAB, pad_token_id=PAD, **config))
    return model.to(DEVICE).eval()


_MODELS: dict[str, torch.nn.Module] = {}


def model(name: str) -> torch.nn.Module:
    """Built once per session: hidden 64, 2 layers, 4 heads of 16 (the kernels' minimum)."""
    if name not in _MODELS:
        t = transformers
        llama_like = dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        )
        _MODELS[name] = {
            "bert": lambda: _build(
                t.BertConfig, t.BertForMaskedLM, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
            ),
            "gpt2": lambda: _build(
                t.GPT2Config, t.GPT2LMHeadModel, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                bos_token_id=1, eos_token_id=2,
            ),
            "llama-gqa": lambda: _build(
                t.LlamaConfig, t.LlamaForCausalLM, num_key_value_heads=2, **llama_like
            ),
            "qwen2-mqa": lambda: _build(
                t.Qwen2Config, t.Qwen2ForCausalLM, num_key_value_heads=1, **llama_like
            ),
            # Scores of this random model are about 0.1: a cap of 0.05 bends them.
            "gemma2-softcap": lambda: _build(
                t.Gemma2Config, t.Gemma2ForCausalLM, num_key_value_heads=2, head_dim=16,
                attn_logit_softcapping=0.05, sliding_window=4, query_pre_attn_scalar=16,
                **llama_like,
            ),
            "mistral-sliding": lambda: _build(
                t.MistralConfig, t.MistralForCausalLM, num_key_value_heads=2, sliding_window=4,
                **llama_like,
            ),
            "bart": lambda: _build(
                t.BartConfig, t.BartForConditionalGeneration, d_model=64, encoder_layers=2,
                decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
            ),
            "t5": lambda: _build(
                t.T5Config, t.T5ForConditionalGeneration, d_model=64, d_kv=16, d_ff=128,
                num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                dropout_rate=0.0, decoder_start_token_id=PAD, eos_token_id=1,
            ),
        }[name]()  # fmt: skip
    return _MODELS[name]


def _batch(length: int = 11, pad: int = 4, left: bool = False, seed: int = 1):
    """(input_ids, attention_mask) of 3 rows: full, padded by `pad`, padded by 1."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, length), generator=generator)
    mask = torch.ones_like(ids)
    for row, count in ((1, pad), (2, 1)):
        if left:
            mask[row, :count] = 0
        else:
            mask[row, length - count :] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    return ids.to(DEVICE), mask.to(DEVICE)


def _cases(names: list[str], on_every_path: list[str]) -> list:
    """(name, path) pairs: every model on the first path, some also on the others (the
    interpreter is slow, above all for generate()'s many steps)."""
    return [
        pytest.param(name, path_name, id=f"{path_name}-{name}")
        for path_name in PATHS
        for name in names
        if path_name == PATHS[0] or name in on_every_path
    ]


@torch.no_grad()
def _logits(net: torch.nn.Module, implementation: str, **inputs) -> torch.Tensor:
    net.set_attn_implementation(implementation)
    return net(**inputs).logits


def _assert_close(fast: torch.Tensor, ref: torch.Tensor, keep: torch.Tensor | None = None):
    assert fast.shape == ref.shape
    if keep is not None:
        fast, ref = fast[keep.bool()], ref[keep.bool()]
    error = (fast - ref).abs().max().item()
    assert error <= ATOL, f"max|fastformer - eager| = {error:.3e} > {ATOL:.0e}"


def _assert_same_generation(net: torch.nn.Module, new_tokens: int = 3, **inputs) -> None:
    tokens = {}
    for implementation in ("eager", "fastformer"):
        net.set_attn_implementation(implementation)
        tokens[implementation] = net.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    assert torch.equal(tokens["fastformer"], tokens["eager"]), tokens


# ----------------------------------------------------------------------------------------
# Logits and generate() against eager
# ----------------------------------------------------------------------------------------


def test_bert_padded(path, sdpa_calls):
    ids, mask = _batch()
    ref = _logits(model("bert"), "eager", input_ids=ids, attention_mask=mask)
    fast = _logits(model("bert"), "fastformer", input_ids=ids, attention_mask=mask)
    _assert_close(fast, ref, keep=mask)
    assert len(sdpa_calls) == 2  # one per layer
    assert sdpa_calls[0]["attn_mask"].dtype == torch.bool and not sdpa_calls[0]["is_causal"]


def test_bert_unpadded_needs_no_mask(sdpa_calls):
    ids, _ = _batch()
    ref = _logits(model("bert"), "eager", input_ids=ids)
    fast = _logits(model("bert"), "fastformer", input_ids=ids)
    _assert_close(fast, ref)
    assert all(c["attn_mask"] is None and not c["is_causal"] for c in sdpa_calls)


@pytest.mark.parametrize(
    ("name", "path"),
    _cases(["gpt2", "llama-gqa", "qwen2-mqa"], ["gpt2", "llama-gqa"]),
    indirect=["path"],
)
def test_decoder_left_padded(name, path, sdpa_calls):
    ids, mask = _batch(left=True)
    ref = _logits(model(name), "eager", input_ids=ids, attention_mask=mask)
    fast = _logits(model(name), "fastformer", input_ids=ids, attention_mask=mask)
    _assert_close(fast, ref, keep=mask)
    heads = model(name).config.num_attention_heads
    kv_heads = getattr(model(name).config, "num_key_value_heads", heads)
    call = sdpa_calls[0]
    # Grouped key/value heads go in as they are: enable_gqa, no repeat_kv.
    assert call["key"][1] == kv_heads and call["enable_gqa"] == (kv_heads != heads)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_decoder_unpadded_runs_is_causal(name, sdpa_calls):
    ids, _ = _batch()
    ref = _logits(model(name), "eager", input_ids=ids)
    fast = _logits(model(name), "fastformer", input_ids=ids)
    _assert_close(fast, ref)
    assert all(c["attn_mask"] is None and c["is_causal"] for c in sdpa_calls)


@pytest.mark.parametrize(
    ("name", "path"), _cases(["gpt2", "llama-gqa"], ["llama-gqa"]), indirect=["path"]
)
def test_decoder_generate(name, path):
    ids, mask = _batch(length=7, pad=3, left=True)
    _assert_same_generation(model(name), input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("path", PATHS[:1], indirect=True)
def test_gemma2_softcap_padded_and_generate(path):
    """Gemma 2's logit soft-capping runs in the kernels (no eager fallback), with its
    alternating sliding-window layers: logits on a padded batch and greedy tokens as eager's."""
    ids, mask = _batch(left=True)
    before = backend.fallback_counts[integration.FALLBACK_OP]
    ref = _logits(model("gemma2-softcap"), "eager", input_ids=ids, attention_mask=mask)
    fast = _logits(model("gemma2-softcap"), "fastformer", input_ids=ids, attention_mask=mask)
    _assert_close(fast, ref, keep=mask)
    _assert_same_generation(model("gemma2-softcap"), input_ids=ids, attention_mask=mask)
    assert backend.fallback_counts[integration.FALLBACK_OP] == before


def test_sliding_window_padded(sdpa_calls):
    """Mistral's sliding window arrives inside the boolean mask transformers builds."""
    ids, mask = _batch(left=True)
    ref = _logits(model("mistral-sliding"), "eager", input_ids=ids, attention_mask=mask)
    fast = _logits(model("mistral-sliding"), "fastformer", input_ids=ids, attention_mask=mask)
    _assert_close(fast, ref, keep=mask)
    assert sdpa_calls and all(c["attn_mask"].dtype == torch.bool for c in sdpa_calls)


def test_static_cache_generate(sdpa_calls):
    """A static cache: the prefill's keys outnumber its queries (is_causal, upper left)."""
    ids, _ = _batch(length=7)
    tokens = {}
    for implementation in ("eager", "fastformer"):
        model("llama-gqa").set_attn_implementation(implementation)
        tokens[implementation] = model("llama-gqa").generate(
            input_ids=ids[:1], max_new_tokens=3, min_new_tokens=3, do_sample=False,
            cache_implementation="static",
        )  # fmt: skip
    assert torch.equal(tokens["fastformer"], tokens["eager"]), tokens
    assert any(c["is_causal"] and c["key"][2] > c["query"][2] for c in sdpa_calls)


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_encoder_decoder_padded(name, path, sdpa_calls):
    ids, mask = _batch()
    decoder_ids, decoder_mask = _batch(length=6, pad=2, seed=2)
    inputs = dict(
        input_ids=ids,
        attention_mask=mask,
        decoder_input_ids=decoder_ids,
        decoder_attention_mask=decoder_mask,
    )
    ref = _logits(model(name), "eager", **inputs)
    fast = _logits(model(name), "fastformer", **inputs)
    _assert_close(fast, ref, keep=decoder_mask)
    assert len(sdpa_calls) == 6  # encoder self, decoder self and cross attention, 2 layers each
    if name == "t5":  # the relative position bias arrives merged into a float mask
        assert all(c["attn_mask"].is_floating_point() for c in sdpa_calls)


@pytest.mark.parametrize(("name", "path"), _cases(["bart", "t5"], []), indirect=["path"])
def test_encoder_decoder_generate(name, path):
    ids, mask = _batch(length=7, pad=3)
    _assert_same_generation(model(name), input_ids=ids, attention_mask=mask)


def test_built_with_attn_implementation(sdpa_calls):
    config = copy.deepcopy(model("llama-gqa").config)
    net = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="fastformer")
    assert net.config._attn_implementation == "fastformer"
    net.load_state_dict(model("llama-gqa").state_dict())
    ids, mask = _batch(left=True)
    with torch.no_grad():
        fast = net.to(DEVICE).eval()(input_ids=ids, attention_mask=mask).logits
    ref = _logits(model("llama-gqa"), "eager", input_ids=ids, attention_mask=mask)
    _assert_close(fast, ref, keep=mask)
    assert sdpa_calls


# ----------------------------------------------------------------------------------------
# Training: gradients, dropout
# ----------------------------------------------------------------------------------------


def _grads(net, implementation: str, keep: torch.Tensor | None = None, **inputs) -> dict:
    """Gradients of the projections for a loss on the kept positions (a fully masked padding
    row differs between eager and SDPA, so its logits must not reach the loss)."""
    net.set_attn_implementation(implementation)
    net.zero_grad()
    logits = net(**inputs).logits
    logits = logits if keep is None else logits[keep.bool()]
    logits.square().mean().backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if "proj" in n}


def test_llama_gqa_gradients(path):
    net = model("llama-gqa").train()  # attention_dropout is 0: deterministic
    ids, mask = _batch(left=True)
    try:
        ref = _grads(net, "eager", mask, input_ids=ids, attention_mask=mask)
        fast = _grads(net, "fastformer", mask, input_ids=ids, attention_mask=mask)
    finally:
        net.eval().zero_grad()
    for name in ref:
        _assert_close(fast[name], ref[name])


def test_dropout_only_in_training(sdpa_calls):
    net = model("bert")
    net.set_attn_implementation("fastformer")
    ids, mask = _batch()
    try:
        net.train()(input_ids=ids, attention_mask=mask)
    finally:
        net.eval()
    net(input_ids=ids, attention_mask=mask)
    probability = net.config.attention_probs_dropout_prob
    assert [c["dropout_p"] for c in sdpa_calls] == [probability] * 2 + [0.0] * 2


# ----------------------------------------------------------------------------------------
# Fallbacks, registration
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-gqa", "t5"])
def test_output_attentions_falls_back_to_eager(name, sdpa_calls, monkeypatch):
    monkeypatch.setattr(backend, "_warned", set())  # note_fallback warns once per process
    net = model(name)
    ids, mask = _batch(left=name != "t5")
    inputs = dict(input_ids=ids, attention_mask=mask, output_attentions=True)
    if name == "t5":
        inputs["decoder_input_ids"] = ids[:, :5]
    with torch.no_grad():
        net.set_attn_implementation("eager")
        ref = net(**inputs)
        net.set_attn_implementation("fastformer")
        before = backend.fallback_counts[integration.FALLBACK_OP]
        with pytest.warns(UserWarning, match="output_attentions=True needs the attention"):
            fast = net(**inputs)
    layers = 2 if name == "llama-gqa" else 6
    assert backend.fallback_counts[integration.FALLBACK_OP] == before + layers
    assert fastformer.info()["fallback_calls"][integration.FALLBACK_OP] == before + layers
    assert not sdpa_calls
    _assert_close(fast.logits, ref.logits, keep=mask if name != "t5" else None)
    weights = fast.attentions if name == "llama-gqa" else fast.encoder_attentions
    ref_weights = ref.attentions if name == "llama-gqa" else ref.encoder_attentions
    for got, want in zip(weights, ref_weights, strict=True):
        _assert_close(got, want, keep=mask[:, None, :, None].expand_as(got))


def test_generic_eager_attention_with_softcap():
    """A module without an eager_attention_forward of its own gets the generic one (here for
    output_attentions), soft-capping included; without output_attentions the same call runs
    fastformer's kernels, nothing falling back."""
    query, key, value = (torch.randn(2, 4, 5, 16) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = True
    before = backend.fallback_counts[integration.FALLBACK_OP]
    arguments = dict(scaling=0.25, softcap=5.0)
    out, weights = integration.attention_forward(
        module, query, key[:, :2], value[:, :2], None, output_attentions=True, **arguments
    )
    assert backend.fallback_counts[integration.FALLBACK_OP] == before + 1
    kernel_out, no_weights = integration.attention_forward(
        module, query, key[:, :2], value[:, :2], None, **arguments
    )
    assert no_weights is None
    assert backend.fallback_counts[integration.FALLBACK_OP] == before + 1
    torch.testing.assert_close(kernel_out, out, atol=1e-5, rtol=1e-5)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    # Grouped heads: query heads 0, 1 read key/value head 0, heads 2, 3 head 1.
    ref_weights = (
        torch.tanh(query @ key[:, :2].repeat_interleave(2, 1).transpose(-2, -1) * 0.25 / 5.0) * 5.0
    )
    ref_weights = ref_weights.masked_fill(~causal, float("-inf")).softmax(-1)
    ref = (ref_weights @ value[:, :2].repeat_interleave(2, 1)).transpose(1, 2)
    torch.testing.assert_close(weights, ref_weights)
    torch.testing.assert_close(out, ref)


def test_t5_training_position_bias(path):
    """In training T5's position bias requires grad: fastformer's kernels do not take such a
    mask, so fastformer hands those calls to torch's function, counted; gradients match
    eager."""
    net = model("t5").train()  # built with dropout_rate 0: deterministic
    ids, mask = _batch()
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5])
    before = backend.fallback_counts["scaled_dot_product_attention"]
    try:
        ref = _grads(net, "eager", **inputs)
        fast = _grads(net, "fastformer", **inputs)
    finally:
        net.eval().zero_grad()
    for name in ref:
        _assert_close(fast[name], ref[name])
    fell_back = backend.fallback_counts["scaled_dot_product_attention"] - before
    # The 4 self-attention calls carry the learned bias; cross-attention's bias is zeros.
    assert fell_back == 4


def test_enable_is_idempotent():
    fastformer.enable_transformers()
    fastformer.enable_transformers()
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    assert AttentionInterface._global_mapping["fastformer"] is integration.attention_forward
    assert AttentionMaskInterface._global_mapping["fastformer"] is sdpa_mask


def test_missing_transformers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'transformers>=5,<6'"):
        fastformer.enable_transformers()
