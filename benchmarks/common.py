"""Helpers shared by the GPU benchmarks: environment record, timing, bandwidth, results files."""

import argparse
import json
import os
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def with_cache(cache) -> dict:
    """The cache as a keyword of generate() and forward(): `cache` from transformers 5.24, `past_key_values` before."""
    return {_CACHE_KEYWORD: cache}


def _cache_keyword() -> str:
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


_CACHE_KEYWORD = _cache_keyword()


def environment() -> dict:
    import transformers
    import triton

    commit = os.environ.get("STARKV_COMMIT")  # the device machine's copy has no usable git history
    if not commit:
        run = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent)
        commit = run.stdout.strip() or "unknown"
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "commit": commit,
    }


def median_ms(fn, warmup: int = 25, rep: int = 200) -> float:
    """Median time of `fn` in milliseconds (triton.testing.do_bench)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def captured_graphs(calls: list) -> list:
    """Each call captured once in a CUDA graph, after a warm-up run of all of them on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for call in calls:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        graphs.append(graph)
    return graphs


def rotating_ms(calls: list, graphs: bool) -> float:
    """
    Median ms of one call, cycling through `calls` (closures over different inputs, so that nothing stays in L2).
    With `graphs`, each call is captured once in a CUDA graph and the replays are timed (no launch overhead).
    """
    if graphs:
        calls = [graph.replay for graph in captured_graphs(calls)]
    state = {"i": 0}

    def step():
        calls[state["i"] % len(calls)]()
        state["i"] += 1

    return median_ms(step)


def copy_bandwidth(gib: float = 2.0) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = int(gib * (1 << 30)) // 2
    x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x))
    return 2 * n * 2 / (ms * 1e-3)


def write_results(name: str, data: dict, out_dir: Path | None = None) -> Path:
    """Writes benchmarks/results/<name>.json (and a copy under out_dir, if given)."""
    text = json.dumps(data, indent=1)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(text)
    if out_dir is not None:
        (Path(out_dir) / f"{name}.json").write_text(text)
    return path


def launch_settings(parser: argparse.ArgumentParser, items: list[str]) -> dict:
    """`--config KEY=JSON` arguments as a dict of launch settings; a usage error names the form otherwise."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--config {item!r}: give KEY=JSON, e.g. heads_per_program=2")
        settings[key] = json.loads(value)
    return settings
