"""A plain, slow reference implementation of the MLLA backbone, written from the spec.

It keeps tokens as ``(B, N, C)``, converts to NCHW for every convolution,
computes RoPE from explicit cos/sin of each channel pair, and runs the
linear attention head by head with the formulas of the spec. It shares the
parameter names of :class:`mlla_mm.models.MLLA`, so
``ref.load_state_dict(fast.state_dict())`` works. Used by the tests (to check
the fast path's outputs and gradients) and by ``tools/benchmark.py``
(``mlla_t_ref``). Not registered and not part of the installed package: it
is not meant for training.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlla_mm.models.mlla import ARCH_SETTINGS, resolve_arch


class RefConvLayer(nn.Module):
    """Conv2d -> optional BatchNorm2d -> optional ReLU."""

    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1, p: int = 0, groups: int = 1,
                 bias: bool = True, norm: bool = True, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(cout) if norm else None
        self.act = nn.ReLU() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


def ref_rope(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """2-D RoPE of the spec on tokens ``x`` (B, N, C), N = height * width, base 10000."""
    b, n, c = x.shape
    k = c // 4
    out = torch.empty_like(x)
    rows = torch.arange(height, dtype=torch.float64).repeat_interleave(width)  # row of each token
    cols = torch.arange(width, dtype=torch.float64).repeat(height)
    for m in range(c // 2):
        if m < k:
            angle = rows * 10000.0 ** (-m / k)
        else:
            angle = cols * 10000.0 ** (-(m - k) / k)
        cos = torch.cos(angle).to(x.dtype).view(1, n)
        sin = torch.sin(angle).to(x.dtype).view(1, n)
        a, bb = x[:, :, 2 * m], x[:, :, 2 * m + 1]
        out[:, :, 2 * m] = a * cos - bb * sin
        out[:, :, 2 * m + 1] = bb * cos + a * sin
    return out


def to_image(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C) tokens."""
    return x.flatten(2).transpose(1, 2)


class RefLinearAttention(nn.Module):
    """The linear attention of the spec, head by head."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.qk = nn.Linear(dim, dim * 2)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.num_heads
        qk = self.qk(x)
        q = F.elu(qk[:, :, :c]) + 1.0
        k = F.elu(qk[:, :, c:]) + 1.0
        v = x
        q_r, k_r = ref_rope(q, height, width), ref_rope(k, height, width)
        heads = []
        for i in range(self.num_heads):
            sl = slice(i * d, (i + 1) * d)
            qh, kh, vh, qrh, krh = q[:, :, sl], k[:, :, sl], v[:, :, sl], q_r[:, :, sl], k_r[:, :, sl]
            z = 1.0 / ((qh * kh.mean(dim=1, keepdim=True)).sum(-1, keepdim=True) + 1e-6)
            kv = (krh.transpose(1, 2) * n ** -0.5) @ (vh * n ** -0.5)
            heads.append((qrh @ kv) * z)
        out = torch.cat(heads, dim=-1)
        return out + to_tokens(self.lepe(to_image(v, height, width)))


class RefMLLABlock(nn.Module):
    """One MLLA block on tokens, as listed in the spec."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.) -> None:
        super().__init__()
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, dim)
        self.act_proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.attn = RefLinearAttention(dim, num_heads)
        self.out_proj = nn.Linear(dim, dim)
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module('fc1', nn.Linear(dim, hidden))
        self.mlp.add_module('act', nn.GELU())
        self.mlp.add_module('fc2', nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + to_tokens(self.cpe1(to_image(x, height, width)))
        shortcut = x
        y = self.norm1(x)
        gate = F.silu(self.act_proj(y))
        y = F.silu(to_tokens(self.dwc(to_image(self.in_proj(y), height, width))))
        y = self.attn(y, height, width)
        x = shortcut + self.out_proj(y * gate)
        x = x + to_tokens(self.cpe2(to_image(x, height, width)))
        return x + self.mlp(self.norm2(x))


class RefStage(nn.Module):
    """Blocks, then an optional downsample."""

    def __init__(self, dim: int, depth: int, num_heads: int, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(RefMLLABlock(dim, num_heads) for _ in range(depth))
        if downsample:
            self.downsample = nn.Module()
            self.downsample.conv = nn.Sequential(
                RefConvLayer(dim, 8 * dim, 1, norm=False),
                RefConvLayer(8 * dim, 8 * dim, 3, 2, 1, groups=8 * dim, norm=False),
                RefConvLayer(8 * dim, 2 * dim, 1, act=False))
        else:
            self.downsample = None


class MLLAReference(nn.Module):
    """Slow reference MLLA backbone; same parameter names and outputs as :class:`MLLA`."""

    def __init__(self, arch: object = 'tiny', out_indices: Sequence[int] = (0, 1, 2, 3)) -> None:
        super().__init__()
        a = resolve_arch(arch)
        c = a['embed_dims']
        self.out_indices = tuple(out_indices)
        self.patch_embed = nn.Module()
        self.patch_embed.conv1 = RefConvLayer(3, c // 2, 3, 2, 1, bias=False)
        self.patch_embed.conv2 = nn.Sequential(RefConvLayer(c // 2, c // 2, 3, 1, 1, bias=False),
                                               RefConvLayer(c // 2, c // 2, 3, 1, 1, bias=False, act=False))
        self.patch_embed.conv3 = nn.Sequential(RefConvLayer(c // 2, 4 * c, 3, 2, 1, bias=False),
                                               RefConvLayer(4 * c, c, 1, bias=False, act=False))
        self.layers = nn.ModuleList(
            RefStage(c * 2**i, a['depths'][i], a['num_heads'][i], i < 3) for i in range(4))
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(c * 2**i))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        h, w = x.shape[2:]
        x = F.pad(x, (0, (-w) % 4, 0, (-h) % 4))
        pe = self.patch_embed
        x = pe.conv1(x)
        x = x + pe.conv2(x)
        x = pe.conv3(x)
        outs: List[torch.Tensor] = []
        for i, stage in enumerate(self.layers):
            h, w = x.shape[2:]
            t = to_tokens(x)
            for blk in stage.blocks:
                t = blk(t, h, w)
            x = to_image(t, h, w)
            if i in self.out_indices:
                outs.append(to_image(getattr(self, f'norm{i}')(t), h, w).contiguous())
            if stage.downsample is not None:
                x = stage.downsample.conv(F.pad(x, (0, w % 2, 0, h % 2)))
        return tuple(outs)


__all__ = ['MLLAReference', 'RefMLLABlock', 'RefLinearAttention', 'ref_rope', 'ARCH_SETTINGS']
