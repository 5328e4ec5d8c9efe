"""Chunked prefill (generate's `prefill_chunk_size`) through the latent cache: the same logits and tokens."""

import functools
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

PROMPTS = ["Short", "A much longer prompt that needs several chunks of prefill before decoding, " * 2]


def _generate(model, inputs, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True,
        return_dict_in_generate=True, **kwargs,
    )  # fmt: skip


def _forward_shapes(model) -> list[tuple[int, int]]:
    """Records (input tokens, logit positions) of every forward of `model`."""
    shapes, forward = [], model.forward

    @functools.wraps(forward)  # generate() reads the signature (logits_to_keep)
    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        shapes.append((kwargs["input_ids"].shape[1], out.logits.shape[1]))
        return out

    model.forward = recording
    return shapes


@pytest.mark.parametrize("family, bits", [("llama3", "16"), ("mistral", "16"), ("qwen3", "16"), ("qwen2", "mixed")])
def test_chunked_prefill_equals_one_shot(family, bits, converted, tokenizer):
    """
    Left-padded batch, chunks of 5 tokens (smaller than the padding; mistral's prompt is longer than its sliding
    window): the same greedy tokens and logits within 1e-5; every prefill chunk computes one position's logits only.
    """
    folder = converted(family, kv_ratio=0.5, kv_bits=bits)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert model.generation_config.prefill_chunk_size == 2048  # the checkpoint's default
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    length = inputs["input_ids"].shape[1]
    assert length > 30 and not inputs["attention_mask"][0, :5].any()
    one_shot = _generate(model, inputs, prefill_chunk_size=None)
    shapes = _forward_shapes(model)
    chunked = _generate(model, inputs, prefill_chunk_size=5)
    chunks = -(-length // 5)
    assert shapes[:chunks] == [(5, 1)] * (chunks - 1) + [(length - 5 * (chunks - 1), 1)]
    assert shapes[chunks:] == [(1, 1)] * 9
    assert torch.equal(one_shot.sequences, chunked.sequences)
    for a, b in zip(one_shot.logits, chunked.logits):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("family, bits", [("llama3", "16"), ("mistral", "16"), ("qwen2", "mixed")])
def test_static_cache_equals_dynamic(family, bits, converted, tokenizer, record_caches):
    """cache_implementation="static": a preallocated latent cache gives the dynamic cache's tokens and logits."""
    folder = converted(family, kv_ratio=0.5, kv_bits=bits)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    dynamic = _generate(model, inputs)
    caches = record_caches(model)
    static = _generate(model, inputs, cache_implementation="static")
    assert (
        type(caches[0]).__name__ == "StarKVStaticCache" and caches[0].max_cache_len >= inputs["input_ids"].shape[1] + 9
    )
    assert type(caches[0].layers[0]).__name__ == "StaticLatentLayer"  # preallocated latent slots
    assert caches[0].layers[0].keys.shape[-2] == caches[0].max_cache_len == caches[0].positions.shape[1]
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.logits, static.logits):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize(
    "family, bits, attention, cache",
    [
        ("llama3", "16", "sdpa", "dynamic"),
        ("mistral", "16", "sdpa", "dynamic"),
        ("qwen2", "mixed", "sdpa", "dynamic"),
        ("llama3", "16", "eager", "dynamic"),
        ("mistral", "16", "sdpa", "static"),
    ],
)
def test_sliced_prefill_equals_whole_batch(family, bits, attention, cache, converted, tokenizer, monkeypatch):
    """
    With PREFILL_REBUILD_BYTES tiny, every prefill chunk rebuilds keys and values one sequence at a time (sdpa's bool
    or eager's float mask sliced with them): the same greedy tokens and logits as with the whole batch at once.
    """
    folder = converted(family, kv_ratio=0.5, kv_bits=bits)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation=attention).eval()
    module = sys.modules[type(model).__module__]
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(prefill_chunk_size=5, cache_implementation="static" if cache == "static" else None)

    calls = []  # (compressed layer, batch, query length) of every call of the attention interface
    attend = type(model.model.layers[0].self_attn)._attend

    def recording(self, query, *args, **kw):
        calls.append((self.is_compressed, query.shape[0], query.shape[2]))
        return attend(self, query, *args, **kw)

    monkeypatch.setattr(type(model.model.layers[0].self_attn), "_attend", recording)
    whole = _generate(model, inputs, **kwargs)
    whole_calls, calls[:] = list(calls), []
    monkeypatch.setattr(module, "PREFILL_REBUILD_BYTES", 1)
    sliced = _generate(model, inputs, **kwargs)

    compressed = sum(layer.self_attn.is_compressed for layer in model.model.layers)
    chunks = -(-inputs["input_ids"].shape[1] // 5)
    assert compressed > 0
    assert [c[1] for c in whole_calls if c[0]] == [2] * compressed * chunks  # decode steps do not call it
    assert [c[1] for c in calls if c[0]] == [1] * 2 * compressed * chunks
    assert torch.equal(whole.sequences, sliced.sequences)
    for a, b in zip(whole.logits, sliced.logits):
        assert (a - b).abs().max() < 1e-5
    if attention == "eager":  # attention weights of the slices, concatenated
        monkeypatch.setattr(module, "PREFILL_REBUILD_BYTES", 1 << 30)
        expected = model(**inputs, output_attentions=True).attentions
        monkeypatch.setattr(module, "PREFILL_REBUILD_BYTES", 1)
        got = model(**inputs, output_attentions=True).attentions
        assert all(a.shape == b.shape and (a - b).abs().max() < 1e-6 for a, b in zip(expected, got))


def test_static_generate_allocates_no_full_cache(converted, tokenizer, monkeypatch):
    """
    generate(cache_implementation="static") with chunked prefill: transformers' StaticCache, which the model replaces
    with its StarKVStaticCache, is not allocated first (at full keys and values it would not fit where latents do).
    """
    from transformers.cache_utils import Cache

    folder = converted("llama3", kv_ratio=0.5, kv_bits="16")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    early = []
    initialize = Cache.early_initialization
    monkeypatch.setattr(
        Cache, "early_initialization", lambda self, *a, **k: early.append(self) or initialize(self, *a, **k)
    )
    inputs = tokenizer(PROMPTS[1:], return_tensors="pt")
    out = _generate(model, inputs, prefill_chunk_size=5, cache_implementation="static")
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 10
    assert early == []


def test_compiled_static_generation_traces_whole_graphs(converted, tokenizer):
    """
    generate() compiles the forward over a static latent cache (prefill chunks and decode steps): no graph break (a
    branch on the cache's length, a tensor, was one), no recompilation per chunk, and the eager tokens. Compiled with
    dynamo's eager backend on the CPU, which traces and guards as inductor would.
    """
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    folder = converted("llama3", kv_ratio=0.5)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    chunks = -(-inputs["input_ids"].shape[1] // 5)
    eager = _generate(model, inputs, cache_implementation="static", prefill_chunk_size=5)
    config = CompileConfig(backend="eager", mode=None)
    config._compile_all_devices = True  # transformers compiles on CUDA only otherwise
    torch._dynamo.reset()
    counters.clear()
    compiled = _generate(model, inputs, cache_implementation="static", prefill_chunk_size=5, compile_config=config)
    assert not counters["graph_break"], list(counters["graph_break"])[:1]
    graphs = counters["stats"]["unique_graphs"]
    assert 1 < graphs <= 4 < chunks  # first chunk, later chunks, the shorter last one, decode steps
    assert torch.equal(eager.sequences, compiled.sequences)
    torch._dynamo.reset()


def test_compiled_static_generation_keeps_the_kernel_rope_tables(converted, tokenizer, monkeypatch, record_caches):
    """
    The cache's RoPE-table bookkeeping for the decode kernel, compiled (prefill chunks and decode steps): no graph
    break, and the kept tables are those of the cache's positions. The kernel itself, which dynamo cannot trace under
    the Triton interpreter, is replaced by its PyTorch reference.
    """
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    folder = converted("llama3", kv_ratio=0.5)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float16).eval()
    modeling = sys.modules[type(model).__module__]
    kernels = sys.modules[modeling.__name__.rsplit(".", 1)[0] + ".latent_decode"]
    monkeypatch.setattr(modeling, "latent_decode_attention", lambda *a, **_: kernels.latent_decode_reference(*a))
    monkeypatch.setenv("STARKV_DECODE_KERNEL", "triton")
    caches = record_caches(model)
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    config = CompileConfig(backend="eager", mode=None)
    config._compile_all_devices = True
    torch._dynamo.reset()
    counters.clear()
    _generate(model, inputs, cache_implementation="static", prefill_chunk_size=5, compile_config=config)
    assert not counters["graph_break"], list(counters["graph_break"])[:1]
    cache, rotary = caches[0], model.model.rotary_emb
    made = kernels.rope_tables(cache.positions, rotary.inv_freq, rotary.attention_scaling, torch.float16)
    assert all(torch.equal(kept, expected) for kept, expected in zip(cache.rope_tables, made))
    torch._dynamo.reset()
