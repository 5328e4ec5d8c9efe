"""Shared fixtures: a tiny offline tokenizer, tiny random models of every supported family, converted checkpoints."""

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter; set before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n: the cores shared out among the workers
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STARKV_TEST_TEXT", ROOT.parent / "shared" / "data" / "wikitext2-test.txt"))
TINY_VOCAB = 384

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import FAMILIES, make_base_model  # noqa: E402


class Guards:
    """
    Guard zones around tensors, and the kernel accesses that touch them: `guards(tensor)` returns a copy of `tensor`
    inside a buffer with `size` guard bytes on each side (the copy keeps 64-byte alignment); `hits` lists (zone,
    offset in the zone) for every active lane of a kernel load or store that reached a zone.
    """

    def __init__(self, size: int = 64):
        self.size, self.zones, self.hits = size, [], []

    def __call__(self, tensor: torch.Tensor, name: str = "tensor") -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        buffer = torch.zeros(nbytes + 2 * self.size, dtype=torch.uint8, device=tensor.device)
        copy = buffer[self.size : self.size + nbytes].view(tensor.dtype).view(tensor.shape)
        copy.copy_(tensor)
        start = copy.data_ptr()
        self.zones += [
            (f"before {name}", start - self.size, start),
            (f"after {name}", start + nbytes, start + nbytes + self.size),
        ]
        return copy

    def record(self, addresses, mask) -> None:
        import numpy as np

        addresses = np.asarray(addresses)
        active = addresses[np.broadcast_to(np.asarray(mask, dtype=bool), addresses.shape)]
        for name, lo, hi in self.zones:
            self.hits += [(name, int(a) - lo) for a in active[(active >= lo) & (active < hi)][:4]]


@pytest.fixture
def guards(monkeypatch) -> Guards:
    """
    Under TRITON_INTERPRET (CPU): every masked load and store of the kernels is traced against guard zones. On a GPU
    an access outside a tensor is out of bounds even where a mask later discards its value; the interpreter would not
    notice it otherwise.
    """
    if torch.cuda.is_available():
        pytest.skip("accesses are traced under TRITON_INTERPRET only")
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if not all(hasattr(builder, f"create_masked_{op}") for op in ("load", "store")):
        pytest.skip("this triton's interpreter has no create_masked_load/store to trace")
    guards = Guards()
    load, store = builder.create_masked_load, builder.create_masked_store

    def traced_load(self, ptrs, mask, *args, **kwargs):  # (also what TMA descriptor loads become)
        guards.record(ptrs.data, mask.data)
        return load(self, ptrs, mask, *args, **kwargs)

    def traced_store(self, ptrs, value, mask, *args, **kwargs):
        guards.record(ptrs.data, mask.data)
        return store(self, ptrs, value, mask, *args, **kwargs)

    monkeypatch.setattr(builder, "create_masked_load", traced_load)
    monkeypatch.setattr(builder, "create_masked_store", traced_store)
    return guards


@pytest.fixture(scope="session")
def record_caches() -> Callable[[torch.nn.Module], list]:
    """Makes `model.generate()` append each cache it prepares to the list returned (to inspect it afterwards)."""

    def record(model: torch.nn.Module) -> list:
        caches, prepare = [], model._prepare_cache_for_generation

        def recording(generation_config, model_kwargs, *args, **kwargs):
            prepare(generation_config, model_kwargs, *args, **kwargs)
            caches.append(model_kwargs.get("past_key_values", model_kwargs.get("cache")))  # (renamed in 5.24)

        model._prepare_cache_for_generation = recording
        return caches

    return record


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small real-text .txt file (the first lines of WikiText-2 test)."""
    if not SHARED_DATA.is_file():
        pytest.fail(f"{SHARED_DATA} not found: put ../shared beside the repository or set STARKV_TEST_TEXT to a copy")
    lines = [line for line in SHARED_DATA.read_text().splitlines() if line.strip()][:160]
    path = tmp_path_factory.mktemp("corpus") / "calib.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer(corpus):
    """A byte-level BPE tokenizer trained on the corpus: offline and instant."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(corpus)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tokenizer) -> Callable[[str], Path]:
    """family -> folder with a tiny random base model of that family and the tiny tokenizer (built once)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            folder = tmp_path_factory.mktemp(f"base-{family}")
            model = make_base_model(family, TINY_VOCAB)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            built[family] = folder
        return built[family]

    return get


@pytest.fixture(scope="session")
def converted(tmp_path_factory, base_dir, corpus) -> Callable[..., Path]:
    """(family, **options) -> folder of the converted checkpoint (each combination converted once)."""
    from starkv_convert.convert import ConvertOptions, convert
    from starkv_convert.learn import LearnOptions

    done: dict[str, Path] = {}

    def get(family: str, **options) -> Path:
        key = json.dumps([family, options], sort_keys=True)
        if key not in done:
            out = tmp_path_factory.mktemp("converted") / f"{family}-starkv"
            settings = {"calibration_samples": 8, "seq_len": 64, "eval_samples": 2, "progress": False, **options}
            settings.setdefault("learn", LearnOptions(steps=6, recovery_steps=3))  # the default method, kept short
            convert(ConvertOptions(model=str(base_dir(family)), output=str(out), calibration=str(corpus), **settings))
            done[key] = out
        return done[key]

    return get


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def quick_convert_args(base, out, corpus, *extra: str) -> list[str]:
    """starkv-convert arguments for a fast conversion of a tiny model on the test corpus."""
    fast = ["--calibration", str(corpus), "--calibration-samples", "4", "--seq-len", "32", "--eval-samples", "1", "-q"]
    fast += ["--steps", "4", "--recovery-steps", "2"]
    return [str(base), "-o", str(out), *fast, *extra]


def load_pair(base: Path, converted_dir: Path):
    """(base model, converted model) loaded as users load them, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    a = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(converted_dir, trust_remote_code=True, dtype=torch.float32).eval()
    return a, b


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real-model tests first: with `pytest -n`, the longest (SmolLM2 conversions, ~5 min) starts at once
    instead of last."""
    items.sort(key=lambda item: item.get_closest_marker("real_model") is None)
