"""generate() features through the latent cache: sampling, beam search, streaming, stopping, and the cache itself."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import load_pair
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from starkv_convert.evaluate import cache_nbytes, kv_cache_bytes_per_token


def test_sampling_is_seeded_and_equals_base(base_dir, converted, tokenizer):
    base, model = load_pair(base_dir("llama"), converted("llama", kv_ratio=1.0))
    inputs = tokenizer(["Once upon a time", "In the year"], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=24, do_sample=True, top_k=50, temperature=0.9)
    torch.manual_seed(7)
    a = model.generate(**inputs, **kwargs)
    torch.manual_seed(7)
    b = model.generate(**inputs, **kwargs)
    torch.manual_seed(7)
    expected = base.generate(**inputs, **kwargs)
    assert torch.equal(a, b)
    assert torch.equal(a, expected)


def test_beam_search_equals_base(family, base_dir, converted, tokenizer):
    base, model = load_pair(base_dir(family), converted(family, kv_ratio=1.0))
    inputs = tokenizer("The bridge over the river", return_tensors="pt")
    kwargs = dict(max_new_tokens=16, num_beams=3, num_return_sequences=2, do_sample=False, early_stopping=True)
    assert torch.equal(model.generate(**inputs, **kwargs), base.generate(**inputs, **kwargs))


def test_streaming_yields_every_token(converted, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(converted("llama", kv_ratio=0.5), trust_remote_code=True).eval()

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.chunks.append("end")

    streamer = Collect()
    inputs = tokenizer("Streaming works", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False, streamer=streamer)
    streamed = [t for chunk in streamer.chunks[1:-1] for t in chunk]
    assert streamer.chunks[0] == inputs["input_ids"][0].tolist() and streamer.chunks[-1] == "end"
    assert streamed == out[0, inputs["input_ids"].shape[1] :].tolist()


def test_max_new_tokens_and_eos_stop(converted, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(converted("llama", kv_ratio=0.5), trust_remote_code=True).eval()
    ids = tokenizer("Stop here", return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    first = out[0, ids.shape[1]].item()
    stopped = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, eos_token_id=first, pad_token_id=0)
    assert stopped.shape[1] == ids.shape[1] + 1


def test_half_budget_halves_measured_cache(family, base_dir, converted, tokenizer):
    base, model = load_pair(base_dir(family), converted(family, kv_ratio=0.5))
    ids = torch.randint(1, 300, (2, 50))
    base_bytes = kv_cache_bytes_per_token(base, ids)
    ours = kv_cache_bytes_per_token(model, ids)
    assert ours <= 0.5 * base_bytes * 1.01, (ours, base_bytes)
    assert ours >= 0.45 * base_bytes  # the budget is used, not wasted
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    assert cache_nbytes(cache) == ours * ids.numel()
    assert cache.get_seq_length() == 50


def test_generated_cache_grows_by_latents_only(converted, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(converted("llama", kv_ratio=0.5), trust_remote_code=True).eval()
    config = model.config
    out = model.generate(
        **tokenizer("Counting bytes", return_tensors="pt"),
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
    )
    cache = out.past_key_values
    tokens = out.sequences.shape[1] - 1  # the last generated token is never cached
    floats = sum(sum(k) + v for k, v in zip(config.kv_k_ranks, config.kv_v_ranks))
    assert cache.get_seq_length() == tokens
    assert cache_nbytes(cache) == tokens * (floats * 4 + 4)  # fp32 latents + one int32 position


def test_loads_without_starkv_installed(converted, tokenizer, tmp_path):
    """The checkpoint's remote code needs torch and transformers only: starkv_convert is made unimportable."""
    folder = converted("qwen2", kv_ratio=0.5)
    script = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("starkv_convert", "starkv_remote"):
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 8), out.shape
        assert type(model).__name__ == "StarKVForCausalLM"
        assert not any(m.startswith("starkv_convert") for m in sys.modules)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "PATH": "", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_assisted_decoding_crops_the_cache_correctly(family, converted, tokenizer):
    """Prompt-lookup decoding crops the cache after rejected drafts; it must give plain greedy's tokens."""
    model = AutoModelForCausalLM.from_pretrained(converted(family, kv_ratio=0.5), trust_remote_code=True).eval()
    prompt = "the river and the bridge and the river and the bridge and the river and"
    inputs = tokenizer(prompt, return_tensors="pt")
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    plain = model.generate(**inputs, **kwargs)
    assisted = model.generate(**inputs, prompt_lookup_num_tokens=3, **kwargs)
    assert torch.equal(plain, assisted)
