"""Bad input: one clear line naming the fix, exit status 2, and nothing written."""

import json
import shutil

import pytest
import torch
from conftest import quick_convert_args
from transformers import GPT2Config, GPT2LMHeadModel

from starkv_convert.cli import convert_main, eval_main


def _run_convert(capsys, tmp_path, *args: str) -> str:
    out = tmp_path / "out" / "model-starkv"
    capsys.readouterr()
    code = convert_main([*args, "-o", str(out), "-q"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert not (tmp_path / "out").exists(), "an output folder was left behind"
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]] and lines[-1].startswith("starkv: error: "), lines
    return lines[-1]


@pytest.fixture
def gpt2_dir(tmp_path, tokenizer):
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=384)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_unsupported_architecture(capsys, tmp_path, gpt2_dir):
    err = _run_convert(capsys, tmp_path, str(gpt2_dir))
    assert "'gpt2' is not supported" in err and "Llama" in err and "Mistral" in err and "Qwen2" in err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--kv-ratio", "0"], "--kv-ratio must be in (0, 1]"),
        (["--kv-ratio", "1.5"], "--kv-ratio must be in (0, 1]"),
        (["--kv-ratio", "0.01"], "raise --kv-ratio"),
        (["--k-ratio", "0.3"], "give both --k-ratio and --v-ratio"),
        (["--skip-layers", "7"], "layer 7 is out of range"),
        (["--skip-layers", "0,1,2"], "nothing would be compressed"),
        (["--skip-layers", "a"], "expected comma-separated layer indices"),
        (["--dtype", "float8"], "--dtype 'float8' is not supported"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--method", "magic"], "--method 'magic'"),
        (["--init", "random"], "--init 'random'"),
        (["--calibration", "/nonexistent/calib.txt"], "not found"),
        (["--push-to-hub", "no-slash"], "expected ORG/NAME"),
    ],
)
def test_bad_options(capsys, tmp_path, base_dir, args, expected):
    err = _run_convert(capsys, tmp_path, str(base_dir("llama")), *args)
    assert expected in err


def test_missing_model(capsys, tmp_path):
    assert "not found" in _run_convert(capsys, tmp_path, str(tmp_path / "nope"))
    assert "GGUF file" in _run_convert(capsys, tmp_path, str(tmp_path / "nope.gguf"))


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in _run_convert(capsys, tmp_path, str(tmp_path / "empty"))


def test_corrupt_config(capsys, tmp_path, base_dir):
    folder = tmp_path / "corrupt"
    shutil.copytree(base_dir("llama"), folder)
    (folder / "config.json").write_text("{not json")
    assert "the checkpoint is corrupt" in _run_convert(capsys, tmp_path, str(folder))


def test_missing_weights(capsys, tmp_path, base_dir, corpus):
    folder = tmp_path / "noweights"
    shutil.copytree(base_dir("llama"), folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    err = _run_convert(capsys, tmp_path, str(folder), "--calibration", str(corpus))
    assert "could not load the weights" in err


def test_existing_output_is_kept(capsys, tmp_path, base_dir):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = convert_main([str(base_dir("llama")), "-o", str(out), "-q"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupt_leaves_nothing(monkeypatch, capsys, tmp_path, base_dir, corpus):
    from starkv_convert import convert as convert_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "write_checkpoint", interrupted)
    out = tmp_path / "out" / "model"
    code = convert_main(quick_convert_args(base_dir("llama"), out, corpus, "--method", "energy"))
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    # the learned method keeps only its (complete) training state, for --resume
    code = convert_main(quick_convert_args(base_dir("llama"), out, corpus))
    assert code == 130 and "--resume" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model.train-state"]
    assert sorted(p.name for p in (tmp_path / "out" / "model.train-state").iterdir()) == [
        "state.json",
        "state.safetensors",
    ]


def test_eval_corrupt_checkpoint(capsys, tmp_path, converted, corpus):
    folder = tmp_path / "broken"
    shutil.copytree(converted("llama", kv_ratio=0.5), folder)
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    capsys.readouterr()
    code = eval_main([str(folder), "--text", str(corpus), "--windows", "1", "--seq-len", "16", "-q"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("starkv: error: could not load"), lines


def test_checkpoint_with_bad_ranks_does_not_load(tmp_path, converted):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "badranks"
    shutil.copytree(converted("llama", kv_ratio=0.5), folder)
    data = json.loads((folder / "config.json").read_text())
    data["kv_k_ranks"][0] = [1000, 1]
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"layer 0: kv_k_ranks \[1000, 1\] must hold 2 ranks in \[1, 32\]"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_output_that_appears_during_conversion_is_not_replaced(tmp_path):
    from starkv_convert.errors import StarKVError
    from starkv_convert.export import atomic_output

    out = tmp_path / "out"
    with pytest.raises(StarKVError, match="appeared during the conversion"):
        with atomic_output(out) as staging:
            (staging / "model.safetensors").write_text("ours")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_overwrite_replaces_a_file(tmp_path):
    from starkv_convert.export import atomic_output

    out = tmp_path / "out"
    out.write_text("a file")
    with atomic_output(out, overwrite=True) as staging:
        (staging / "config.json").write_text("{}")
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
