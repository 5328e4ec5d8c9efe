"""
Models spread by accelerate (`device_map="auto"`): over several GPUs, with layers offloaded to CPU memory or disk. An
offloaded module's parameters sit on the meta device and a hook brings them in for each forward; these helpers find
where a module runs and read its real tensors.
"""

from typing import Any

import torch


def parse_max_memory(spec: str | None) -> dict[int | str, str] | None:
    """'0:20GiB,cpu:64GiB' -> {0: '20GiB', 'cpu': '64GiB'} (accelerate's max_memory)."""
    if not spec:
        return None
    result: dict[int | str, str] = {}
    for item in spec.split(","):
        device, _, amount = item.partition(":")
        if not amount:
            raise ValueError(f"--max-memory item {item!r}: expected DEVICE:AMOUNT like 0:20GiB or cpu:64GiB")
        result[int(device) if device.isdigit() else device] = amount
    return result


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device `module` computes on: its accelerate hook's, else its first parameter's (or the CPU)."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def module_tensor(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """`module.<name>` (a parameter or buffer) with its real values, read from the offload store if needed."""
    tensor = getattr(module, name, None)
    if tensor is None or tensor.device.type != "meta":
        return tensor
    hook = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise RuntimeError(f"{name} of {type(module).__name__} is on the meta device and no offload store holds it")
    return weights[name]


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every offloaded tensor read back (on the CPU); the same as it for a plain model."""
    state = model.state_dict()
    if not any(t.device.type == "meta" for t in state.values()):
        return state
    modules = dict(model.named_modules())
    for key, tensor in state.items():
        if tensor.device.type == "meta":
            owner, _, name = key.rpartition(".")
            state[key] = module_tensor(modules[owner], name).cpu()
    return state


def input_device(model: Any) -> torch.device:
    """Where a model's input ids go: the device of its embedding layer."""
    return execution_device(model.get_input_embeddings())
