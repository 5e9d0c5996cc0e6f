"""MLLA: the Mamba-Like Linear Attention backbone, written as its maths.

"Demystify Mamba in Vision: A Linear Attention Perspective" (NeurIPS 2024);
the facts it is built from are in ``docs`` of the shared spec (mlla-spec.md).

Where things live:

* this file: the model, one autograd implementation that reads like the
  paper. Building blocks from small to large (``ConvLayer``, ``LayerNorm``,
  ``Stem``, ``Downsample``, ``Mlp``, the real-valued ``RoPE``,
  ``LinearAttention``, ``MLLABlock``), then ``MLLAStage``, then the ``MLLA``
  backbone for mmdet/mmseg and its registration. It trains, checkpoints
  (``with_cp``), runs under autocast, and traces, exports to ONNX and
  compiles (no complex tensors, no in-place tricks, sizes only through
  tensor ops while tracing).
* :mod:`mlla_mm.models.fast_inference`: the same numbers for inference, in
  place, chunked and fused. ``MLLAStage.forward`` is the one place that
  chooses it, by the one rule ``use_fast_inference(stage, x)`` (eval mode,
  no gradients, no autocast, not tracing).
* :mod:`mlla_mm.models.mlla_reference`: a slow, independent implementation
  from the spec that the tests check both against.

Parameter names are the published ones, so published checkpoints load
without renaming. Tokens are kept as a ``(B, H, W, C)`` tensor: linear layers
work on the last dimension, and the 3x3 depthwise convolutions see the same
memory as a channels-last ``(B, C, H, W)`` view, so no layout copy is needed
between the two.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.model import BaseModule
from timm.layers import DropPath, trunc_normal_

from ..checkpoint import load_backbone_weights
from ..registry import register_everywhere
from . import fast_inference
from .fast_inference import is_tracing, use_fast_inference

ARCH_SETTINGS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    'tiny': dict(embed_dims=64, depths=(2, 4, 8, 4), num_heads=(2, 4, 8, 16)),
    'small': dict(embed_dims=64, depths=(3, 6, 21, 6), num_heads=(2, 4, 8, 16)),
    'base': dict(embed_dims=96, depths=(3, 6, 21, 6), num_heads=(3, 6, 12, 24)),
}
ARCH_ALIASES = {'t': 'tiny', 's': 'small', 'b': 'base'}


# --------------------------------------------------------------------------
# Layers and layout helpers.
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
    """``nn.LayerNorm`` that normalises in float32 at least (also under autocast; float64 stays)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        if x.dtype == dtype == self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype),
                                self.bias.to(dtype), self.eps)


def dwconv_bhwc(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a convolution to a ``(B, H, W, C)`` tensor (a channels-last NCHW view), same layout out."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


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


def attention_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the attention maths runs in: float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------
# Stem, downsample and MLP.
# --------------------------------------------------------------------------
class Stem(nn.Module):
    """Overlapping convolutional stem ``patch_embed``: 3 -> C channels at stride 4."""

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
        x = x + self.conv2(x)
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
    """fc1 -> exact GELU -> fc2, with dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


# --------------------------------------------------------------------------
# RoPE (real-valued) and the linear attention.
# --------------------------------------------------------------------------
def rope_angles(height: int, width: int, dim: int, device: torch.device,
                dtype: torch.dtype = torch.float32, base: float = 10000.) -> torch.Tensor:
    """Rotation angles ``(H, W, dim/2)`` of the 2-D RoPE on an ``(H, W, dim)`` map.

    Pair ``m`` (channels ``2m``, ``2m+1``) rotates by ``row * theta_m`` for
    ``m < dim/4`` and by ``col * theta_(m - dim/4)`` otherwise, with
    ``theta_j = base ** (-j / (dim / 4))``. ``height`` and ``width`` may be
    traced sizes: they only enter tensor ops.
    """
    k = dim // 4
    theta = base ** (-torch.arange(k, dtype=dtype, device=device) / k)
    rows = torch.arange(height, dtype=dtype, device=device)[:, None, None] * theta  # (H, 1, K)
    cols = torch.arange(width, dtype=dtype, device=device)[None, :, None] * theta  # (1, W, K)
    return torch.cat([rows.expand(-1, width, -1), cols.expand(height, -1, -1)], dim=-1)


def rope_cos_sin(height: int, width: int, dim: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, base: float = 10000.) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` tables ``(H, W, dim/2)`` of the 2-D RoPE (see :func:`rope_angles`)."""
    angles = rope_angles(height, width, dim, device, dtype, base)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs ``(a, b)`` of ``x`` (..., C) to ``(a cos - b sin, b cos + a sin)``.

    ``cos`` and ``sin`` hold C/2 values per position (pair index last) and
    broadcast against ``x``'s leading dimensions. Real-valued, so it traces,
    exports and compiles.
    """
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


class RoPE(nn.Module):
    """The 2-D RoPE tables of one stage (``dim`` channels), cached per size.

    The tables depend only on ``(H, W, dim)``, so they are computed for the
    actual input, once per ``(H, W, device, dtype)``, and the last
    ``capacity`` are kept (no parameters, no buffers: nothing in the state
    dict). While tracing, exporting or compiling they are built from the
    traced sizes on every call instead, so an exported graph serves any size.
    """

    def __init__(self, dim: int, base: float = 10000., capacity: int = 4) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f'RoPE: dim must be divisible by 4, got {dim}')
        self.dim, self.base, self.capacity = dim, base, capacity
        self._cache: 'OrderedDict[tuple, object]' = OrderedDict()

    def build(self, height: int, width: int, device: torch.device,
              dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` for an ``(H, W)`` map, computed afresh."""
        return rope_cos_sin(height, width, self.dim, device, dtype, self.base)

    def cached(self, key: tuple, build: Callable[[], object]) -> object:
        """``build()`` once per ``key`` (least recently used entries are dropped)."""
        value = self._cache.get(key)
        if value is None:
            value = build()
            self._cache[key] = value
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return value

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``(H, W, dim/2)``, for tokens ``x`` (B, H, W, dim)."""
        _, h, w, _ = x.shape
        dtype = attention_dtype(x.dtype)
        if is_tracing():
            return self.build(h, w, x.device, dtype)
        return self.cached(('cos_sin', h, w, x.device, dtype), lambda: self.build(h, w, x.device, dtype))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, base={self.base:g}'


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, heads, H*W, C/heads): head ``i`` is channels ``i*d .. (i+1)*d - 1``."""
    b, h, w, c = x.shape
    return x.reshape(b, h * w, heads, c // heads).transpose(1, 2)


class LinearAttention(nn.Module):
    """Linear attention with RoPE and a locally-enhanced positional encoding (LePE).

    ``q, k = ELU(qk(x)) + 1``; ``v = x`` (no value projection); per head of
    ``d`` channels ``out = (RoPE(q) @ (RoPE(k)^T @ v / N)) * z`` with
    ``z = 1 / (q . mean(k) + 1e-6)``; then ``out + lepe(v)``. The attention
    maths runs in float32 (float64 for a float64 model), also under autocast.
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C); cos, sin: RoPE tables (H, W, C/2). Returns (B, H, W, C)."""
        b, h, w, c = x.shape
        n, heads = h * w, self.num_heads
        qk = self.qk(x)
        with torch.autocast(x.device.type, enabled=False):
            qk = (F.elu(qk.to(cos.dtype)) + 1.0).view(b, h, w, 2, c)  # (B, H, W, 2, C) q, k; view: traced sizes (ONNX)
            v = x.to(cos.dtype)
            # RoPE on q and k together, tables (H, W, 1, C/2); unbind (not slicing) keeps the
            # backward of each split to one gradient buffer.
            q_r, k_r = apply_rope(qk, cos[:, :, None], sin[:, :, None]).unbind(-2)
            q, k = qk.unbind(-2)
            q, k, v, q_r, k_r = (split_heads(t, heads) for t in (q, k, v, q_r, k_r))  # (B, heads, N, d)
            z = 1.0 / (q @ k.mean(dim=2).unsqueeze(-1) + 1e-6)  # (B, heads, N, 1)
            kv = (k_r.transpose(-2, -1) @ v) * (1.0 / n)  # (B, heads, d, d): (k_r^T / sqrt N)(v / sqrt N)
            out = (q_r @ kv) * z
            out = out.transpose(1, 2).reshape(b, h, w, c)
        return out.to(x.dtype) + dwconv_bhwc(self.lepe, x)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}'


# --------------------------------------------------------------------------
# The MLLA block.
# --------------------------------------------------------------------------
class MLLABlock(nn.Module):
    """One MLLA block on a ``(B, H, W, C)`` map (spec item 3, line by line)."""

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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C); cos, sin: the stage's RoPE tables. Returns (B, H, W, C)."""
        x = x + dwconv_bhwc(self.cpe1, x)
        shortcut = x
        y = self.norm1(x)
        gate = F.silu(self.act_proj(y))
        y = F.silu(dwconv_bhwc(self.dwc, self.in_proj(y)))
        y = self.attn(y, cos, sin)
        x = shortcut + self.drop_path(self.out_proj(y * gate))
        x = x + dwconv_bhwc(self.cpe2, x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


# --------------------------------------------------------------------------
# Activation checkpointing.
# --------------------------------------------------------------------------
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


# --------------------------------------------------------------------------
# A stage.
# --------------------------------------------------------------------------
class MLLAStage(nn.Module):
    """``depth`` MLLA blocks sharing one RoPE table, then (except in the last stage) a downsample.

    ``forward`` runs the blocks only: the pyramid takes its feature map
    between the blocks and ``downsample``, which the caller runs.
    ``grad_checkpointing`` checkpoints each block when gradients are needed.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4., drop: float = 0.,
                 drop_path: Union[float, Sequence[float]] = 0., downsample: bool = True) -> None:
        super().__init__()
        drop_path = [drop_path] * depth if isinstance(drop_path, (int, float)) else list(drop_path)
        self.dim = dim
        self.rope = RoPE(dim)
        self.blocks = nn.ModuleList(
            MLLABlock(dim, num_heads, mlp_ratio, drop, drop_path[i]) for i in range(depth))
        self.downsample = Downsample(dim, dim * 2) if downsample else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C) through the blocks."""
        if use_fast_inference(self, x):  # the only place where the inference path is chosen
            return fast_inference.forward_blocks(self, x)
        cos, sin = self.rope(x)
        for blk in self.blocks:
            if self.grad_checkpointing and needs_checkpoint(blk, x):
                x = checkpoint_module(blk, x, cos, sin)
            else:
                x = blk(x, cos, sin)
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


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_hyperparameters(embed_dims: int, mlp_ratio: float, drop_rate: float, drop_path_rate: float) -> None:
    """ValueError naming the argument and the expected range for an out-of-range rate or ratio."""
    for name, value in (('drop_rate', drop_rate), ('drop_path_rate', drop_path_rate)):
        if not _is_number(value) or not 0 <= value < 1:
            raise ValueError(f'MLLA: {name} must be a number in [0, 1), got {value!r}')
    if not _is_number(mlp_ratio) or mlp_ratio <= 0:
        raise ValueError(f'MLLA: mlp_ratio must be a number > 0, got {mlp_ratio!r}')
    if int(embed_dims * mlp_ratio) < 1:
        raise ValueError(f'MLLA: mlp_ratio {mlp_ratio!r} leaves no MLP channels at embed_dims {embed_dims} '
                         f'(need embed_dims * mlp_ratio >= 1)')


def check_images(x: object) -> None:
    """ValueError unless ``x`` is a non-empty ``(B, 3, H, W)`` tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'MLLA expects images of shape (B, 3, H, W), got {shape}')
    if x.shape[2] < 1 or x.shape[3] < 1 or x.shape[0] < 1:
        raise ValueError(f'MLLA expects a non-empty batch with H, W >= 1, got {tuple(x.shape)}')


INIT_CFG_KEYS = ('checkpoint', 'prefix', 'map_location', 'strict', 'use_ema', 'trusted', 'if_missing')


@register_everywhere
class MLLA(BaseModule):
    """MLLA backbone returning NCHW feature maps at strides 4, 8, 16, 32.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` (or ``'t'``, ``'s'``, ``'b'``),
            or a dict with ``embed_dims``, ``depths`` and ``num_heads``.
        mlp_ratio: Hidden size of the MLPs relative to the channels (> 0).
        drop_rate: Dropout in the MLPs, in [0, 1).
        drop_path_rate: Stochastic depth, rising linearly over all blocks
            from 0 to this value, in [0, 1).
        out_indices: Stages whose (normalised) output is returned.
        frozen_stages: Freeze the stem and stages ``0..frozen_stages-1``;
            -1 freezes nothing.
        norm_eval: Keep BatchNorm layers in eval mode while training.
        with_cp: Activation checkpointing when gradients are needed: each
            block, the stem and each downsample layer keep only their input
            and recompute the rest in the backward pass (BatchNorm
            statistics are still updated once per step).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads any
            supported checkpoint layout. Optional keys: ``prefix`` (take only
            the weights under this prefix, e.g. ``'backbone.'`` of a whole
            detector, and strip it, as in mmengine's ``PretrainedInit``),
            ``map_location`` (as in ``torch.load``; default ``'cpu'``),
            ``strict=True``, ``use_ema=False``, ``trusted=None``,
            ``if_missing='error'|'warn'``.
    """

    def __init__(self, arch: Union[str, dict] = 'tiny', mlp_ratio: float = 4., drop_rate: float = 0.,
                 drop_path_rate: float = 0.1, out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1, norm_eval: bool = False, with_cp: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        settings = resolve_arch(arch)
        check_hyperparameters(settings['embed_dims'], mlp_ratio, drop_rate, drop_path_rate)
        if init_cfg is not None and not isinstance(init_cfg, dict):
            raise ValueError(f'MLLA: init_cfg must be a dict or None, got {init_cfg!r}')
        for name, value in (('norm_eval', norm_eval), ('with_cp', with_cp)):
            if not isinstance(value, bool):
                raise ValueError(f'MLLA: {name} must be True or False, got {value!r}')
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
        self.channels = [self.embed_dims * 2**i for i in range(num_stages)]
        self.strides = [4 * 2**i for i in range(num_stages)]

        self.patch_embed = Stem(3, self.embed_dims)
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            start = sum(self.depths[:i])
            self.layers.append(MLLAStage(self.channels[i], self.depths[i], self.num_heads[i], mlp_ratio,
                                         drop_rate, dpr[start:start + self.depths[i]],
                                         downsample=i < num_stages - 1))
        for i in out_indices:
            self.add_module(f'norm{i}', LayerNorm(self.channels[i]))
        self.with_cp = with_cp
        self.apply(self._init_module)
        self._freeze_stages()

    # -- options -------------------------------------------------------------
    @property
    def with_cp(self) -> bool:
        """Activation checkpointing of the stem, every block and every downsample layer."""
        return self._with_cp

    @with_cp.setter
    def with_cp(self, enable: bool) -> None:
        self._with_cp = bool(enable)
        for stage in self.layers:
            stage.grad_checkpointing = self._with_cp

    @property
    def feature_info(self) -> List[Dict[str, Union[int, str]]]:
        """Channels, stride and module name of each returned map."""
        return [dict(num_chs=self.channels[i], reduction=self.strides[i], module=f'norm{i}')
                for i in self.out_indices]

    # -- initialisation ------------------------------------------------------
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
        unknown = sorted(set(cfg) - set(INIT_CFG_KEYS))
        if unknown:
            raise ValueError(f'MLLA: unknown init_cfg keys {unknown}; allowed: type, {", ".join(INIT_CFG_KEYS)}')
        path = cfg.get('checkpoint')
        if not path:
            raise ValueError("MLLA: init_cfg type 'Pretrained' needs a checkpoint path")
        path = os.path.expanduser(path)
        if cfg.get('if_missing', 'error') == 'warn' and not os.path.isfile(path):
            print_log(f'MLLA: pretrained checkpoint {path} not found; the backbone is RANDOMLY '
                      f'initialised. Put the published ImageNet weights at {path} (or set '
                      'model.backbone.init_cfg.checkpoint) to fine-tune from them.', logger='current',
                      level=30)
        else:
            load_backbone_weights(
                self, path, strict=cfg.get('strict', True), use_ema=cfg.get('use_ema', False),
                trusted=cfg.get('trusted'), prefix=cfg.get('prefix'),
                map_location=cfg.get('map_location', 'cpu'),
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
    def _checkpointed(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The stem or a downsample layer, checkpointed under ``with_cp``."""
        if self.with_cp and needs_checkpoint(module, x):
            return checkpoint_module(module, x)
        return module(x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, 3, H, W) -> tuple of (B, C_i, ceil(H/2^(i+2)), ...) for ``out_indices``."""
        if not is_tracing():  # (traced sizes would be frozen into the graph by these checks)
            check_images(x)
        x = self._checkpointed(self.patch_embed, x)
        last = max(self.out_indices)
        outs = []
        for i, stage in enumerate(self.layers[:last + 1]):
            x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f'norm{i}')(x).permute(0, 3, 1, 2).contiguous())
            if i < last:
                x = self._checkpointed(stage.downsample, x)
        return tuple(outs)


__all__ = ['MLLA', 'MLLAStage', 'MLLABlock', 'LinearAttention', 'RoPE', 'Mlp', 'Stem', 'Downsample',
           'rope_cos_sin', 'apply_rope', 'resolve_arch', 'ARCH_SETTINGS']
