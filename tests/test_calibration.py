"""Calibration data: local .txt/.jsonl/.parquet files and folders, Hub datasets (mocked), self-sampling; packing."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from starkv_convert import calibration as cal
from starkv_convert.errors import StarKVError

DOCS = ["The first document is about rivers.", "The second one talks of bridges and roads.", "A third, on trains."]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "docs.txt").write_text("\n".join(DOCS) + "\n")
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"id": i, "content": d}) for i, d in enumerate(DOCS)))
    pq.write_table(pa.table({"n": [1, 2, 3], "body": DOCS}), tmp_path / "docs.parquet")
    return tmp_path


def _texts(spec):
    return list(cal.iter_documents(str(spec)))


def test_txt_is_one_document(files):
    assert _texts(files / "docs.txt") == [("\n".join(DOCS) + "\n", True)]


def test_jsonl_and_parquet_find_the_text_column(files):
    expected = [(d, True) for d in DOCS]
    assert _texts(files / "docs.jsonl") == expected
    assert _texts(files / "docs.parquet") == expected


def test_folder_reads_every_file_in_order(files):
    texts = _texts(files)
    assert len(texts) == 1 + 3 + 3  # docs.jsonl, docs.parquet, docs.txt (sorted)
    assert texts[0] == (DOCS[0], True) and texts[-1][0].startswith(DOCS[0])


def test_bad_local_inputs(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(StarKVError, match="must be .txt, .jsonl, .parquet"):
        _texts(tmp_path / "x.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(StarKVError, match="bad.jsonl:2 is not valid JSON"):
        _texts(tmp_path / "bad.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StarKVError, match="holds no"):
        _texts(tmp_path / "empty")
    with pytest.raises(StarKVError, match="not found"):
        _texts(tmp_path / "missing.txt")


def test_pack_blocks_joins_documents_with_eos(tokenizer):
    pieces = [(d, True) for d in DOCS] * 20
    blocks = cal.pack_blocks(pieces, tokenizer, n_blocks=3, seq_len=16, eos_id=0)
    assert blocks.shape == (3, 16)
    flat = blocks.flatten().tolist()
    first = tokenizer(DOCS[0])["input_ids"]
    assert flat[: len(first) + 1] == first + [0]
    assert torch.equal(blocks, cal.pack_blocks(pieces, tokenizer, 3, 16, 0))  # reproducible


def test_too_little_text_is_an_error(files, tokenizer, base_dir):
    with pytest.raises(StarKVError, match="fewer than --calibration-samples"):
        cal.calibration_data(
            str(files / "docs.txt"),
            None,
            tokenizer,
            0,
            n_samples=50,
            seq_len=64,
            eval_samples=0,
            seed=0,
            progress=False,
        )


class FakeHub:
    """Stands in for the Hub: a dataset with a parquet conversion branch holding two configs."""

    def __init__(self, folder):
        self.folder = folder
        self.files = ["default/train/0000.parquet", "default/test/0000.parquet", "other/train/0000.parquet"]
        for i, name in enumerate(self.files):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"label": [i], "text": [f"{name} says hello"]}), folder / name)

    def list_repo_files(self, repo_id, repo_type=None, revision=None):
        assert repo_type == "dataset" and revision == "refs/convert/parquet"
        if repo_id != "org/data":
            raise FileNotFoundError(repo_id)
        return self.files + [".gitattributes"]

    def download(self, repo_id, filename, repo_type=None, revision=None):
        return str(self.folder / filename)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub

    fake = FakeHub(tmp_path)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, *a, **k: fake.list_repo_files(*a, **k))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.download)
    return fake


def test_hub_dataset_specs(hub):
    assert _texts("org/data") == [("default/train/0000.parquet says hello", True)]
    assert _texts("org/data:default:test") == [("default/test/0000.parquet says hello", True)]
    assert _texts("org/data:other") == [("other/train/0000.parquet says hello", True)]
    with pytest.raises(StarKVError, match="no config 'nope': choose one of default, other"):
        _texts("org/data:nope")
    with pytest.raises(StarKVError, match="has no split 'validation'"):
        _texts("org/data:default:validation")
    with pytest.raises(StarKVError, match="could not list Hub dataset 'org/missing'"):
        _texts("org/missing")


def test_self_sampled_calibration_is_seeded(base_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir("llama")).eval()
    a = cal.calibration_data(None, model, tokenizer, 0, 3, 12, 1, seed=5, progress=False)
    b = cal.calibration_data(None, model, tokenizer, 0, 3, 12, 1, seed=5, progress=False)
    c = cal.calibration_data(None, model, tokenizer, 0, 3, 12, 1, seed=6, progress=False)
    assert a.blocks.shape == (3, 12) and a.eval_blocks.shape == (1, 12)
    assert torch.equal(a.blocks, b.blocks) and not torch.equal(a.blocks, c.blocks)
    assert "sampled from the base model" in a.source


def test_empty_documents_add_nothing(tokenizer):
    pieces = [("", True), ("   \n", True), (DOCS[0], True)] * 30
    with_empty = cal.pack_blocks(pieces, tokenizer, n_blocks=2, seq_len=8, eos_id=0)
    without = cal.pack_blocks([p for p in pieces if p[0].strip()], tokenizer, n_blocks=2, seq_len=8, eos_id=0)
    assert torch.equal(with_empty, without)


def test_sampling_with_a_list_of_end_ids(base_dir, tokenizer):
    """Llama-3 Instruct style: no pad id and several EOS ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir("llama")).eval()
    model.generation_config.pad_token_id = None
    model.generation_config.eos_token_id = [0, 1]
    blocks = cal.sample_from_model(model, tokenizer, n_blocks=2, seq_len=6, seed=0, progress=False)
    assert blocks.shape == (2, 6)
