"""--kv-bits: the cache stores int8/int4 codes and scales (uint8 rows per token), attention reads them dequantized,
with or without a cache; bytes shrink as claimed and generate() works as before."""

import json

import pytest
import torch
from conftest import load_pair
from transformers import AutoModelForCausalLM

from starkv_convert.evaluate import cache_nbytes
from starkv_convert.remote_code import import_remote

quant = import_remote("latent_quant")


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.mark.parametrize("bits, align", [("8", None), ("4", None), ("mixed", None), ("mixed", 1)])
def test_cache_bytes_are_the_quantized_rows(converted, bits, align):
    folder = converted("qwen2", kv_ratio=0.5, kv_bits=bits, **({"kv_row_align": align} if align else {}))
    model = _load(folder)
    config = model.config
    assert config.kv_quant["align"] == (align or quant.ROW_ALIGN)
    expected = parts = 4  # the int32 position of each token
    for i in range(config.num_hidden_layers):
        k_n8, v_n8 = config.kv_quant["k_n8"][i], config.kv_quant["v_n8"][i]
        group, k_ranks, v_rank = config.kv_quant["group"], config.kv_k_ranks[i], config.kv_v_ranks[i]
        expected += quant.LatentCodec(k_ranks, k_n8, group, config.kv_quant["align"]).bytes_per_token
        expected += quant.LatentCodec([v_rank], [v_n8], group, config.kv_quant["align"]).bytes_per_token
        parts += sum(quant.quantized_bytes_per_token(r, a, group) for r, a in zip(k_ranks, k_n8))
        parts += quant.quantized_bytes_per_token(v_rank, v_n8, group)
    # the rows' alignment costs at most 3 bytes per block and 3 per row; compact rows at most 1 per row (the scales
    # are 2-byte aligned)
    rows = [k for k in config.kv_k_ranks if k is not None]
    assert parts <= expected <= parts + (3 * sum(len(k) + 3 for k in rows) if align is None else 2 * len(rows))
    ids = torch.randint(1, 300, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    assert cache_nbytes(cache) == expected * ids.numel()
    report = json.loads((folder / "starkv_report.json").read_text())
    assert report["kv_cache"]["bytes_per_token"]["starkv"] == expected
    unquantized = json.loads((converted("qwen2", kv_ratio=0.5) / "starkv_report.json").read_text())
    assert expected < 0.6 * unquantized["kv_cache"]["bytes_per_token"]["starkv"]  # fp32 latents here: > 4x less
    assert report["budget"]["kv_bits"] == bits and report["validation"]["passed"]


def test_eight_bits_stay_close_and_four_bits_cost_more(converted):
    ids = torch.randint(1, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = _load(converted("llama", kv_ratio=0.5))(input_ids=ids).logits
        int8 = _load(converted("llama", kv_ratio=0.5, kv_bits="8"))(input_ids=ids).logits
        int4 = _load(converted("llama", kv_ratio=0.5, kv_bits="4"))(input_ids=ids).logits
    err8, err4 = (int8 - exact).abs().max().item(), (int4 - exact).abs().max().item()
    assert 0 < err8 < 0.02 * exact.abs().max().item()
    assert err8 < err4


def test_cached_decode_equals_uncached_forward(converted):
    """Quantization happens where latents are made, so cache or no cache, attention reads the same latents."""
    model = _load(converted("mistral", kv_ratio=0.5, kv_bits="mixed"))
    ids = torch.randint(1, 300, (1, 36), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :28], use_cache=True)
        assert (out.logits - full[:, :28]).abs().max().item() <= 1e-4
        for t in range(28, 36):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            assert (out.logits[:, -1] - full[:, t]).abs().max().item() <= 1e-4


def test_generate_with_quantized_cache(base_dir, converted, tokenizer):
    _, model = load_pair(base_dir("llama"), converted("llama", kv_ratio=0.5, kv_bits="4"))
    tokenizer.padding_side = "left"
    prompts = ["A short one", "A much longer prompt about the river and the bridge"]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    batch = model.generate(**inputs, **kwargs)
    for row, prompt in enumerate(prompts):  # each row equals that prompt alone: quantization is per token
        alone = model.generate(**tokenizer([prompt], return_tensors="pt"), **kwargs)
        assert torch.equal(batch[row, -20:], alone[0, -20:])
    beams = model.generate(**inputs, max_new_tokens=8, num_beams=3, do_sample=False)
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=20)
    assert beams.shape[0] == sampled.shape[0] == 2


def _edited_copy(folder, tmp_path, edit):
    """A copy of a converted checkpoint whose config's kv_quant went through `edit`."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config["kv_quant"])
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda q: q["k_n8"][0].__setitem__(0, 10_000), "8-bit channels"),
        (lambda q: q.__setitem__("align", 3), "align 3 must"),
        (lambda q: q.__setitem__("align", 4.0), "align 4.0 must"),  # (4.0 == 4, but the rows need an integer)
        (lambda q: q.__setitem__("align", True), "align True must"),
    ],
)
def test_bad_split_in_config_is_refused(converted, tmp_path, edit, message):
    folder = _edited_copy(converted("llama", kv_ratio=0.5, kv_bits="mixed"), tmp_path, edit)
    with pytest.raises(ValueError, match=f"kv_quant.*{message}"):
        _load(folder)


def test_config_without_align_reads_compact_rows(converted, tmp_path):
    """A config from before kv_quant had "align" gets compact rows (what its card's bytes counted), not the default."""
    folder = _edited_copy(converted("llama", kv_ratio=0.5, kv_bits="mixed"), tmp_path, lambda q: q.pop("align"))
    model = _load(folder)
    codecs = [layer.self_attn.codecs for layer in model.model.layers if layer.self_attn.codecs is not None]
    assert codecs and all(codec.align == 1 for pair in codecs for codec in pair)
    ids = torch.randint(1, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        aligned = _load(converted("llama", kv_ratio=0.5, kv_bits="mixed"))(input_ids=ids).logits
        assert torch.allclose(model(input_ids=ids).logits, aligned, atol=1e-5)  # the layout changes, not the values
