"""Calibration text from local files, a Hub dataset, or the model itself, packed into token blocks.

Documents are read in order, tokenized, joined with the end-of-sequence token and cut into blocks of `seq_len`
tokens; the first blocks calibrate and the next ones are held out to measure perplexity. Without a source, the
model samples its own calibration text (seeded), so a conversion always works offline.
"""

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import StarKVError
from .placement import input_device

TEXT_COLUMNS = ("text", "content", "document", "article", "body", "sentence", "passage", "story")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
TEXT_CHUNK_CHARS = 1 << 20


@dataclass
class CalibrationData:
    blocks: torch.Tensor  # (n, seq_len) token ids for statistics
    eval_blocks: torch.Tensor  # (m, seq_len) held-out ids for perplexity
    source: str  # what the text was, for the model card

    @property
    def tokens(self) -> int:
        return self.blocks.numel()


def pick_text_column(columns: Iterable[str], sample: dict[str, Any] | None = None) -> str:
    """The text column: a conventional name if present, else the first column holding strings."""
    columns = list(columns)
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    for name in columns:
        if sample is None or isinstance(sample.get(name), str):
            return name
    raise StarKVError(f"no text column among {columns}: expected one of {', '.join(TEXT_COLUMNS)}")


def _read_txt(path: Path) -> Iterator[tuple[str, bool]]:
    """The file as one document, read in pieces of about TEXT_CHUNK_CHARS characters cut after a newline."""
    with path.open(encoding="utf-8", errors="replace") as f:
        chunk = f.read(TEXT_CHUNK_CHARS) + f.readline()
        while chunk:
            following = f.read(TEXT_CHUNK_CHARS) + f.readline()
            yield chunk, not following
            chunk = following


def _read_jsonl(path: Path) -> Iterator[tuple[str, bool]]:
    column = None
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                msg = f"{path}:{number} is not valid JSON: calibration .jsonl files hold one object per line"
                raise StarKVError(msg) from None
            if isinstance(record, str):
                yield record, True
                continue
            column = column or pick_text_column(record, record)
            if isinstance(record.get(column), str):
                yield record[column], True


def _read_parquet(path: Path) -> Iterator[tuple[str, bool]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise StarKVError("reading .parquet calibration files needs pyarrow: pip install pyarrow") from None
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    strings = [f.name for f in schema if str(f.type) in ("string", "large_string")]
    column = pick_text_column([n for n in schema.names if n in strings] or schema.names)
    for batch in parquet.iter_batches(columns=[column], batch_size=1024):
        yield from ((text, True) for text in batch.column(0).to_pylist() if isinstance(text, str))


READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def local_files(path: Path) -> list[Path]:
    """The calibration files at `path`: the file itself, or every supported file under the folder, sorted."""
    if path.is_file():
        if path.suffix not in READERS:
            raise StarKVError(f"{path}: calibration files must be {', '.join(LOCAL_SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in READERS and p.is_file())
    if not files:
        raise StarKVError(f"{path} holds no {', '.join(LOCAL_SUFFIXES)} files to calibrate on")
    return files


def hub_parquet_files(name: str, config: str | None, split: str) -> list[str]:
    """The dataset's parquet files for `config`/`split` in the Hub's parquet conversion branch."""
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(name, repo_type="dataset", revision="refs/convert/parquet")
    except Exception as e:  # network, auth and not-found errors all end here
        raise StarKVError(
            f"could not list Hub dataset {name!r} ({type(e).__name__}): check the name and your network, "
            "or calibrate on local files"
        ) from None
    configs = sorted({f.split("/")[0] for f in files if f.endswith(".parquet")})
    if not configs:
        raise StarKVError(f"Hub dataset {name!r} has no parquet files to read")
    config = config or ("default" if "default" in configs else configs[0])
    if config not in configs:
        raise StarKVError(f"Hub dataset {name!r} has no config {config!r}: choose one of {', '.join(configs)}")
    chosen = sorted(
        f
        for f in files
        if f.endswith(".parquet")
        and f.split("/")[1:2] in ([split], [f"partial-{split}"])
        and f.startswith(config + "/")
    )
    if not chosen:
        raise StarKVError(f"Hub dataset {name!r} config {config!r} has no split {split!r}")
    return chosen


def _read_hub(spec: str) -> Iterator[tuple[str, bool]]:
    from huggingface_hub import hf_hub_download

    name, config, split = (spec.split(":") + [None, None])[:3]
    for filename in hub_parquet_files(name, config, split or "train"):
        try:
            local = hf_hub_download(name, filename, repo_type="dataset", revision="refs/convert/parquet")
        except Exception as e:
            raise StarKVError(f"could not download {filename} of Hub dataset {name!r} ({type(e).__name__})") from None
        yield from _read_parquet(Path(local))


def iter_documents(spec: str) -> Iterator[tuple[str, bool]]:
    """(text, ends a document) pieces from a local file or folder, or a Hub dataset `name[:config[:split]]`."""
    path = Path(spec).expanduser()
    if path.exists():
        for file in local_files(path):
            yield from READERS[file.suffix](file)
    elif path.suffix in READERS or spec.startswith((".", "/", "~")):
        raise StarKVError(f"calibration file {spec} not found: check the path")
    else:
        yield from _read_hub(spec)


def pack_blocks(
    pieces: Iterable[tuple[str, bool]], tokenizer: Any, n_blocks: int, seq_len: int, eos_id: int | None
) -> torch.Tensor:
    """Tokenizes text pieces in order, ends documents with `eos_id` and returns up to `n_blocks` full blocks."""
    needed = n_blocks * seq_len
    ids: list[int] = []
    starts_document = True
    for text, ends_document in pieces:
        if not text.strip():  # an empty document would still add BOS/EOS
            continue
        tokens = tokenizer(text, add_special_tokens=starts_document)["input_ids"]
        ids.extend(tokens)
        if ends_document and eos_id is not None and tokens and tokens[-1] != eos_id:
            ids.append(eos_id)
        starts_document = ends_document
        if len(ids) >= needed:
            break
    usable = len(ids) // seq_len * seq_len
    return torch.tensor(ids[: min(usable, needed)], dtype=torch.long).view(-1, seq_len)


@torch.no_grad()
def sample_from_model(
    model: Any, tokenizer: Any, n_blocks: int, seq_len: int, seed: int, batch_size: int = 64, progress: bool = True
) -> torch.Tensor:
    """(n_blocks, seq_len) tokens sampled from the model (temperature 1, top-p 0.95), each from a random token."""
    device = input_device(model)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    allowed = torch.tensor([i for i in range(model.config.vocab_size) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    first = allowed[torch.randint(len(allowed), (n_blocks, 1), generator=generator)]
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else (model.generation_config.eos_token_id or 0)
    pad = pad[0] if isinstance(pad, list) else pad  # Llama-3 Instruct lists several end-of-turn ids
    blocks = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for batch in tqdm(first.split(batch_size), desc="sampling calibration text", disable=not progress):
            out = model.generate(
                batch.to(device),
                attention_mask=torch.ones_like(batch, device=device),
                do_sample=True,
                temperature=1.0,
                top_p=0.95,
                top_k=0,
                max_new_tokens=seq_len - 1,
                min_new_tokens=seq_len - 1,
                pad_token_id=pad,
            )
            blocks.append(out[:, :seq_len].cpu())
    return torch.cat(blocks)


def calibration_data(
    spec: str | None,
    model: Any,
    tokenizer: Any,
    eos_id: int | None,
    n_samples: int,
    seq_len: int,
    eval_samples: int,
    seed: int,
    progress: bool = True,
) -> CalibrationData:
    """Calibration blocks plus held-out blocks for perplexity, from `spec` or sampled from the model."""
    if n_samples < 1 or seq_len < 2:
        raise StarKVError("--calibration-samples must be >= 1 and --seq-len >= 2")
    if spec is None:
        blocks = sample_from_model(model, tokenizer, n_samples + eval_samples, seq_len, seed, progress=progress)
        source = f"{n_samples} x {seq_len} tokens sampled from the base model (seed {seed}, top-p 0.95)"
        return CalibrationData(blocks[:n_samples], blocks[n_samples:], source)
    blocks = pack_blocks(iter_documents(spec), tokenizer, n_samples + eval_samples, seq_len, eos_id)
    if len(blocks) < n_samples:
        raise StarKVError(
            f"{spec} gives {len(blocks)} blocks of {seq_len} tokens, fewer than --calibration-samples {n_samples}: "
            "give more text or lower --calibration-samples/--seq-len"
        )
    source = f"{spec}: the first {n_samples} x {seq_len} tokens"
    return CalibrationData(blocks[:n_samples], blocks[n_samples:], source)
