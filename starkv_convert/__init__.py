"""starkv: turn a Hugging Face Llama-family causal LM into a STAR-KV checkpoint with a low-rank latent KV cache."""

from .errors import StarKVError

__version__ = "0.1.0"

__all__ = ["StarKVError", "__version__"]
