"""
Gated low-rank projections (METHOD.md section 2): each block (one KV head's keys, or one layer's values) keeps its
whitened factorization with trainable singular values and one trainable soft threshold.

With `s` the singular values of a block, `ref` their initial maximum and `a` the block's threshold (in units of
`ref`), a component passes with gain `g(s) = s * tanh(beta * (s / ref - a))` when `s / ref > a`, else 0; the block's
rank is the number of components above the threshold. Once ranks are fixed, the gains become constants (0 for the
pruned components) and the factors train instead (recovery). `factors()` folds the gains into the down projection,
so the exported latent model computes exactly what the module computed.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .factorize import Factorization

BETA = 50.0


class GatedProjection(nn.Module):
    """
    A drop-in replacement for a k_proj/v_proj Linear: x -> concat over blocks of `up_b diag(gain_b) down_b x`
    (+ the original bias). `original` is kept (frozen) to compute the teacher's output while `bypass` is set.
    """

    def __init__(
        self, blocks: list[Factorization], original: nn.Linear, beta: float = BETA, device: torch.device | None = None
    ):
        super().__init__()
        s = torch.stack([f.energy.clamp_min(0).sqrt() for f in blocks]).float().to(device)  # (blocks, n)
        ref = s.amax(dim=1, keepdim=True).clamp_min(1e-12)
        down = torch.stack([f.down for f in blocks]).float().to(device) / s[..., None].clamp_min(1e-12)
        self.original = original
        bias = original.bias
        if bias is not None and bias.device.type == "meta":  # offloaded by accelerate: read it from its store
            bias = original._hf_hook.weights_map["bias"]
        self.register_buffer("bias", None if bias is None else bias.detach().to(device, copy=True), persistent=False)
        self.beta = beta
        self.bypass = False
        self.register_buffer("ref", ref)
        up = torch.stack([f.up for f in blocks]).float().to(device)
        self.up = nn.Parameter(up.contiguous(), requires_grad=False)
        self.down = nn.Parameter(down.contiguous(), requires_grad=False)  # (blocks, n, in): rows of unit gain
        self.scaled = nn.Parameter(s / ref, requires_grad=False)  # s / ref, in [0, 1] at the start
        self.threshold = nn.Parameter(torch.zeros(s.shape[0], device=s.device), requires_grad=False)
        self.register_buffer("fixed_gain", None)  # set by fix_ranks(): (blocks, n), 0 where pruned

    @property
    def num_blocks(self) -> int:
        return self.up.shape[0]

    def margins(self) -> torch.Tensor:
        """s / ref - a per component (blocks, n): positive where the component passes."""
        return self.scaled - self.threshold[:, None]

    def gain(self) -> torch.Tensor:
        """Per-component gains (blocks, n) of the current state."""
        if self.fixed_gain is not None:
            return self.fixed_gain
        gate = F.relu(torch.tanh(self.beta * self.margins()))
        return self.ref * self.scaled * gate

    def kept(self) -> torch.Tensor:
        """(blocks, n) bool: the components the block keeps."""
        return self.fixed_gain != 0 if self.fixed_gain is not None else self.margins() > 0

    def ranks(self) -> list[int]:
        return self.kept().sum(dim=1).tolist()

    @torch.no_grad()
    def fix_ranks(self, keep: torch.Tensor) -> None:
        """Freezes the gains: the kept components keep their current gain (their plain singular value if the
        threshold had pruned them), the others get 0."""
        current = self.ref * self.scaled * F.relu(torch.tanh(self.beta * self.margins()))
        plain = self.ref * self.scaled
        self.fixed_gain = torch.where(keep, torch.where(current > 0, current, plain), torch.zeros_like(plain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.original(x)
        latent = torch.einsum("...i,bni->...bn", x.to(self.down.dtype), self.down) * self.gain()
        out = torch.einsum("...bn,bon->...bo", latent, self.up).flatten(-2)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype)

    @torch.no_grad()
    def factors(self) -> list[Factorization]:
        """Each block's kept components with the gains folded into the down projection."""
        gain, keep = self.gain(), self.kept()
        result = []
        for b in range(self.num_blocks):
            index = keep[b].nonzero().flatten()
            index = index[gain[b, index].argsort(descending=True, stable=True)]  # strongest first, as SVD orders
            down = gain[b, index, None] * self.down[b, index]
            result.append(Factorization(up=self.up[b][:, index], down=down, energy=gain[b, index] ** 2))
        return result
