"""The learned method: soft thresholds reach their budgets, ranks come out ragged and exact, export equals the trained
module, only key/value factors change, and an interrupted training resumes where it stopped."""

import json

import pytest
import torch
from conftest import TINY_VOCAB, quick_convert_args
from tiny_models import make_base_model
from transformers import AutoModelForCausalLM

from starkv_convert import learn as learn_module
from starkv_convert.build import latent_state_dict, starkv_config
from starkv_convert.cli import convert_main
from starkv_convert.convert import factorize_model, model_shape
from starkv_convert.export import write_checkpoint
from starkv_convert.gating import GatedProjection
from starkv_convert.learn import (
    Budgets,
    LearnOptions,
    exact_keep,
    export_plan,
    install_gates,
    learn_ranks,
    remove_gates,
    side_count,
    side_modules,
)
from starkv_convert.statistics import attention_input_moments


@pytest.fixture(scope="module")
def setup(tokenizer, corpus):
    model = make_base_model("qwen2", TINY_VOCAB)  # biases: the K bias must pass through the gated projection
    ids = torch.tensor(tokenizer(corpus.read_text())["input_ids"])
    blocks = ids[: 16 * 32].view(16, 32)
    moments = attention_input_moments(model, blocks, progress=False)
    return model, blocks, moments


def _factors(setup):
    model, _, moments = setup
    return factorize_model(model, moments, [], 1e-3, progress=False)


def test_thresholds_reach_the_budgets_and_ranks_are_exact_and_ragged(setup):
    model, blocks, _ = setup
    shape = model_shape(model.config)
    budgets = Budgets(k=int(0.3 * shape.side_floats * shape.num_layers), v=int(0.6 * shape.side_floats * 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = LearnOptions(steps=300, recovery_steps=3, threshold_lr=0.02, batch_size=4, checkpoint_every=0)
    result = learn_ranks(model, _factors(setup), shape, budgets, blocks, options, progress=False)

    phase1 = [h for h in result.history if h["phase"] == 1]
    assert len(phase1) < options.steps  # the budgets were met by the thresholds, not by the step limit
    assert len(result.history) == len(phase1) + 3
    assert phase1[0]["kv_ratio"] > phase1[-1]["kv_ratio"]
    assert sum(sum(k) for k in result.plan.k) == budgets.k and sum(result.plan.v) == budgets.v
    k_ranks = [r for layer in result.plan.k for r in layer]
    assert len(set(k_ranks)) > 1 and min(k_ranks) >= 1
    assert all(p.down.shape[0] == r for i, f in result.factors.items() for p, r in zip(f.k, result.plan.k[i]))
    # the model is handed back untouched: same modules, bit-identical tensors, nothing left requiring grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, GatedProjection) for m in model.modules())


def test_exact_keep_prunes_and_adds_back_by_margin():
    def gate(scaled, threshold):
        g = GatedProjection.__new__(GatedProjection)
        torch.nn.Module.__init__(g)
        g.scaled = torch.nn.Parameter(torch.tensor(scaled))
        g.threshold = torch.nn.Parameter(torch.tensor(threshold))
        g.fixed_gain = None
        return g

    a = gate([[0.9, 0.5, 0.2, 0.1], [0.8, 0.7, 0.05, 0.01]], [0.3, 0.6])  # margins .6 .2 -.1 -.2 / .2 .1 -.55 -.59
    b = gate([[1.0, 0.35, 0.3, 0.02]], [0.4])  # margins .6 -.05 -.1 -.38
    assert side_count([a, b]) == 5
    keep = exact_keep([a, b], 4)  # drop the weakest kept component (margin .1)
    assert keep[0].tolist() == [[True, True, False, False], [True, False, False, False]]
    keep = exact_keep([a, b], 7)  # add back the two nearest pruned ones (-.05, -.1)
    assert keep[1].tolist() == [[True, True, True, False]] and keep[0].sum() == 4
    keep = exact_keep([a, b], 3)  # every block keeps at least its best component
    assert [k.sum(dim=1).tolist() for k in keep] == [[1, 1], [1]]


@pytest.mark.parametrize("phase", [1, 2])
def test_export_equals_the_trained_module(setup, tokenizer, tmp_path, phase):
    blocks = setup[1]
    model = make_base_model("qwen2", TINY_VOCAB)
    shape = model_shape(model.config)
    gates = install_gates(model, _factors(setup), beta=50.0)
    torch.manual_seed(1)
    with torch.no_grad():  # stands in for training: every trainable tensor moves
        for pair in gates.values():
            for g in pair:
                g.threshold.uniform_(0.05, 0.3)
                g.scaled.mul_(torch.empty_like(g.scaled).uniform_(0.8, 1.2))
                g.up.add_(0.05 * torch.randn_like(g.up))
                g.down.mul_(1 + 0.1 * torch.randn_like(g.down))
        if phase == 2:
            for side in "kv":
                modules = side_modules(gates, side)
                for g, keep in zip(modules, exact_keep(modules, side_count(modules) - 3)):
                    g.fix_ranks(keep)
        trained = model(input_ids=blocks[:2]).logits

    factors, plan = export_plan(gates, shape)
    assert plan.k[0] == gates[0][0].ranks()
    remove_gates(model, gates)
    state = latent_state_dict(model.state_dict(), factors, plan, torch.float32)
    write_checkpoint(tmp_path, starkv_config(model.config, plan, torch.float32), state, tokenizer, None)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        exported = loaded(input_ids=blocks[:2]).logits
    assert (exported - trained).abs().max().item() <= 1e-4
    assert (trained - make_base_model("qwen2", TINY_VOCAB)(input_ids=blocks[:2]).logits).abs().max() > 1e-2


def test_cli_learned_conversion_changes_only_kv_tensors(base_dir, corpus, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    args = quick_convert_args(base_dir("llama"), out, corpus, "--steps", "4", "--recovery-steps", "2")
    assert convert_main(args) == 0
    report = json.loads((out / "starkv_report.json").read_text())
    assert report["budget"]["method"] == "learned" and report["validation"]["passed"]
    assert report["learning"]["recovery_steps"] == 2 and report["metrics"]["perplexity"]["init"] > 0
    assert report["budget"]["kept_ratio"] == pytest.approx(0.5, abs=1 / 384)
    card = (out / "README.md").read_text()
    assert "ranks.png" in card and "before learning" in card and "### Learning" in card
    assert (out / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "out.train-state").exists()  # removed once the checkpoint is written

    base = load_file(base_dir("llama") / "model.safetensors")
    ours = load_file(out / "model.safetensors")
    shared = set(base) & set(ours)
    assert {k for k in base if k not in shared} == {k for k in base if ".k_proj." in k or ".v_proj." in k}
    assert all(base[k].equal(ours[k]) for k in shared)


@pytest.mark.parametrize("stop_at, phase, step, remaining", [(3, 1, 2, 8), (8, 2, 6, 4)])
def test_interrupted_training_resumes(monkeypatch, base_dir, corpus, tmp_path, capsys, stop_at, phase, step, remaining):
    """Ctrl-C in the threshold phase or in recovery; --resume ends with the weights of an uninterrupted run."""
    out = tmp_path / "out"
    args = quick_convert_args(
        base_dir("mistral"), out, corpus, "--steps", "6", "--recovery-steps", "4", "--checkpoint-every", "2"
    )
    assert convert_main(args) == 0  # the uninterrupted run
    expected = load_state(out)

    calls = {"n": 0}
    real = learn_module.kd_loss

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == stop_at:  # phase 1 runs its 6 steps here (the budget is not met that soon), then 4 more
            raise KeyboardInterrupt
        return real(*a, **k)

    out2 = tmp_path / "again"
    args2 = [str(out2) if a == str(out) else a for a in args]
    monkeypatch.setattr(learn_module, "kd_loss", interrupted)
    assert convert_main(args2) == 130
    assert not out2.exists() and (tmp_path / "again.train-state" / "state.json").exists()
    state = json.loads((tmp_path / "again.train-state" / "state.json").read_text())
    assert state["phase"] == phase and state["step"] == step  # the last checkpoint

    counted = {"n": 0}

    def counting(*a, **k):
        counted["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(learn_module, "kd_loss", counting)
    assert convert_main([*args2, "--resume"]) == 0
    assert counted["n"] == remaining  # only the steps not saved before ran
    resumed = load_state(out2)
    assert resumed.keys() == expected.keys()
    assert all(torch.allclose(resumed[k], expected[k], atol=1e-6) for k in expected)

    # a state made with other settings is refused
    monkeypatch.setattr(learn_module, "kd_loss", interrupted)
    calls["n"] = 0
    assert convert_main([*args2, "--overwrite"]) == 130
    assert convert_main([*args2, "--overwrite", "--resume", "--lr", "0.5"]) == 2
    assert "other settings" in capsys.readouterr().err


def load_state(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_resume_needs_learned(base_dir, corpus, tmp_path, capsys):
    args = quick_convert_args(base_dir("llama"), tmp_path / "o", corpus, "--method", "energy", "--resume")
    assert convert_main(args) == 2
    assert "--resume" in capsys.readouterr().err


def test_offloaded_model_converts_like_a_resident_one(base_dir, corpus, tmp_path):
    """--device-map auto with too little memory puts layers on disk (accelerate); the result must not change."""
    from safetensors.torch import load_file

    base = base_dir("qwen2")
    resident, offloaded = tmp_path / "resident", tmp_path / "offloaded"
    assert convert_main(quick_convert_args(base, resident, corpus)) == 0
    args = quick_convert_args(base, offloaded, corpus, "--device-map", "auto", "--max-memory", "cpu:150KB")
    assert convert_main(args) == 0
    report = json.loads((offloaded / "starkv_report.json").read_text())
    assert report["validation"]["passed"]
    a, b = load_file(resident / "model.safetensors"), load_file(offloaded / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not (tmp_path / "offloaded.offload").exists()


def test_offload_really_offloads(base_dir):
    from starkv_convert.loading import load_model, resolve_source
    from starkv_convert.placement import full_state_dict, module_tensor

    source = resolve_source(str(base_dir("qwen2")))
    placement = {"device_map": "auto", "max_memory": {"cpu": "150KB"}, "offload_folder": None}
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        placement["offload_folder"] = folder
        model = load_model(source, None, "cpu", placement)
        k_proj = model.model.layers[2].self_attn.k_proj
        assert k_proj.weight.device.type == "meta"  # on disk
        resident = load_model(source, None, "cpu")
        assert torch.equal(module_tensor(k_proj, "weight"), resident.model.layers[2].self_attn.k_proj.weight)
        full = full_state_dict(model)
        assert all(torch.equal(full[k], v) for k, v in resident.state_dict().items())


def test_a_layer_that_keeps_everything_is_kept_full(setup):
    """When the budget lets a layer keep every component on both sides, it is exported as the base layer."""
    from starkv_convert.build import latent_state_dict

    model = make_base_model("qwen2", TINY_VOCAB)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    shape = model_shape(model.config)
    gates = install_gates(model, _factors(setup), beta=50.0)
    for index, (k, v) in gates.items():
        for g in (k, v):
            keep = torch.ones_like(g.scaled, dtype=torch.bool)
            if index == 1:
                keep[:, g.scaled.shape[1] // 2 :] = False
            g.fix_ranks(keep)
    factors, plan = export_plan(gates, shape)
    remove_gates(model, gates)
    assert plan.k[0] is None and plan.v[0] is None and plan.k[2] is None
    assert plan.k[1] == [shape.head_dim // 2] * shape.num_kv_heads and plan.v[1] == shape.side_floats // 2
    state = latent_state_dict(model.state_dict(), factors, plan, torch.float32)
    assert all(torch.equal(state[k], base[k]) for k in base if ".layers.0." in k or ".layers.2." in k)
    assert "model.layers.1.self_attn.k_a_proj.weight" in state and "model.layers.1.self_attn.k_proj.weight" not in state
