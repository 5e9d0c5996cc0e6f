"""MLLA: Mamba-Like Linear Attention backbone for dense prediction.

"Demystify Mamba in Vision: A Linear Attention Perspective" (NeurIPS 2024).

Building blocks from small to large (conv layer, RoPE, linear attention, the
MLLA block, a stage), then the backbone, then the registered constructors.
Parameter names follow the published code exactly, so its checkpoints load
without renaming.

Internally tokens are kept as a ``(B, H, W, C)`` tensor: linear layers work
on the last dimension, and the 3x3 depthwise convolutions see the same memory
as a channels-last ``(B, C, H, W)`` view, so no layout copy is needed between
the two.

Speed (see docs/benchmarks.md): when no gradient is recorded and autocast is
off, blocks run an in-place path that allocates few large temporaries and
runs the MLP over token chunks; otherwise an autograd-safe path computes the
same values. ``in_proj`` and ``act_proj`` run as one matmul, the attention
normaliser is one small matmul, and the per-head products are strided
``bmm`` calls with no layout copies.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.model import BaseModule
from timm.layers import DropPath, trunc_normal_

from ..checkpoint import load_backbone_weights
from ..registry import register_everywhere

ARCH_SETTINGS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    'tiny': dict(embed_dims=64, depths=(2, 4, 8, 4), num_heads=(2, 4, 8, 16)),
    'small': dict(embed_dims=64, depths=(3, 6, 21, 6), num_heads=(2, 4, 8, 16)),
    'base': dict(embed_dims=96, depths=(3, 6, 21, 6), num_heads=(3, 6, 12, 24)),
}
ARCH_ALIASES = {'t': 'tiny', 's': 'small', 'b': 'base'}


# --------------------------------------------------------------------------
# Small building blocks.
# --------------------------------------------------------------------------
class ConvLayer(nn.Module):
    """Conv2d, then optional BatchNorm2d, then optional ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = True, norm: bool = True,
                 act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(out_channels) if norm else None
        self.act = nn.ReLU(inplace=True) if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that always normalises in float32 (also under autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                                self.bias.float(), self.eps)


def dwconv_bhwc(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a convolution to a ``(B, H, W, C)`` tensor, returning the same layout."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def fast_path(x: torch.Tensor) -> bool:
    """True when nothing is recorded for autograd and autocast is off: in-place work is safe.

    Under ``torch.compile`` the plain out-of-place code is traced instead (the
    in-place path's cached fused weight would make it recompile per block).
    """
    return (not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
            and not is_tracing())


def as_channels_last(x: torch.Tensor) -> torch.Tensor:
    """An NCHW tensor in channels-last memory (no copy when it already is)."""
    return x.contiguous(memory_format=torch.channels_last)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad an NCHW map on the right and bottom to multiples of ``multiple``."""
    pad_h = (-x.shape[2]) % multiple
    pad_w = (-x.shape[3]) % multiple
    if is_tracing() or pad_h or pad_w:  # traced sizes: always pad (by zero or more)
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


class Stem(nn.Module):
    """Overlapping convolutional stem: 3 -> C channels at stride 4."""

    def __init__(self, in_channels: int, embed_dims: int) -> None:
        super().__init__()
        half = embed_dims // 2
        self.conv1 = ConvLayer(in_channels, half, 3, 2, 1, bias=False)
        self.conv2 = nn.Sequential(
            ConvLayer(half, half, 3, 1, 1, bias=False),
            ConvLayer(half, half, 3, 1, 1, bias=False, act=False))
        self.conv3 = nn.Sequential(
            ConvLayer(half, embed_dims * 4, 3, 2, 1, bias=False),
            ConvLayer(embed_dims * 4, embed_dims, 1, bias=False, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, ceil(H/4), ceil(W/4), C)."""
        x = self.conv1(as_channels_last(pad_to_multiple(x, 4)))
        y = self.conv2(x)
        x = y.add_(x) if fast_path(x) else x + y
        return as_channels_last(self.conv3(x)).permute(0, 2, 3, 1)


class Downsample(nn.Module):
    """Inverted-bottleneck downsampling: C -> 2C channels at stride 2."""

    def __init__(self, dim: int, out_dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(out_dim * ratio)
        self.conv = nn.Sequential(
            ConvLayer(dim, hidden, 1, norm=False),
            ConvLayer(hidden, hidden, 3, 2, 1, groups=hidden, norm=False),
            ConvLayer(hidden, out_dim, 1, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        x = as_channels_last(pad_to_multiple(x.permute(0, 3, 1, 2), 2))
        return as_channels_last(self.conv(x)).permute(0, 2, 3, 1)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    def add_residual_(self, x: torch.Tensor, norm: nn.LayerNorm, chunk: int = 4096) -> torch.Tensor:
        """``x += mlp(norm(x))`` in place over token chunks (inference only, no dropout).

        The 4x-wide hidden activations then stay small and cache-resident.
        """
        x2 = x.view(-1, x.shape[-1])
        w2 = self.fc2.weight.t()
        for i in range(0, x2.shape[0], chunk):
            part = x2[i:i + chunk]
            hidden = torch._C._nn.gelu_(F.linear(norm(part), self.fc1.weight, self.fc1.bias))
            part.addmm_(hidden, w2).add_(self.fc2.bias)
        return x


# --------------------------------------------------------------------------
# RoPE and the linear attention.
# --------------------------------------------------------------------------
def is_tracing() -> bool:
    """True under ``torch.jit.trace``, ONNX export, ``torch.compile`` or ``torch.export``.

    Shapes are then symbolic: tables are built from them with tensor ops and
    not cached, and the plain (out-of-place, real-valued) code is recorded.
    """
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def rope_angles(height: int, width: int, dim: int, device: torch.device,
                dtype: torch.dtype = torch.float32, base: float = 10000.) -> torch.Tensor:
    """Rotation angles ``(H, W, dim/2)`` of the 2-D RoPE on an ``(H, W, dim)`` map.

    Pair ``m`` (channels ``2m``, ``2m+1``) rotates by ``row * theta_m`` for
    ``m < dim/4`` and by ``col * theta_(m - dim/4)`` otherwise, with
    ``theta_j = base ** (-j / (dim / 4))``. ``height`` and ``width`` may be
    traced sizes: only tensor ops on them.
    """
    k = dim // 4
    theta = base ** (-torch.arange(k, dtype=dtype, device=device) / k)
    rows = torch.arange(height, dtype=dtype, device=device)[:, None, None] * theta  # (H, 1, K)
    cols = torch.arange(width, dtype=dtype, device=device)[None, :, None] * theta  # (1, W, K)
    return torch.cat([rows.expand(-1, width, -1), cols.expand(height, -1, -1)], dim=-1)


def rope_cos_sin(height: int, width: int, dim: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` tables ``(H, W, dim/2)`` of the 2-D RoPE (see :func:`rope_angles`)."""
    angles = rope_angles(height, width, dim, device, dtype)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(a, b)`` of ``x`` (..., C) to ``(a cos - b sin, b cos + a sin)``.

    Real-valued (no complex tensors), so it traces, exports to ONNX and
    compiles. ``cos``/``sin`` have C/2 entries per position and broadcast
    against ``x``'s leading dimensions with the pair index last.
    """
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


def rope_table(height: int, width: int, dim: int, device: torch.device, base: float = 10000.) -> torch.Tensor:
    """Complex rotations ``(H, W, dim/2)`` (``cos + i sin``) for the in-place inference path. Always complex64."""
    angles = rope_angles(height, width, dim, device, torch.float32, base)
    return torch.polar(torch.ones_like(angles), angles)


class RoPECache:
    """Computes RoPE tables once per (H, W, C, device, dtype, kind) and keeps a few.

    ``kind`` is ``'complex'`` (the in-place path's table) or ``'real'``
    (the ``(cos, sin)`` pair of the autograd path). While tracing, exporting
    or compiling the real tables are built from the (symbolic) sizes on every
    call instead.
    """

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._tables: 'OrderedDict[tuple, object]' = OrderedDict()

    def __call__(self, height: int, width: int, dim: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, kind: str = 'real') -> object:
        if kind == 'real' and is_tracing():
            return rope_cos_sin(height, width, dim, device, dtype)
        key = (height, width, dim, str(device), dtype, kind)
        table = self._tables.get(key)
        if table is None:
            if kind == 'complex':
                table = rope_table(height, width, dim, device)
            else:
                table = rope_cos_sin(height, width, dim, device, dtype)
            self._tables[key] = table
            if len(self._tables) > self.capacity:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return table


class LinearAttention(nn.Module):
    """Linear attention with RoPE and a locally-enhanced positional encoding.

    ``q, k = ELU(qk(x)) + 1``; ``v = x``; per head
    ``out = (RoPE(q) @ (RoPE(k)^T @ v / N)) / (q . mean(k) + 1e-6)``,
    then ``out + lepe(v)``. The attention math runs in float32.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2 or dim % 4:
            raise ValueError(f'dim {dim} must be divisible by 4 and by num_heads {num_heads} '
                             'with an even head size')
        self.dim = dim
        self.num_heads = num_heads
        self.qk = nn.Linear(dim, dim * 2)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C); rope: complex (H, W, C/2) on the in-place path, else (cos, sin). Returns (B, H, W, C)."""
        b, h, w, c = x.shape
        n, heads = h * w, self.num_heads
        d = c // heads
        inplace = fast_path(x)
        qk = self.qk(x)
        with torch.autocast(x.device.type, enabled=False):
            qk = qk if qk.dtype == torch.float32 else qk.float()
            v = (x if x.dtype == torch.float32 else x.float()).view(b, n, c)
            qk = F.elu(qk, inplace=True).add_(1.0) if inplace else F.elu(qk) + 1.0
            # (B, N, C) strided views of q and k; unbind (not slicing or indexing) keeps
            # the backward to one gradient buffer per split.
            q, k = qk.view(b, n, 2, c).unbind(2)
            # z = 1 / (q . mean(k) + eps) per token and head, as one (N, C) x (C, heads) matmul
            # against the block-diagonal matrix of the per-head key means.
            k_mean = k.mean(dim=1)  # (B, C)
            eye = torch.eye(heads, dtype=qk.dtype, device=qk.device)
            k_blk = (k_mean.view(b, heads, d, 1) * eye.view(1, heads, 1, heads)).view(b, c, heads)
            z = torch.bmm(q, k_blk)  # (B, N, heads)
            z = z.add_(1e-6).reciprocal_() if inplace else (z + 1e-6).reciprocal()
            # RoPE on q and k together: (B, H, W, 2, C) with tables (H, W, 1, C/2).
            if inplace:  # complex table, one in-place multiply; q and k are views of qk: rotated too
                torch.view_as_complex(qk.view(b, h, w, 2, c // 2, 2)).mul_(rope[:, :, None])
            else:  # (cos, sin), real-valued
                cos, sin = rope
                qk_r = apply_rope(qk.view(b, h, w, 2, c), cos[:, :, None], sin[:, :, None])
                q, k = qk_r.view(b, n, 2, c).unbind(2)
            outs = []
            out = torch.empty(b, n, c, dtype=qk.dtype, device=qk.device) if inplace else None
            for i, (q_b, k_b, v_b) in enumerate(zip(q.unbind(0), k.unbind(0), v.unbind(0))):
                # (heads, N, d) strided views of (N, C) rows: bmm reads them without copies.
                q_i = q_b.view(n, heads, d).transpose(0, 1)
                k_i = k_b.view(n, heads, d).transpose(0, 1)
                v_i = v_b.view(n, heads, d).transpose(0, 1)
                kv = torch.bmm(k_i.transpose(1, 2), v_i)  # (heads, d, d)
                kv = kv.mul_(1.0 / n) if inplace else kv * (1.0 / n)
                if inplace:
                    torch.bmm(q_i, kv, out=out[i].view(n, heads, d).transpose(0, 1))
                else:
                    outs.append(torch.bmm(q_i, kv).transpose(0, 1))  # (N, heads, d)
            if inplace:
                out = out.view(b, n, heads, d).mul_(z.unsqueeze(-1))
            else:
                out = torch.stack(outs) * z.unsqueeze(-1)
            out = out.reshape(b, h, w, c)  # a view in eager mode
        lepe = dwconv_bhwc(self.lepe, x)
        if inplace:
            return lepe.add_(out)
        return out.to(x.dtype) + lepe

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}'


# --------------------------------------------------------------------------
# The MLLA block and a stage.
# --------------------------------------------------------------------------
class MLLABlock(nn.Module):
    """One MLLA block on a ``(B, H, W, C)`` map."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., drop: float = 0.,
                 drop_path: float = 0.) -> None:
        super().__init__()
        self.dim = dim
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = LayerNorm(dim)
        self.in_proj = nn.Linear(dim, dim)
        self.act_proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.attn = LinearAttention(dim, num_heads)
        self.out_proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self._fused_in_act: Optional[tuple] = None

    def in_act_proj(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``in_proj(y), act_proj(y)`` as one matmul; the fused weight is cached when no grad is needed."""
        if torch.is_grad_enabled() or is_tracing():
            weight = torch.cat([self.in_proj.weight, self.act_proj.weight])
            bias = torch.cat([self.in_proj.bias, self.act_proj.bias])
        else:
            params = (self.in_proj.weight, self.act_proj.weight, self.in_proj.bias, self.act_proj.bias)
            key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
            cached = self._fused_in_act
            if cached is None or cached[0] != key:
                cached = (key, torch.cat(params[:2]), torch.cat(params[2:]))
                self._fused_in_act = cached
            weight, bias = cached[1], cached[2]
        both = F.linear(y, weight, bias)
        # unbind, not two slices: its backward writes both gradients into one buffer.
        y_in, y_act = both.unflatten(-1, (2, self.dim)).unbind(-2)
        return y_in, y_act

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        if fast_path(x) and not self.training:
            return self._forward_inplace(x, rope)
        x = x + dwconv_bhwc(self.cpe1, x)
        shortcut = x
        y, gate = self.in_act_proj(self.norm1(x))
        gate = F.silu(gate)
        y = F.silu(dwconv_bhwc(self.dwc, y))
        y = self.attn(y, rope)
        x = shortcut + self.drop_path(self.out_proj(y * gate))
        x = x + dwconv_bhwc(self.cpe2, x)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _forward_inplace(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """The same computation with few large temporaries (no autograd, no autocast)."""
        x = dwconv_bhwc(self.cpe1, x).add_(x).contiguous()
        y, gate = self.in_act_proj(self.norm1(x))
        y = self.attn(F.silu(dwconv_bhwc(self.dwc, y), inplace=True), rope)
        y.mul_(F.silu(gate, inplace=True))
        x2 = x.view(-1, self.dim)
        x2.addmm_(y.view(-1, self.dim), self.out_proj.weight.t()).add_(self.out_proj.bias)
        x = dwconv_bhwc(self.cpe2, x).add_(x).contiguous()
        return self.mlp.add_residual_(x, self.norm2)


@contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers in ``module`` normalise as usual but leave their running statistics alone."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            tracked = None if m.num_batches_tracked is None else m.num_batches_tracked.clone()
            saved.append((m, m.momentum, tracked))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def needs_checkpoint(module: nn.Module, x: torch.Tensor) -> bool:
    """True when ``module(x)`` would record a graph worth checkpointing."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def checkpoint_module(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """``module(*args)`` with activation checkpointing.

    The recomputation in the backward pass runs with frozen BatchNorm
    statistics, so running means and variances are updated once per step, as
    without checkpointing (random draws such as drop-path are replayed by
    ``torch.utils.checkpoint``).
    """
    calls = [0]

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:
            return module(*inputs)
        with frozen_bn_stats(module):
            return module(*inputs)

    return cp.checkpoint(run, *args, use_reentrant=False)


class MLLAStage(nn.Module):
    """``depth`` MLLA blocks, then (except for the last stage) a downsample."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, drop: float,
                 drop_path: Sequence[float], downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            MLLABlock(dim, num_heads, mlp_ratio, drop, drop_path[i]) for i in range(depth))
        self.downsample = Downsample(dim, dim * 2) if downsample else None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, with_cp: bool = False) -> torch.Tensor:
        for blk in self.blocks:
            if with_cp and needs_checkpoint(blk, x):
                x = checkpoint_module(blk, x, rope)
            else:
                x = blk(x, rope)
        return x


# --------------------------------------------------------------------------
# The backbone.
# --------------------------------------------------------------------------
def resolve_arch(arch: Union[str, dict]) -> Dict[str, Tuple[int, ...]]:
    """Turn an arch name or dict into ``embed_dims``, ``depths``, ``num_heads``."""
    choices = sorted(ARCH_SETTINGS) + sorted(ARCH_ALIASES)
    if isinstance(arch, str):
        name = ARCH_ALIASES.get(arch.lower(), arch.lower())
        if name not in ARCH_SETTINGS:
            raise ValueError(f'MLLA: unknown arch {arch!r}; choose one of {choices} '
                             'or give a dict with embed_dims, depths and num_heads')
        return dict(ARCH_SETTINGS[name])
    if not isinstance(arch, dict):
        raise ValueError(f'MLLA: arch must be one of {choices} or a dict, got {type(arch).__name__}')
    need = {'embed_dims', 'depths', 'num_heads'}
    if set(arch) != need:
        raise ValueError(f'MLLA: an arch dict needs exactly the keys {sorted(need)}, got {sorted(arch)}')
    depths, heads, dims = tuple(arch['depths']), tuple(arch['num_heads']), arch['embed_dims']
    if (not isinstance(dims, int) or dims <= 0 or len(depths) != 4 or len(heads) != 4
            or any(not isinstance(v, int) or v <= 0 for v in depths + heads)):
        raise ValueError('MLLA: arch dict must have a positive int embed_dims and four positive ints '
                         f'in depths and num_heads, got {arch}')
    for i, h in enumerate(heads):
        c = dims * 2**i
        if c % h or (c // h) % 2 or c % 4 or dims % 2:
            raise ValueError(f'MLLA: stage {i} has {c} channels, which must split into {h} heads '
                             'of even size (and embed_dims must be even)')
    return dict(embed_dims=dims, depths=depths, num_heads=heads)


@register_everywhere
class MLLA(BaseModule):
    """MLLA backbone returning NCHW feature maps at strides 4, 8, 16, 32.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` (or ``'t'``, ``'s'``, ``'b'``),
            or a dict with ``embed_dims``, ``depths`` and ``num_heads``.
        mlp_ratio: Hidden size of the MLPs relative to the channels.
        drop_rate: Dropout in the MLPs.
        drop_path_rate: Stochastic depth, rising linearly over all blocks.
        out_indices: Stages whose (normalised) output is returned.
        frozen_stages: Freeze the stem and stages ``0..frozen_stages-1``;
            -1 freezes nothing.
        norm_eval: Keep BatchNorm layers in eval mode while training.
        with_cp: Activation checkpointing when gradients are needed: each
            block, the stem and each downsample layer keep only their input
            and recompute the rest in the backward pass (BatchNorm
            statistics are still updated once per step).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads any
            supported checkpoint layout (optional keys: ``strict=True``,
            ``use_ema=False``, ``trusted=None``, ``if_missing='error'|'warn'``).
    """

    def __init__(self, arch: Union[str, dict] = 'tiny', mlp_ratio: float = 4., drop_rate: float = 0.,
                 drop_path_rate: float = 0.1, out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1, norm_eval: bool = False, with_cp: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        settings = resolve_arch(arch)
        if init_cfg is not None and not isinstance(init_cfg, dict):
            raise ValueError(f'MLLA: init_cfg must be a dict or None, got {init_cfg!r}')
        super().__init__(init_cfg=init_cfg)
        self.embed_dims: int = settings['embed_dims']
        self.depths: Tuple[int, ...] = settings['depths']
        self.num_heads: Tuple[int, ...] = settings['num_heads']
        num_stages = len(self.depths)
        out_indices = tuple(out_indices) if isinstance(out_indices, (list, tuple)) else (out_indices, )
        if not out_indices or any(not isinstance(i, int) or not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f'MLLA: out_indices must be stage indices in 0..{num_stages - 1}, got {out_indices}')
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'MLLA: frozen_stages must be an int in -1..{num_stages}, got {frozen_stages}')
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.channels = [self.embed_dims * 2**i for i in range(num_stages)]
        self.strides = [4 * 2**i for i in range(num_stages)]

        self.patch_embed = Stem(3, self.embed_dims)
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            start = sum(self.depths[:i])
            stage = MLLAStage(self.channels[i], self.depths[i], self.num_heads[i], mlp_ratio, drop_rate,
                              dpr[start:start + self.depths[i]], downsample=i < num_stages - 1)
            self.layers.append(stage)
        for i in out_indices:
            self.add_module(f'norm{i}', LayerNorm(self.channels[i]))
        self._rope = RoPECache()
        self.apply(self._init_module)
        self._freeze_stages()

    # -- feature-pyramid description ---------------------------------------
    @property
    def feature_info(self) -> List[Dict[str, Union[int, str]]]:
        """Channels, stride and module name of each returned map."""
        return [dict(num_chs=self.channels[i], reduction=self.strides[i], module=f'norm{i}')
                for i in self.out_indices]

    # -- initialisation ----------------------------------------------------
    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def init_weights(self) -> None:
        """Load ``init_cfg`` weights (any supported layout) or keep the from-scratch init."""
        cfg = self.init_cfg
        if not (isinstance(cfg, dict) and cfg.get('type') == 'Pretrained'):
            super().init_weights()
            return
        cfg = dict(cfg)
        cfg.pop('type')
        path = cfg.pop('checkpoint', None)
        if_missing = cfg.pop('if_missing', 'error')
        strict = cfg.pop('strict', True)
        use_ema = cfg.pop('use_ema', False)
        trusted = cfg.pop('trusted', None)
        cfg.pop('map_location', None)
        cfg.pop('prefix', None)
        if cfg:
            raise ValueError(f'MLLA: unknown init_cfg keys {sorted(cfg)}; allowed: checkpoint, strict, '
                             'use_ema, trusted, if_missing')
        if not path:
            raise ValueError("MLLA: init_cfg type 'Pretrained' needs a checkpoint path")
        if if_missing == 'warn' and not os.path.isfile(os.path.expanduser(path)):
            print_log(f'MLLA: pretrained checkpoint {path} not found; the backbone is RANDOMLY '
                      f'initialised. Put the published ImageNet weights at {path} (or set '
                      'model.backbone.init_cfg.checkpoint) to fine-tune from them.', logger='current',
                      level=30)
        else:
            load_backbone_weights(
                self, os.path.expanduser(path), strict=strict, use_ema=use_ema, trusted=trusted,
                optional=lambda k: k.split('.')[0] in {f'norm{i}' for i in self.out_indices},
                log=lambda msg: print_log('MLLA: ' + msg, logger='current'))
        self._is_init = True

    # -- freezing ------------------------------------------------------------
    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        mods: List[nn.Module] = [self.patch_embed]
        for i in range(self.frozen_stages):
            mods.append(self.layers[i])
            if i in self.out_indices:
                mods.append(getattr(self, f'norm{i}'))
        return mods

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> 'MLLA':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # -- forward -------------------------------------------------------------
    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The stem or a downsample layer, checkpointed under ``with_cp``."""
        if self.with_cp and needs_checkpoint(module, x):
            return checkpoint_module(module, x)
        return module(x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, 3, H, W) -> tuple of (B, C_i, ceil(H/2^(i+2)), ...) for ``out_indices``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'MLLA expects images of shape (B, 3, H, W), got {shape}')
        if x.shape[2] < 1 or x.shape[3] < 1 or x.shape[0] < 1:
            raise ValueError(f'MLLA expects a non-empty batch with H, W >= 1, got {tuple(x.shape)}')
        x = self._run(self.patch_embed, x)
        outs = []
        for i, stage in enumerate(self.layers):
            _, h, w, c = x.shape
            kind = 'complex' if fast_path(x) else 'real'  # what LinearAttention will use
            rope = self._rope(h, w, c, x.device, torch.promote_types(x.dtype, torch.float32), kind)
            x = stage(x, rope, with_cp=self.with_cp)
            if i in self.out_indices:
                outs.append(getattr(self, f'norm{i}')(x).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None and i < max(self.out_indices):
                x = self._run(stage.downsample, x)
            elif i >= max(self.out_indices):
                break
        return tuple(outs)


__all__ = ['MLLA', 'MLLABlock', 'LinearAttention', 'rope_table', 'rope_cos_sin', 'apply_rope', 'resolve_arch', 'ARCH_SETTINGS']
