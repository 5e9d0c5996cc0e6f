"""MLLA: the Mamba-Like Linear Attention backbone, written as its maths.

"Demystify Mamba in Vision: A Linear Attention Perspective" (NeurIPS 2024).
"Spec item N" below refers to the numbered list in mlla-spec.md ("What the
backbone computes"), the description of the published model this was built from.

Where things live:

* this file: the model, one autograd implementation that reads like the
  paper. Building blocks from small to large (``ConvLayer``, ``LayerNorm``,
  ``Stem``, ``Downsample``, ``Mlp``, the real-valued ``RoPE``,
  ``LinearAttention``, ``MLLABlock``), then ``MLLAStage``, then the ``MLLA``
  backbone for mmdet/mmseg and its registration, then the timm ImageNet
  classifier ``MLLAClassifier`` built from the same stem and stages, its
  checkpoint filter and the ``mlla_tiny/small/base`` constructors registered
  with timm (``timm.create_model('mlla_tiny')`` after ``import mlla_mm``;
  see docs/timm.md). It trains, checkpoints
  (``with_cp``), runs under autocast, and traces, exports to ONNX and
  compiles (no complex tensors, no in-place tricks, sizes only through
  tensor ops while tracing).
* :mod:`mlla_mm.models.fast_inference`: the same numbers for inference, in
  place, chunked and fused, in bands of rows. ``MLLAStage.forward`` (and
  ``Stem`` and ``Downsample``) choose it by the one rule
  ``use_fast_inference(module, x)`` (the model's switch, set when it is
  built from ``MLLA_MM_FAST_INFERENCE`` and changed by
  ``model.set_fast_inference()``; eval mode, no gradients, not tracing;
  under autocast it runs in the autocast dtype, bf16 on the CPU).
* :mod:`mlla_mm.models.mlla_reference`: a slow, independent implementation
  from the spec that the tests check both against.

Parameter names are the published ones, so published checkpoints load
without renaming. Tokens are kept as a ``(B, H, W, C)`` tensor: linear layers
work on the last dimension, and the 3x3 depthwise convolutions see the same
memory as a channels-last ``(B, C, H, W)`` view, so no layout copy is needed
between the two.
"""
from __future__ import annotations

import contextvars
import logging
import math
import os
import re
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.model import BaseModule
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, SelectAdaptivePool2d, get_device_dtype, register_notrace_module, trunc_normal_
from timm.models import (adapt_input_conv, build_model_with_cfg, generate_default_cfgs, register_model,
                         resolve_pretrained_cfg)
from timm.models._features import feature_take_indices

from ..checkpoint import CheckpointError, compare_state_dicts, find_state_dict, load_backbone_weights, load_file
from ..registry import register_everywhere
from . import fast_inference
from .ops import (as_channels_last, attention_dtype, dwconv_bhwc, fast_inference_default, is_tracing,
                  pad_to_multiple, set_fast_inference, use_fast_inference)

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
    """Conv2d, then optional BatchNorm2d, then optional ReLU.

    ``float32_under_autocast``: the convolution runs in float32 even under
    autocast. Set for the strided depthwise convolution of ``Downsample``,
    whose bf16 backward on the CPU (oneDNN) was 6-11x slower than float32's
    (docs/benchmarks.md, "bf16 on AMX").
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = True, norm: bool = True,
                 act: bool = True, float32_under_autocast: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(out_channels) if norm else None
        self.act = nn.ReLU(inplace=True) if act else None
        self.float32_under_autocast = float32_under_autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float32_under_autocast and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                x = self.conv(x.to(torch.promote_types(self.conv.weight.dtype, torch.float32)))
        else:
            x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


@register_notrace_module  # a leaf for timm's FX feature extraction (autocast check inside)
class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that normalises in float32 at least (also under autocast; float64 stays).

    Under autocast the result is float32, or, with ``bf16_out_under_autocast``
    (the blocks' ``norm1`` and ``norm2``, whose outputs go straight into bf16
    linear layers), a bf16 input is normalised by PyTorch's mixed-dtype kernel
    (float32 statistics and affine map, bf16 result): two conversion passes
    fewer. Otherwise the result is in the input's dtype, so a model converted
    with ``.bfloat16()`` runs end to end.
    """

    def __init__(self, *args: Any, bf16_out_under_autocast: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bf16_out_under_autocast = bf16_out_under_autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        autocast = torch.is_autocast_enabled(x.device.type)
        if (autocast and self.bf16_out_under_autocast and x.dtype == torch.bfloat16
                and self.weight.dtype == torch.float32):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if x.dtype == dtype == self.weight.dtype and not autocast:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        with torch.autocast(x.device.type, enabled=False):
            y = F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype),
                             self.bias.to(dtype), self.eps)
        return y if autocast else y.to(x.dtype)


# --------------------------------------------------------------------------
# Stem, downsample and MLP.
# --------------------------------------------------------------------------
@register_notrace_module  # a leaf for timm's FX feature extraction (shape-dependent code inside)
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
        self.fast_inference = fast_inference_default()  # the switch (ops.py); the rule: use_fast_inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, ceil(H/4), ceil(W/4), C)."""
        if use_fast_inference(self, x):  # in bands of rows (fast_inference.py)
            return fast_inference.stem_forward(self, x)
        x = self.conv1(as_channels_last(pad_to_multiple(x, 4)))
        x = x + self.conv2(x)
        return as_channels_last(self.conv3(x)).permute(0, 2, 3, 1)


@register_notrace_module  # a leaf for timm's FX feature extraction (shape-dependent code inside)
class Downsample(nn.Module):
    """Inverted-bottleneck downsampling: C -> 2C channels at stride 2."""

    def __init__(self, dim: int, out_dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(out_dim * ratio)
        self.conv = nn.Sequential(
            ConvLayer(dim, hidden, 1, norm=False),
            ConvLayer(hidden, hidden, 3, 2, 1, groups=hidden, norm=False, float32_under_autocast=True),
            ConvLayer(hidden, out_dim, 1, act=False))
        self.fast_inference = fast_inference_default()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        if use_fast_inference(self, x):  # in bands of rows (fast_inference.py)
            return fast_inference.downsample_forward(self, x)
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

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The published checkpoints carry each block's fixed 224-input RoPE table
        # (``attn.rope.rotations``); RoPE is computed for the actual input size, so the table is dropped
        # on every load path (``load_state_dict``, timm's ``checkpoint_path=``), not only by the filters.
        state_dict.pop(prefix + 'rope.rotations', None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        self.norm1 = LayerNorm(dim, bf16_out_under_autocast=True)
        self.in_proj = nn.Linear(dim, dim)
        self.act_proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.attn = LinearAttention(dim, num_heads)
        self.out_proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = LayerNorm(dim, bf16_out_under_autocast=True)
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
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    if not has_bn:
        return cp.checkpoint(module, *args, use_reentrant=False)
    if torch.compiler.is_compiling():
        # torch.compile cannot checkpoint BatchNorm's in-place statistics update (nor take
        # context_fn): under it the stem and the downsample layers run without checkpointing.
        return module(*args)
    # The forward runs as usual; the recomputation runs under the second context.
    return cp.checkpoint(module, *args, use_reentrant=False,
                         context_fn=lambda: (nullcontext(), frozen_bn_stats(module)))


# --------------------------------------------------------------------------
# A stage.
# --------------------------------------------------------------------------
@register_notrace_module  # a leaf for timm's FX feature extraction (shape-dependent code inside)
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
        self.fast_inference = fast_inference_default()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C) through the blocks."""
        if use_fast_inference(self, x):  # the rule is also asked by Stem and Downsample
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


def check_images(x: object, channels: int = 3) -> None:
    """ValueError unless ``x`` is a non-empty ``(B, channels, H, W)`` tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'MLLA expects images of shape (B, {channels}, H, W), got {shape}')
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
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths), device='cpu').tolist()
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

    def set_fast_inference(self, enable: bool = True) -> 'MLLA':
        """Switch the fast inference path on or off for this model (default: ``MLLA_MM_FAST_INFERENCE``)."""
        return set_fast_inference(self, enable)

    @property
    def feature_info(self) -> List[Dict[str, Union[int, str]]]:
        """Channels, stride and module name of each returned map."""
        return [dict(num_chs=self.channels[i], reduction=self.strides[i], module=f'norm{i}')
                for i in sorted(self.out_indices)]  # forward returns maps in stage order

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
        elif not os.path.lexists(path):  # where to get the published file and where to put it
            raise MissingWeightsError(missing_weights_message(path))
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


# --------------------------------------------------------------------------
# The ImageNet classifier for timm: the same stem and stages, then the final
# norm, average pooling and the head of the published classification model.
# --------------------------------------------------------------------------
_logger = logging.getLogger(__name__)

# Set by the registered constructors for the duration of a build: which weights
# ``MLLAClassifier.load_pretrained`` takes from a training checkpoint (``model`` or ``state_dict_ema``).
_PRETRAINED_USE_EMA: 'contextvars.ContextVar[bool]' = contextvars.ContextVar('mlla_pretrained_use_ema',
                                                                            default=False)


def make_pool(global_pool: str) -> nn.Module:
    """timm's global pooling of NHWC maps to ``(B, C * feat_mult)``; ``''``: none (the maps pass through)."""
    if not isinstance(global_pool, str):
        raise ValueError(f"MLLA: global_pool must be a string such as 'avg' or '', got {global_pool!r}")
    try:
        return SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool), input_fmt='NHWC')
    except (AssertionError, ValueError, KeyError):
        raise ValueError(f"MLLA: global_pool must be one of 'avg', 'max', 'avgmax', 'catavgmax' or '', "
                         f'got {global_pool!r}') from None


class MLLAClassifier(nn.Module):
    """MLLA ImageNet classifier (timm model): stem, four stages, final norm, average pool, linear head.

    Parameter names follow the published classification checkpoints
    (``patch_embed.*``, ``layers.{i}.blocks.{j}.*``, ``layers.{i}.downsample.*``,
    ``norm.*``, ``head.*``). Unlike the published model it accepts any input
    size (H, W >= 1; the image is zero-padded on the right and bottom as in the
    dense-prediction model).

    Args:
        in_chans: Input image channels.
        num_classes: Classes of the head; 0 for no head (pooled features).
        global_pool: timm's pooling (``'avg'``, ``'max'``, ``'avgmax'``, ``'catavgmax'``) or ``''``
            (no pooling: ``forward_head`` gets NHWC maps).
        embed_dim: Channels of stage 0 (stage i has ``embed_dim * 2**i``).
        depths: Blocks per stage (four stages).
        num_heads: Attention heads per stage.
        mlp_ratio: MLP hidden size relative to the channels.
        drop_rate: Dropout before the head.
        proj_drop_rate: Dropout in the block MLPs.
        drop_path_rate: Stochastic depth, rising linearly over all blocks.
        output_stride: Must be 32 (no dilated variant); accepted as timm's feature API passes it.
        device: Where the parameters are created (e.g. ``'meta'``); timm's factory argument.
        dtype: Floating dtype of the parameters; timm's factory argument.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: str = 'avg',
                 embed_dim: int = 64, depths: Tuple[int, ...] = (2, 4, 8, 4),
                 num_heads: Tuple[int, ...] = (2, 4, 8, 16), mlp_ratio: float = 4., drop_rate: float = 0.,
                 proj_drop_rate: float = 0., drop_path_rate: float = 0., output_stride: int = 32,
                 device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if output_stride != 32:
            raise ValueError(f'MLLA: output_stride must be 32 (MLLA has no dilated stages), got {output_stride!r}')
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f'MLLA: dtype must be a floating torch.dtype, got {dtype!r}')
        with torch.device(device) if device is not None else nullcontext():
            self._build(in_chans, num_classes, global_pool, embed_dim, depths, num_heads, mlp_ratio, drop_rate,
                        proj_drop_rate, drop_path_rate)
        if dtype is not None:
            self.to(dtype=dtype)

    def _build(self, in_chans: int, num_classes: int, global_pool: str, embed_dim: int, depths: Tuple[int, ...],
               num_heads: Tuple[int, ...], mlp_ratio: float, drop_rate: float, proj_drop_rate: float,
               drop_path_rate: float) -> None:
        arch = resolve_arch(dict(embed_dims=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads)))
        check_hyperparameters(arch['embed_dims'], mlp_ratio, proj_drop_rate, drop_path_rate)
        if not _is_number(drop_rate) or not 0 <= drop_rate < 1:
            raise ValueError(f'MLLA: drop_rate must be a number in [0, 1), got {drop_rate!r}')
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f'MLLA: num_classes must be an int >= 0, got {num_classes!r}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dim: int = arch['embed_dims']
        self.depths: Tuple[int, ...] = arch['depths']
        self.num_heads: Tuple[int, ...] = arch['num_heads']
        num_stages = len(self.depths)
        channels = [self.embed_dim * 2**i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = channels[-1]
        self.output_fmt = 'NHWC'
        self.grad_checkpointing = False
        self.feature_info = [dict(num_chs=c, reduction=4 * 2**i, module=f'layers.{i}')
                             for i, c in enumerate(channels)]

        self.patch_embed = Stem(in_chans, self.embed_dim)
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths), device='cpu').tolist()
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            start = sum(self.depths[:i])
            self.layers.append(MLLAStage(channels[i], self.depths[i], self.num_heads[i], mlp_ratio, proj_drop_rate,
                                         dpr[start:start + self.depths[i]], downsample=i < num_stages - 1))
        self.norm = LayerNorm(self.num_features)
        self.global_pool = global_pool
        self.pool = make_pool(global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features * self.pool.feat_mult(), num_classes) if num_classes > 0 \
            else nn.Identity()
        self.apply(MLLA._init_module)

    # -- timm model API ------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], Tuple[int, ...]]:
        """Parameter groups for layer-wise learning-rate decay, as timm's Swin and ConvNeXt group them.

        The stem first; then each block (or, ``coarse``, each stage); a downsample
        goes with the first block of the stage it feeds (in MLLA's layout it sits at
        the end of the previous stage, ``layers.{i}.downsample``); the final norm
        with the last block; anything else (the head) last. A callable, which
        timm's ``group_with_matcher`` takes, because the downsample's group is
        ``i + 1``.
        """
        depths = [len(stage.blocks) for stage in self.layers]

        def group(name: str) -> Tuple[int, ...]:
            if name.startswith('patch_embed.'):
                return (0, )
            m = re.match(r'^layers\.(\d+)\.(blocks\.(\d+)|downsample)\.', name)
            if m:
                i = int(m.group(1))
                if m.group(3) is not None:
                    return (1, i) if coarse else (1, i, int(m.group(3)))
                return (1, i + 1) if coarse else (1, i + 1, 0)
            if name.startswith('norm.'):
                last = len(depths) - 1
                return (1, last) if coarse else (1, last, max(depths[-1] - 1, 0))
            return (2, )

        return group

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the stem, every block and every downsample when gradients are needed."""
        self.grad_checkpointing = enable
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_fast_inference(self, enable: bool = True) -> 'MLLAClassifier':
        """Switch the fast inference path on or off for this model (default: ``MLLA_MM_FAST_INFERENCE``)."""
        return set_fast_inference(self, enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head by a new one with ``num_classes`` outputs (0: none); optionally change the pooling.

        The new head is created on the model's device and in its dtype.
        """
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f'MLLA: num_classes must be an int >= 0, got {num_classes!r}')
        if global_pool is not None:
            self.pool = make_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.num_features * self.pool.feat_mult(), num_classes, **dd) if num_classes > 0 \
            else nn.Identity()

    # -- forward ---------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if not is_tracing():  # (traced sizes would be frozen into the graph by these checks)
            check_images(x, self.in_chans)

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The stem or a downsample layer, checkpointed under ``grad_checkpointing``."""
        if self.grad_checkpointing and needs_checkpoint(module, x):
            return checkpoint_module(module, x)
        return module(x)

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (before the downsample) and, unless ``intermediates_only``, the final features.

        Args:
            x: Images ``(B, C, H, W)``.
            indices: Take the last ``n`` stages (int) or these stages (list; negative counts from the end).
            norm: Apply the final norm to the last stage's output when it is taken.
            stop_early: Stop after the last stage taken.
            output_fmt: ``'NCHW'`` or ``'NHWC'`` for the intermediates.
            intermediates_only: Return only the intermediates.

        Returns:
            The intermediates, or ``(final features (B, H, W, C) as forward_features, intermediates)``.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"MLLA: output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check_input(x)
        num_stages = len(self.layers)
        take_indices, max_index = feature_take_indices(num_stages, indices)
        last = max_index if stop_early else num_stages - 1
        intermediates = []
        x = self._run(self.patch_embed, x)
        for i in range(last + 1):
            stage = self.layers[i]
            x = stage(x)  # the blocks; the map leaves before the downsample
            if i in take_indices:
                y = self.norm(x) if norm and i == num_stages - 1 else x  # the final norm fits the last stage only
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else y)
            if i < last:
                x = self._run(stage.downsample, x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if last == num_stages - 1 else x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last one ``indices`` takes (and the downsample feeding them).

        As timm's Swin and ConvNeXt: when stages go, the final norm (sized for
        the last stage) and the head go too, and ``num_features`` becomes the
        channels of the last kept stage. Returns the (non-negative) indices taken.
        """
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.layers = self.layers[:max_index + 1]
            self.layers[-1].downsample = None  # its output would never be used
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> normalised last-stage features ``(B, H/32, W/32, C_3)`` (NHWC)."""
        self._check_input(x)
        x = self._run(self.patch_embed, x)
        for stage in self.layers:
            x = stage(x)
            if stage.downsample is not None:
                x = self._run(stage.downsample, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """NHWC features -> logits (or the pooled features with ``pre_logits``)."""
        x = self.pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- pretrained weights ------------------------------------------------------
    def load_pretrained(self, checkpoint_path: str, use_ema: Optional[bool] = None) -> Dict[str, List[str]]:
        """Load a checkpoint file through mlla-mm's safe loader (timm calls this for ``custom_load`` cfgs).

        Reads the published ImageNet layout (``{'model': ...}``, ``state_dict_ema``
        with ``use_ema``), timm/mmengine checkpoints (``state_dict``), mmdet/mmseg
        checkpoints (the ``backbone.`` part) and plain state dicts. See
        :func:`load_checkpoint_weights` for what is checked.
        """
        use_ema = _PRETRAINED_USE_EMA.get() if use_ema is None else use_ema
        path = os.path.expanduser(os.fspath(checkpoint_path))
        state_dict = checkpoint_filter_fn(load_file(path), self, use_ema=use_ema, source=path)
        return load_checkpoint_weights(self, state_dict, source=path)


# --------------------------------------------------------------------------
# Checkpoint filtering and loading (timm models).
# --------------------------------------------------------------------------
_ROPE_TABLE = re.compile(r'(^|\.)attn\.rope\.rotations$')
_OUTPUT_NORM = re.compile(r'^norm\d+\.')


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: Optional[nn.Module] = None, use_ema: bool = False,
                         source: str = '<checkpoint>') -> Dict[str, torch.Tensor]:
    """Published MLLA (or mm backbone) weights -> this model's names. Running it twice changes nothing.

    Accepts a whole checkpoint (``model``, ``state_dict_ema`` with ``use_ema``,
    ``state_dict``) or a state dict; strips ``module.`` (DDP) and ``backbone.``
    prefixes, drops the fixed ``attn.rope.rotations`` tables (RoPE is computed
    for the actual input size), the mm backbone's output norms ``norm{i}`` and,
    for detector/segmentor checkpoints, everything outside the backbone.
    """
    weights, _ = find_state_dict(state_dict, use_ema=use_ema, source=source)
    has_backbone = any(k.startswith(('backbone.', 'module.backbone.')) for k in weights)
    out: Dict[str, torch.Tensor] = OrderedDict()
    for key, value in weights.items():
        if key.startswith('module.'):
            key = key[len('module.'):]
        if has_backbone:
            if not key.startswith('backbone.'):
                continue
            key = key[len('backbone.'):]
        if _ROPE_TABLE.search(key) or _OUTPUT_NORM.match(key):
            continue
        out[key] = value
    return out


def _is_classifier_key(key: str) -> bool:
    return key.startswith(('head.', 'norm.'))


def load_checkpoint_weights(model: MLLAClassifier, state_dict: Mapping[str, torch.Tensor],
                            source: str = '<checkpoint>') -> Dict[str, List[str]]:
    """Load filtered weights into ``model``, refusing another arch.

    - A head of another size (or a model without head) keeps the model's own
      head: fine-tuning to other classes.
    - A stem for 3 channels is adapted to ``in_chans`` as timm does.
    - The final ``norm`` and ``head`` may be missing (a backbone checkpoint);
      they keep their initialisation and a warning says so.
    - Any other missing, unexpected or wrongly shaped tensor is a
      :class:`~mlla_mm.checkpoint.CheckpointError` naming ``source``.

    Returns:
        ``{'loaded': [...], 'missing': [...], 'skipped': [...]}``.
    """
    weights = dict(state_dict)
    own = model.state_dict()
    skipped: List[str] = []
    head_w = weights.get('head.weight')
    if head_w is not None and ('head.weight' not in own or own['head.weight'].shape != head_w.shape):
        skipped = [k for k in ('head.weight', 'head.bias') if k in weights]
        for k in skipped:
            weights.pop(k)
    stem_key = 'patch_embed.conv1.conv.weight'
    if stem_key in weights and stem_key in own and weights[stem_key].shape[1] != own[stem_key].shape[1]:
        weights[stem_key] = adapt_input_conv(own[stem_key].shape[1], weights[stem_key])
    fit = compare_state_dicts(own, weights)
    mismatched = [msg for _, msg in fit.wrong]
    missing, unexpected = fit.missing, fit.unexpected
    required = [k for k in missing if not _is_classifier_key(k) and not k.endswith('num_batches_tracked')]
    if mismatched or required or unexpected:
        parts = []
        if mismatched:
            parts.append(f'{len(mismatched)} tensor(s) of the wrong shape (e.g. {"; ".join(mismatched[:2])})')
        if required:
            parts.append(f'{len(required)} missing (e.g. {", ".join(required[:3])})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected (e.g. {", ".join(unexpected[:3])})')
        raise CheckpointError(
            f'{source}: not a checkpoint of this MLLA model (embed_dim {model.embed_dim}, depths '
            f'{list(model.depths)}, num_heads {list(model.num_heads)}): {"; ".join(parts)}. '
            'Another MLLA size, or another model?')
    model.load_state_dict(weights, strict=False)
    kept = [k for k in missing if _is_classifier_key(k)]
    if kept or skipped:
        _logger.warning(f'MLLA: {source}: kept at init (not in the file or another number of classes): '
                        f'{", ".join(sorted(set(kept + skipped)))}')
    _logger.info(f'MLLA: loaded {len(weights)} tensors from {source}')
    return {'loaded': sorted(weights), 'missing': kept, 'skipped': skipped}


# --------------------------------------------------------------------------
# Pretrained configs and the constructors registered with timm.
# --------------------------------------------------------------------------
_FILES = {'mlla_tiny': 'MLLA_T.pth', 'mlla_small': 'MLLA_S.pth', 'mlla_base': 'MLLA_B.pth'}
_TOP1 = {'mlla_tiny': 83.5, 'mlla_small': 84.4, 'mlla_base': 85.3}
ORIGIN_URL = 'https://github.com/LeapLabTHU/MLLA'


def _cfg(variant: str) -> Dict[str, Any]:
    """The published ImageNet-1k recipe (Swin's data pipeline: bicubic, resize 256, centre crop 224)."""
    return dict(
        url='',
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, crop_mode='center',
        interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv='patch_embed.conv1.conv', classifier='head',
        custom_load=True,  # timm hands the file to MLLAClassifier.load_pretrained (safe loader)
        paper_ids='arXiv:2405.16605',
        paper_name='Demystify Mamba in Vision: A Linear Attention Perspective',
        origin_url=ORIGIN_URL,
        license='unknown',
        description=f'{variant}: MLLA ImageNet-1k classifier, top-1 {_TOP1[variant]} (published)',
        notes=(f'Weights: {_FILES[variant]} from {ORIGIN_URL} (no download here); load with '
               f"pretrained=True, pretrained_cfg_overlay=dict(file='.../{_FILES[variant]}').",
               'License: the published repository states none that could be verified; its code derives '
               'from Swin Transformer (MIT).'),
    )


default_cfgs = generate_default_cfgs({f'{name}.in1k': _cfg(name) for name in _FILES})


_FEATURE_CLS = ('getter', 'hook')


class MissingWeightsError(CheckpointError, FileNotFoundError):
    """A weights file that is not there (nothing can be downloaded): says where to get it and where to put it."""


def missing_weights_message(path: str, variant: str = 'mlla_tiny', option: str = '') -> str:
    """What to say when the weights file ``path`` (a tool's ``option``) is not there: where to get it, where to put it."""
    variant = {'mlla_t': 'mlla_tiny', 'mlla_s': 'mlla_small', 'mlla_b': 'mlla_base'}.get(variant, variant)
    where = f'{option} {path}' if option else str(path)
    if os.path.basename(path) in _FILES.values():
        return (f'{where}: not found; the published weights are not downloaded: get {os.path.basename(path)} from '
                f'{ORIGIN_URL} (README, Pretrained Models) and put it at {path}')
    name = _FILES.get(variant, 'MLLA_T.pth')
    return (f'{where}: not found (the published weights are not downloaded: get {name} from {ORIGIN_URL} '
            f'(README, Pretrained Models) and put it at data/pretrained/{name})')


def refuse_remote_weights(variant: str, cfg: Any) -> None:
    """Refuse a resolved timm ``PretrainedCfg`` whose weights timm would download or take from a hub cache.

    timm loads, in this order: ``source='hf-hub'`` / ``'local-dir'``, then
    ``state_dict`` (in memory), ``file``, ``hf_hub_id``, ``url``. Only
    ``state_dict`` and ``file`` (read by :meth:`MLLAClassifier.load_pretrained`
    through the safe loader) are allowed: nothing is ever downloaded.

    Raises:
        CheckpointError: One line naming the setting and what to pass instead.
    """
    source = getattr(cfg, 'source', None)
    if source in ('hf-hub', 'local-dir'):
        what = f"source={source!r}"
    elif getattr(cfg, 'state_dict', None) or getattr(cfg, 'file', None):  # timm's own precedence
        return
    elif getattr(cfg, 'hf_hub_id', None):
        what = f'hf_hub_id={cfg.hf_hub_id!r}'
    elif getattr(cfg, 'url', None):
        what = f'url={cfg.url!r}'
    else:
        return
    raise CheckpointError(
        f'{variant}: pretrained weights from {what} would be downloaded or read from a hub cache by timm\'s own '
        "loader, which mlla-mm never does; get the file and pass pretrained_cfg_overlay=dict(file='PATH') "
        '(read by the safe loader)')


def _create_mlla(variant: str, pretrained: bool = False, use_ema: bool = False, if_missing: str = 'error',
                 **kwargs: Any) -> nn.Module:
    """Build ``variant`` with timm's ``build_model_with_cfg``; weights come from ``pretrained_cfg`` ``file``.

    A ``file`` that does not exist is :class:`MissingWeightsError` (where to get the published file and where
    to put it), or with ``if_missing='warn'`` (what the configs say) a warning and random weights.
    """
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    feature_cls = kwargs.get('feature_cls', 'getter')
    if kwargs.get('features_only') and not (isinstance(feature_cls, str) and feature_cls.lower() in _FEATURE_CLS):
        # 'list'/'dict' need the stages as sequential children, and 'fx' (torchvision's rule: the last
        # node inside a module) would return each stage's *downsampled* map, because the downsample
        # layers are children of the stages in the published layout.
        raise ValueError(f"{variant}: features_only supports feature_cls 'getter' (the default) or 'hook', got "
                         f'{feature_cls!r}')
    if use_ema and not pretrained:
        raise ValueError(f'{variant}: use_ema=True selects pretrained weights; it needs pretrained=True')
    if if_missing not in ('error', 'warn'):
        raise ValueError(f"{variant}: if_missing must be 'error' or 'warn', got {if_missing!r}")
    file = (kwargs.get('pretrained_cfg_overlay') or {}).get('file')
    if pretrained and file and not os.path.exists(os.path.expanduser(str(file))):
        if if_missing == 'error':
            raise MissingWeightsError(missing_weights_message(str(file), variant))
        print_log(f'{variant}: pretrained weights {file} not found; the model is RANDOMLY initialised. Put the '
                  f'published ImageNet weights at {file} to fine-tune from them.', logger='current', level=30)
        pretrained = False
        kwargs['pretrained_cfg_overlay'] = None
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        if not (cfg.file or cfg.state_dict or cfg.url or cfg.hf_hub_id):
            name = _FILES.get(variant, 'the checkpoint')
            raise MissingWeightsError(
                f'{variant}: pretrained=True needs the published weights file, which is not downloaded: get '
                f'{name} from {ORIGIN_URL} (README, Pretrained Models), put it for example at '
                f"data/pretrained/{name} and pass pretrained_cfg_overlay=dict(file='data/pretrained/{name}')")
        refuse_remote_weights(variant, cfg)
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    if pretrained:  # a file is read by the safe loader (load_pretrained); timm is left nothing to download
        overlay.update(custom_load=True, url='', hf_hub_id=None, hf_hub_filename=None, source=None)
    if overlay.get('file') or overlay.get('url'):
        # timm resets custom_load when a file is given; keep it, so the file is read by the safe loader
        # in MLLAClassifier.load_pretrained and never by timm's torch.load
        overlay['custom_load'] = True
    kwargs['pretrained_cfg_overlay'] = overlay or None
    token = _PRETRAINED_USE_EMA.set(bool(use_ema))
    try:
        return build_model_with_cfg(
            MLLAClassifier, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
            **kwargs)
    finally:
        _PRETRAINED_USE_EMA.reset(token)


def _arch_kwargs(arch: str) -> Dict[str, Any]:
    s = ARCH_SETTINGS[arch]
    return dict(embed_dim=s['embed_dims'], depths=s['depths'], num_heads=s['num_heads'])


@register_model
def mlla_tiny(pretrained: bool = False, **kwargs: Any) -> MLLAClassifier:
    """MLLA-T: embed_dim 64, depths (2, 4, 8, 4), heads (2, 4, 8, 16); 24.4 M parameters, top-1 83.5."""
    return _create_mlla('mlla_tiny', pretrained=pretrained, **dict(_arch_kwargs('tiny'), **kwargs))


@register_model
def mlla_small(pretrained: bool = False, **kwargs: Any) -> MLLAClassifier:
    """MLLA-S: embed_dim 64, depths (3, 6, 21, 6), heads (2, 4, 8, 16); 43.0 M parameters, top-1 84.4."""
    return _create_mlla('mlla_small', pretrained=pretrained, **dict(_arch_kwargs('small'), **kwargs))


@register_model
def mlla_base(pretrained: bool = False, **kwargs: Any) -> MLLAClassifier:
    """MLLA-B: embed_dim 96, depths (3, 6, 21, 6), heads (3, 6, 12, 24); 96.0 M parameters, top-1 85.3."""
    return _create_mlla('mlla_base', pretrained=pretrained, **dict(_arch_kwargs('base'), **kwargs))


__all__ = ['MLLA', 'MLLAStage', 'MLLABlock', 'LinearAttention', 'RoPE', 'Mlp', 'Stem', 'Downsample',
           'rope_cos_sin', 'apply_rope', 'resolve_arch', 'ARCH_SETTINGS',
           'MLLAClassifier', 'checkpoint_filter_fn', 'load_checkpoint_weights', 'MissingWeightsError',
           'missing_weights_message',
           'default_cfgs', 'mlla_tiny', 'mlla_small', 'mlla_base']
