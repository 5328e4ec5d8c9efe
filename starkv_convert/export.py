"""Writing a checkpoint folder: weights as safetensors shards, config, remote code, tokenizer; all or nothing."""

import copy
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict

from .errors import StarKVError
from .remote_code import remote_code_files


@contextmanager
def atomic_output(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """
    Yields an empty staging folder beside `output` that is renamed to `output` only when the block completes; on any
    error or Ctrl-C the staging folder (and any parent folder this created) is removed and `output` is untouched.
    """
    output = Path(output).expanduser().absolute()
    if output.exists() and not overwrite:
        raise StarKVError(f"{output} already exists: choose another --output or pass --overwrite")
    created = [p for p in [output.parent, *output.parent.parents] if not p.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    previous = output.with_name(f".{output.name}.replaced") if output.exists() else None
    try:
        if previous is not None and not overwrite:  # it appeared while we worked: never replace it unasked
            raise StarKVError(f"{output} appeared during the conversion: choose another --output or pass --overwrite")
        _default_permissions(staging)
        if previous is not None:
            _remove(previous)
            os.replace(output, previous)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None:
        _remove(previous)


def _remove(path: Path) -> None:
    """Deletes a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _default_permissions(folder: Path) -> None:
    """Gives the folder and its files the permissions of a plain mkdir/open under the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


PREFILL_CHUNK_SIZE = 2048  # generate() prefills long prompts in chunks of this many tokens (generation_config.json)


def write_checkpoint(
    folder: Path,
    config: Any,
    state_dict: dict[str, torch.Tensor],
    tokenizer: Any,
    generation_config: Any,
    max_shard_size: str = "5GB",
) -> None:
    """Writes a self-contained STAR-KV checkpoint into `folder`."""
    state = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_torch_state_dict(state, folder, max_shard_size=max_shard_size, metadata={"format": "pt"})
    config.save_pretrained(folder)
    for file in remote_code_files():
        shutil.copy2(file, folder / file.name)
    tokenizer.save_pretrained(folder)
    if generation_config is not None:
        generation_config = copy.deepcopy(generation_config)
        if getattr(generation_config, "prefill_chunk_size", None) is None:  # long prompts never bound the batch
            generation_config.prefill_chunk_size = PREFILL_CHUNK_SIZE
        generation_config.save_pretrained(folder)
