"""
Learned ranks (METHOD.md section 2): soft-threshold calibration with knowledge distillation.

The student is the base model with each compressed layer's k_proj/v_proj replaced by a `GatedProjection`; the
teacher is the same model with those projections bypassed, so the weights are held once. Phase 1 trains the
singular values and thresholds with KL(teacher || student) plus lambda * sum(exp(-threshold)) per side (keys,
values); a side's thresholds freeze, and its compression term drops, once its rank count meets its budget. Then the
ranks are set to meet each budget exactly (the components furthest above their block's threshold are kept), and
phase 2 (recovery) trains the factors alone with KD. Only these tensors ever train.
"""

import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .errors import StarKVError
from .evaluate import perplexity
from .factorize import LayerFactors
from .gating import BETA, GatedProjection
from .placement import execution_device, input_device
from .ranks import ModelShape, RankPlan


@dataclass
class LearnOptions:
    """Hyper-parameters of the learned method (the CLI's defaults)."""

    steps: int | None = None  # phase 1 (thresholds) at most this many steps; it ends once both budgets are met
    recovery_steps: int | None = None  # phase 2 (factors)
    lr: float = 1e-3  # singular values (phase 1) and factors (phase 2), relative to each tensor's scale
    threshold_lr: float | None = None  # thresholds are in units of their block's largest singular value
    compression: float = 1.0  # lambda of the exp(-threshold) terms
    beta: float = BETA
    batch_size: int | None = None  # calibration blocks per step
    checkpoint_every: int = 50
    gradient_checkpointing: bool | None = None  # None: on CUDA only
    autocast: bool | None = None  # bf16 autocast; None: on CUDA only
    seed: int = 0

    def resolved(self, cuda: bool) -> "LearnOptions":
        """These options with the unset sizes filled in: a full run on a GPU, a short one (tests, demos) on a CPU."""
        steps, recovery, batch, threshold_lr = GPU_SIZES if cuda else CPU_SIZES
        return replace(
            self,
            threshold_lr=threshold_lr if self.threshold_lr is None else self.threshold_lr,
            steps=steps if self.steps is None else self.steps,
            recovery_steps=recovery if self.recovery_steps is None else self.recovery_steps,
            batch_size=batch if self.batch_size is None else self.batch_size,
        )


# (steps, recovery steps, batch size, threshold lr): SmolLM2-135M takes ~2 min on an H100; the short CPU run (tests,
# demos) moves its thresholds faster so that they reach the budget within its steps
GPU_SIZES = (200, 300, 4, 3e-3)
CPU_SIZES = (30, 30, 1, 1e-2)


@dataclass
class Budgets:
    """Cached values per token allowed to the compressed layers' keys and values."""

    k: int
    v: int


@dataclass
class LearnResult:
    factors: dict[int, LayerFactors]
    plan: RankPlan
    history: list[dict[str, float]]
    perplexity_init: float | None = None  # of the starting point (`init_plan`), when measured


# --- the student ----------------------------------------------------------------------------------------------------


def install_gates(model: Any, factors: dict[int, LayerFactors], beta: float) -> dict[int, tuple[GatedProjection, ...]]:
    """Replaces k_proj/v_proj of the factorized layers with gated projections; returns them per layer."""
    gates = {}
    for index, f in factors.items():
        attn = model.model.layers[index].self_attn
        device = execution_device(attn.k_proj)  # the layer's own device when accelerate spreads the model
        k = GatedProjection(f.k, attn.k_proj, beta, device)
        v = GatedProjection([f.v], attn.v_proj, beta, device)
        attn.k_proj, attn.v_proj = k, v
        gates[index] = (k, v)
    return gates


def remove_gates(model: Any, gates: dict[int, tuple[GatedProjection, ...]]) -> None:
    """Puts the original projections back: the model is the base model again."""
    for index, (k, v) in gates.items():
        attn = model.model.layers[index].self_attn
        attn.k_proj, attn.v_proj = k.original, v.original


@contextmanager
def teacher(gates: dict[int, tuple[GatedProjection, ...]]) -> Iterator[None]:
    """Within the block the model computes as the base model."""
    modules = [g for pair in gates.values() for g in pair]
    for g in modules:
        g.bypass = True
    try:
        yield
    finally:
        for g in modules:
            g.bypass = False


def kd_loss(student: torch.Tensor, teacher_hidden: torch.Tensor, lm_head: torch.nn.Module, chunk: int = 1024):
    """Mean over tokens of KL(teacher || student) of the next-token distributions, from final hidden states; the
    logits are made chunk by chunk (and recomputed in backward) so the full (tokens, vocab) tensor never exists."""

    def piece(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        log_s = F.log_softmax(lm_head(s).float(), dim=-1)
        log_t = F.log_softmax(lm_head(t).float(), dim=-1)
        return F.kl_div(log_s, log_t, log_target=True, reduction="sum")

    s, t = student.flatten(0, -2), teacher_hidden.flatten(0, -2)
    starts = range(0, len(s), chunk)
    pieces = [checkpoint(piece, s[i : i + chunk], t[i : i + chunk], use_reentrant=False) for i in starts]
    return sum(pieces) / len(s)


# --- budgets and ranks ----------------------------------------------------------------------------------------------


def side_modules(gates: dict[int, tuple[GatedProjection, ...]], side: str) -> list[GatedProjection]:
    return [pair[0 if side == "k" else 1] for _, pair in sorted(gates.items())]


def side_count(modules: list[GatedProjection]) -> int:
    return sum(int(m.kept().sum()) for m in modules)


@torch.no_grad()
def exact_keep(modules: list[GatedProjection], budget: int) -> list[torch.Tensor]:
    """
    Which components each block keeps so that the side holds exactly `budget` of them: every block keeps its
    component furthest above its threshold, then the rest go to the largest margins over all blocks (pruning the
    weakest kept ones if training overshot the budget, adding back the nearest pruned ones if it undershot).
    """
    margins = [m.margins().detach().float().cpu() for m in modules]
    n_blocks = sum(len(m) for m in margins)
    if not n_blocks <= budget <= sum(m.numel() for m in margins):
        raise StarKVError(f"a budget of {budget} values cannot hold {n_blocks} blocks of rank >= 1")
    best = [m.argmax(dim=1) for m in margins]
    rest = []
    for m, b in zip(margins, best):
        m = m.clone()
        m[torch.arange(len(m)), b] = -math.inf
        rest.append(m.flatten())
    order = torch.argsort(torch.cat(rest), descending=True, stable=True)[: budget - n_blocks]
    chosen = torch.zeros(sum(r.numel() for r in rest), dtype=torch.bool)
    chosen[order] = True
    keeps, start = [], 0
    for m, b in zip(margins, best):
        keep = chosen[start : start + m.numel()].view_as(m).clone()
        keep[torch.arange(len(m)), b] = True
        keeps.append(keep)
        start += m.numel()
    return keeps


def export_plan(
    gates: dict[int, tuple[GatedProjection, ...]], shape: ModelShape
) -> tuple[dict[int, LayerFactors], RankPlan]:
    """Factors and ranks of the trained gates; a layer that kept every component of a full-size factorization on
    both sides is kept full (its original projections, bit-identical)."""
    plan = RankPlan(k=[None] * shape.num_layers, v=[None] * shape.num_layers)
    factors = {}
    for index, (k, v) in gates.items():
        full = all(r == shape.head_dim for r in k.ranks()) and v.ranks()[0] == shape.side_floats
        if full and k.up.shape[-1] == shape.head_dim and v.up.shape[-1] == shape.side_floats:
            continue
        factors[index] = LayerFactors(k=k.factors(), v=v.factors()[0])
        plan.k[index], plan.v[index] = k.ranks(), v.ranks()[0]
    return factors, plan


# --- training state on disk (safetensors + json), for --resume ------------------------------------------------------


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_state(folder: Path, gates: dict, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Writes the trainable tensors, the optimizer's moments and `meta` into `folder`, atomically per file."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for index, pair in gates.items():
        for side, g in zip("kv", pair):
            for name, t in g.state_dict().items():
                if not name.startswith("original."):
                    tensors[f"{index}.{side}.{name}"] = t.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    for p, state in opt["state"].items():
        for name, t in state.items():
            tensors[f"optimizer.{p}.{name}"] = torch.as_tensor(t).detach().cpu().contiguous()
    meta = {**meta, "param_groups": opt["param_groups"]}
    _atomic(folder / "state.safetensors", lambda path: save_file(tensors, str(path)))
    _atomic(folder / "state.json", lambda path: Path(path).write_text(json.dumps(meta, indent=1)))


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    os.replace(tmp, target)


def load_state(folder: Path, gates: dict) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Loads the gates' tensors from `folder`; returns (meta, optimizer tensors)."""
    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, ValueError) as e:
        raise StarKVError(f"cannot resume from {folder}: {e}; delete it to start over") from None
    for index, pair in gates.items():
        for side, g in zip("kv", pair):
            prefix = f"{index}.{side}."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if "fixed_gain" in own:
                g.fixed_gain = own["fixed_gain"].clone().to(g.ref.device)
            missing = [n for n in g.state_dict() if not n.startswith("original.") and n not in own]
            if missing:
                raise StarKVError(f"cannot resume from {folder}: it lacks {prefix}{missing[0]}; delete it")
            try:
                g.load_state_dict(own, strict=False)
            except RuntimeError:
                raise StarKVError(f"cannot resume from {folder}: its tensors do not fit this model") from None
    return meta, {k: v for k, v in tensors.items() if k.startswith("optimizer.")}


def restore_optimizer(optimizer: torch.optim.Optimizer, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        _, p, name = key.split(".", 2)
        state.setdefault(int(p), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --- training -------------------------------------------------------------------------------------------------------


def _optimizer(gates: dict, phase: int, options: LearnOptions) -> torch.optim.Optimizer:
    """Adam over what the phase trains; learning rates relative to each tensor's scale (thresholds are in [0, 1])."""
    groups = []
    for pair in gates.values():
        for g in pair:
            names = ("scaled", "threshold") if phase == 1 else ("up", "down")
            for name in names:
                p = getattr(g, name)
                p.requires_grad_(True)
                if name == "threshold":
                    lr = options.threshold_lr
                elif name == "scaled":
                    lr = options.lr
                else:
                    lr = options.lr * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-12))
                groups.append({"params": [p], "lr": lr, "name": name})
    return torch.optim.Adam(groups, betas=(0.9, 0.99))


def _freeze_all(gates: dict) -> None:
    for pair in gates.values():
        for g in pair:
            for name in ("scaled", "threshold", "up", "down"):
                getattr(g, name).requires_grad_(False)


def _batches(blocks: torch.Tensor, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The batch of step `step`: the blocks in a seeded random order per epoch, so a resumed run sees the same ones."""
    per_epoch = max(1, len(blocks) // batch_size)
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return blocks[order[within * batch_size : (within + 1) * batch_size]]


@torch.enable_grad()  # trains even when called under torch.no_grad()
def learn_ranks(
    model: Any,
    factors: dict[int, LayerFactors],
    shape: ModelShape,
    budgets: Budgets,
    blocks: torch.Tensor,
    options: LearnOptions,
    state_dir: Path | None = None,
    resume: bool = False,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    init_plan: RankPlan | None = None,
    eval_blocks: torch.Tensor | None = None,
) -> LearnResult:
    """
    Learns ranks (and factors) for the factorized layers under separate key/value budgets; leaves `model` as it
    found it. `state_dir`: where training state is saved every `options.checkpoint_every` steps; with `resume`,
    training continues from the state found there (made with the same `settings`). With `init_plan` and
    `eval_blocks`, the perplexity of the starting point (the factors truncated to `init_plan`'s ranks) is measured
    first, through the same gated model (no second copy of the model).
    """
    device = input_device(model)
    cuda = device.type == "cuda"
    options = options.resolved(cuda)
    use_autocast = cuda if options.autocast is None else options.autocast
    use_checkpointing = cuda if options.gradient_checkpointing is None else options.gradient_checkpointing
    stamp = fingerprint({**(settings or {}), **asdict(options), "budgets": asdict(budgets)})
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    gates = install_gates(model, factors, options.beta)
    sides = {"k": side_modules(gates, "k"), "v": side_modules(gates, "v")}
    budget_of = {"k": budgets.k, "v": budgets.v}
    total_base = 2 * shape.side_floats * shape.num_layers
    uncompressed = 2 * shape.side_floats * (shape.num_layers - len(gates))
    history: list[dict[str, float]] = []
    phase, step, frozen = 1, 0, {"k": False, "v": False}

    try:
        optimizer = _optimizer(gates, phase, options)
        if resume and state_dir is not None and (state_dir / "state.json").exists():
            meta, opt_tensors = load_state(state_dir, gates)
            if meta.get("fingerprint") != stamp:
                raise StarKVError(
                    f"{state_dir} holds training state of other settings: drop --resume, or delete it to start over"
                )
            phase, step, frozen, history = meta["phase"], meta["step"], meta["frozen"], meta["history"]
            _freeze_all(gates)
            optimizer = _optimizer(gates, phase, options)
            restore_optimizer(optimizer, meta, opt_tensors)
            for side in "kv":
                if frozen[side]:
                    for g in sides[side]:
                        g.threshold.requires_grad_(False)
        perplexity_init = None
        if init_plan is not None and eval_blocks is not None:
            perplexity_init = _plan_perplexity(model, gates, init_plan, eval_blocks)
        if use_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else nullcontext()

        def save() -> None:
            if state_dir is not None:
                meta = {"fingerprint": stamp, "phase": phase, "step": step, "frozen": frozen, "history": history}
                save_state(state_dir, gates, optimizer, meta)

        total_steps = options.steps + options.recovery_steps
        bar = tqdm(total=total_steps, desc="learning ranks", unit="step", disable=not progress, initial=step)
        while step < total_steps:
            if phase == 1:
                _freeze_sides_within_budget(sides, budget_of, frozen)
                if step >= options.steps or all(frozen.values()):
                    _fix_ranks_exactly(sides, budget_of)
                    phase, step, bar.n = 2, options.steps, options.steps
                    _freeze_all(gates)
                    optimizer = _optimizer(gates, 2, options)
                    save()
                    continue
            batch = _batches(blocks, options.batch_size, options.seed, step).to(device)
            with torch.no_grad(), teacher(gates), autocast:
                target = model.model(input_ids=batch, use_cache=False).last_hidden_state
            with autocast:
                kd = kd_loss(model.model(input_ids=batch, use_cache=False).last_hidden_state, target, model.lm_head)
            loss = kd
            if phase == 1:  # the compression terms of the sides still above budget
                thresholds = [g.threshold for side in "kv" if not frozen[side] for g in sides[side]]
                loss = loss + options.compression * sum(torch.exp(-a).sum() for a in thresholds)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for g in sides["k"] + sides["v"]:
                    g.threshold.clamp_(min=0.0)
            step += 1
            current = (side_count(sides["k"]) + side_count(sides["v"]) + uncompressed) / total_base
            history.append({"step": step, "phase": phase, "kd": kd.item(), "kv_ratio": current})
            bar.set_postfix(phase=phase, kd=f"{kd.item():.4f}", kv=f"{current:.3f}")
            bar.update(1)
            if options.checkpoint_every and step % options.checkpoint_every == 0:
                save()
        bar.close()
        if phase == 1:  # no recovery steps: fix the ranks all the same
            _fix_ranks_exactly(sides, budget_of)
        save()
        learned, plan = export_plan(gates, shape)
    finally:
        if use_checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)
        remove_gates(model, gates)
    return LearnResult(factors=learned, plan=plan, history=history, perplexity_init=perplexity_init)


def _freeze_sides_within_budget(sides: dict, budget_of: dict[str, int], frozen: dict[str, bool]) -> None:
    """A side whose rank count meets its budget stops moving its thresholds (and its compression term drops)."""
    for side in "kv":
        if not frozen[side] and side_count(sides[side]) <= budget_of[side]:
            frozen[side] = True
            for g in sides[side]:
                g.threshold.requires_grad_(False)
                g.threshold.grad = None


def _fix_ranks_exactly(sides: dict, budget_of: dict[str, int]) -> None:
    """Ends the threshold phase: each side keeps exactly its budget of components, with constant gains."""
    for side in "kv":
        for g, keep in zip(sides[side], exact_keep(sides[side], budget_of[side])):
            g.fix_ranks(keep.to(g.scaled.device))


@torch.no_grad()
def _plan_perplexity(model: Any, gates: dict, plan: RankPlan, blocks: torch.Tensor) -> float:
    """Perplexity of the model whose blocks keep their leading components, as many as `plan` says."""
    saved = {id(g): g.fixed_gain for pair in gates.values() for g in pair}
    for index, (k, v) in gates.items():
        for g, ranks in ((k, plan.k[index]), (v, [plan.v[index]])):
            keep = torch.arange(g.scaled.shape[1], device=g.scaled.device)[None, :] < torch.tensor(ranks)[:, None].to(
                g.scaled.device
            )
            g.fixed_gain = g.ref * g.scaled * keep
    try:
        return perplexity(model, blocks)
    finally:
        for pair in gates.values():
            for g in pair:
                g.fixed_gain = saved[id(g)]
