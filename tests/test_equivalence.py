"""At --kv-ratio 1.0 a converted model computes what its base model computes: logits and generated tokens."""

import pytest
import torch
from conftest import load_pair

MAX_ABS = 1e-4


def _prompt(tokenizer, text: str = "The history of the city begins with"):
    return tokenizer(text, return_tensors="pt")


def test_prefill_logits_equal_base(family, base_dir, converted, tokenizer):
    base, model = load_pair(base_dir(family), converted(family, kv_ratio=1.0))
    ids = torch.randint(1, tokenizer.vocab_size, (2, 57), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = base(input_ids=ids).logits, model(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= MAX_ABS


def test_decode_steps_equal_base(family, base_dir, converted):
    """Logits of single-token steps through the latent cache (the decode path) match the base model's."""
    base, model = load_pair(base_dir(family), converted(family, kv_ratio=1.0))
    ids = torch.randint(1, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = base(input_ids=ids).logits
        out = model(input_ids=ids[:, :30], use_cache=True)
        cache = out.past_key_values
        assert type(cache).__name__ == "StarKVCache"
        for t in range(30, 40):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            assert (out.logits[:, -1] - full[:, t]).abs().max().item() <= MAX_ABS


def test_greedy_tokens_equal_base(family, base_dir, converted, tokenizer):
    base, model = load_pair(base_dir(family), converted(family, kv_ratio=1.0))
    inputs = _prompt(tokenizer)
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    expected = base.generate(**inputs, **kwargs)
    got = model.generate(**inputs, **kwargs)
    assert got.shape[1] == inputs["input_ids"].shape[1] + 32
    assert torch.equal(got, expected)


def test_left_padded_batch_equals_base(family, base_dir, converted, tokenizer):
    base, model = load_pair(base_dir(family), converted(family, kv_ratio=1.0))
    tokenizer.padding_side = "left"
    inputs = tokenizer(
        ["A short one", "A much longer prompt about the river and the bridge"], return_tensors="pt", padding=True
    )
    assert (inputs["attention_mask"][0] == 0).any()
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    expected = base.generate(**inputs, **kwargs)
    got = model.generate(**inputs, **kwargs)
    assert torch.equal(got, expected)
    # each row also equals that prompt generated alone
    alone = model.generate(**tokenizer(["A short one"], return_tensors="pt"), **kwargs)
    assert torch.equal(got[0, -32:], alone[0, -32:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_base(base_dir, converted, tokenizer, dtype):
    from transformers import AutoModelForCausalLM

    folder = converted("llama", kv_ratio=1.0)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir("llama"), dtype=dtype).eval()
    ids = _prompt(tokenizer)["input_ids"]
    with torch.no_grad():
        got, expected = model(input_ids=ids).logits.float(), base(input_ids=ids).logits.float()
    assert got.dtype == torch.float32 and model.dtype == dtype
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max().item() <= 0.05 * expected.abs().max().item()
    out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8


def test_plain_svd_init_at_full_rank_equals_base(base_dir, converted):
    """--init svd (no whitening, no calibration statistics) is exact at full rank too."""
    base, model = load_pair(base_dir("qwen2"), converted("qwen2", kv_ratio=1.0, init="svd"))
    ids = torch.randint(1, 300, (1, 33), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max().item() <= MAX_ABS
