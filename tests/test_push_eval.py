"""Push (against a fake HfApi, offline), the model card and report, and starkv-eval on base and converted models."""

import json

import pytest
from conftest import quick_convert_args

from starkv_convert import push as push_module
from starkv_convert.cli import convert_main, eval_main
from starkv_convert.errors import StarKVError


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        FakeApi.calls.append(("create_repo", repo_id, private, exist_ok, repo_type))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None):
        FakeApi.calls.append(("upload_folder", folder_path, repo_id, repo_type, commit_message))


@pytest.fixture
def fake_api(monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def test_push_uploads_a_validated_folder(fake_api, converted):
    folder = converted("llama", kv_ratio=0.5)
    url = push_module.push_to_hub(folder, "me/tiny-starkv", private=True)
    assert url == "https://huggingface.co/me/tiny-starkv"
    assert fake_api.calls[0] == ("create_repo", "me/tiny-starkv", True, True, "model")
    assert fake_api.calls[1][:4] == ("upload_folder", str(folder), "me/tiny-starkv", "model")
    assert "50%" in fake_api.calls[1][4]


def test_push_refuses_unvalidated_folders(fake_api, converted, tmp_path):
    import shutil

    folder = tmp_path / "failed"
    shutil.copytree(converted("llama", kv_ratio=0.5), folder)
    report = json.loads((folder / "starkv_report.json").read_text())
    report["validation"] = {"passed": False, "problems": ["perplexity is not finite"]}
    (folder / "starkv_report.json").write_text(json.dumps(report))
    with pytest.raises(StarKVError, match="failed validation \\(perplexity is not finite\\)"):
        push_module.push_to_hub(folder, "me/x")
    (folder / "starkv_report.json").unlink()
    with pytest.raises(StarKVError, match="no readable starkv_report.json"):
        push_module.push_to_hub(folder, "me/x")
    assert fake_api.calls == []


def test_push_network_error_is_one_line(monkeypatch, converted):
    import huggingface_hub

    class Offline(FakeApi):
        def create_repo(self, *args, **kwargs):
            raise ConnectionError("no route to host\nlong traceback text")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    with pytest.raises(StarKVError, match="push to me/x failed: no route to host \\(log in"):
        push_module.push_to_hub(converted("llama", kv_ratio=0.5), "me/x")


def test_convert_with_push_flag(fake_api, base_dir, corpus, tmp_path, capsys):
    out = tmp_path / "pushed"
    code = convert_main(quick_convert_args(base_dir("llama"), out, corpus, "--push-to-hub", "me/pushed"))
    assert code == 0, capsys.readouterr().err
    assert [c[0] for c in fake_api.calls] == ["create_repo", "upload_folder"]


def test_card_and_report(converted):
    folder = converted("qwen2", kv_ratio=0.5)
    report = json.loads((folder / "starkv_report.json").read_text())
    card = (folder / "README.md").read_text()
    assert report["validation"]["passed"]
    assert report["budget"]["kept_ratio"] <= 0.5
    assert report["kv_cache"]["bytes_per_token"]["starkv"] <= 0.505 * report["kv_cache"]["bytes_per_token"]["base"]
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "- starkv" in front and "custom_code" in front
    assert f"{report['kv_cache']['reduction']:.2f}x" in card
    assert str(report["ranks"]["v"][0]) in card
    files = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "configuration_starkv.py",
        "modeling_starkv.py",
        "cache_starkv.py",
        "latent_ops.py",
        "tokenizer.json",
        "generation_config.json",
        "README.md",
        "starkv_report.json",
    } <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_starkv.StarKVForCausalLM"
    assert config["base_model_type"] == "qwen2" and config["model_type"] == "starkv"


def test_unchanged_tensors_are_bit_identical(base_dir, converted):
    from safetensors.torch import load_file

    base = load_file(base_dir("mistral") / "model.safetensors")
    ours = load_file(converted("mistral", kv_ratio=0.5) / "model.safetensors")
    shared = set(base) & set(ours)
    assert {k for k in base if k not in shared} == {k for k in base if ".k_proj." in k or ".v_proj." in k}
    assert all(base[k].dtype == ours[k].dtype and base[k].equal(ours[k]) for k in shared)


def test_dtype_option_casts_everything(converted):
    import torch
    from safetensors.torch import load_file

    tensors = load_file(converted("llama", kv_ratio=0.5, dtype="bfloat16") / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


@pytest.mark.parametrize("which", ["base", "converted"])
def test_eval_prints_json(which, base_dir, converted, corpus, capsys):
    folder = base_dir("llama") if which == "base" else converted("llama", kv_ratio=0.5)
    capsys.readouterr()
    code = eval_main([str(folder), "--text", str(corpus), "--seq-len", "32", "--windows", "3", "--start", "5", "-q"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert result["tokens_evaluated"] == 3 * 31 and result["perplexity"] > 1
    expected = 3 * 2 * 2 * 32 * 4  # layers x (K, V) x kv heads x head_dim x fp32 bytes
    if which == "base":
        assert result["kv_cache_bytes_per_token"] == expected
    else:
        assert result["kv_cache_bytes_per_token"] <= 0.505 * expected


def test_output_has_normal_permissions(converted):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    folder = converted("llama", kv_ratio=0.5)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((folder / "model.safetensors").stat().st_mode) == 0o666 & ~umask
