"""MLLA: the Mamba-Like Linear Attention backbone, written as its maths.

"Demystify Mamba in Vision: A Linear Attention Perspective" (NeurIPS 2024).
"Spec item N" below refers to the numbered list in mlla-spec.md ("What the
backbone computes"), the description of the published model this was built from.

The model family, ordered like timm's model files (each imports only those above it):

* :mod:`mlla_mm.models.ops`: small shared helpers (tracing, layout, padding)
  and the switch of the fast inference path (``MLLA_MM_FAST_INFERENCE``).
* :mod:`mlla_mm.models.fast_inference`: the same numbers as this file for
  inference, in place, chunked and fused, in bands of rows.
* this file: the maths, one autograd implementation that reads like the
  paper. Building blocks from small to large (``ConvLayer``, ``LayerNorm``,
  ``Stem``, ``Downsample``, ``Mlp``, the real-valued ``RoPE``,
  ``LinearAttention``, ``MLLABlock``), then ``MLLAStage``, then what both
  models share: the arch settings, :func:`init_module`,
  :func:`build_stages` and the stage walk :func:`run_stages`. It trains,
  checkpoints (``with_cp``), runs under autocast, and traces, exports to
  ONNX and compiles (no complex tensors, no in-place tricks, sizes only
  through tensor ops while tracing). ``MLLAStage.forward`` (and ``Stem`` and
  ``Downsample``) take the fast inference path by the one rule
  ``use_fast_inference(module, x)`` (the model's switch, set when it is
  built and changed by ``model.set_fast_inference()``; eval mode, no
  gradients, not tracing; under autocast it runs in the autocast dtype).
* :mod:`mlla_mm.models.backbone`: ``MLLA``, the backbone for mmdet/mmseg
  (``type='MLLA'``: ``out_indices``, ``frozen_stages``, ``init_cfg``).
* :mod:`mlla_mm.models.timm_mlla`: the timm ImageNet classifier
  ``MLLAClassifier``, its checkpoint filter, pretrained cfgs and the
  ``mlla_tiny/small/base`` constructors registered with timm (see docs/timm.md).

``tests/test_models/mlla_reference.py`` is a slow, independent implementation
from the spec that the tests check both paths against.

Parameter names are the published ones, so published checkpoints load
without renaming. Tokens are kept as a ``(B, H, W, C)`` tensor: linear layers
work on the last dimension, and the 3x3 depthwise convolutions see the same
memory as a channels-last ``(B, C, H, W)`` view, so no layout copy is needed
between the two.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.layers import DropPath, register_notrace_module, trunc_normal_

from . import fast_inference
from .ops import (as_channels_last, attention_dtype, dwconv_bhwc, fast_inference_default, is_tracing,
                  pad_to_multiple, use_fast_inference)

ARCH_SETTINGS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    'tiny': dict(embed_dims=64, depths=(2, 4, 8, 4), num_heads=(2, 4, 8, 16)),
    'small': dict(embed_dims=64, depths=(3, 6, 21, 6), num_heads=(2, 4, 8, 16)),
    'base': dict(embed_dims=96, depths=(3, 6, 21, 6), num_heads=(3, 6, 12, 24)),
}
ARCH_ALIASES = {'t': 'tiny', 's': 'small', 'b': 'base'}


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
# What both models share: initialisation, the stages and the walk through them.
# --------------------------------------------------------------------------
def init_module(m: nn.Module) -> None:
    """The from-scratch initialisation of both models (``model.apply(init_module)``).

    Linear layers: truncated normal weights (std 0.02), zero biases; LayerNorms: ones and zeros; convolutions
    and BatchNorms keep PyTorch's defaults.
    """
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_stages(embed_dims: int, depths: Sequence[int], num_heads: Sequence[int], mlp_ratio: float = 4.,
                 drop: float = 0., drop_path_rate: float = 0.) -> nn.ModuleList:
    """The stages of both models (``layers``): stage ``i`` has ``embed_dims * 2**i`` channels.

    Stochastic depth rises linearly over all blocks from 0 to ``drop_path_rate``; every stage but the last
    ends in a downsample to twice the channels. ``drop``: dropout in the block MLPs.
    """
    num_stages = len(depths)
    dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
    stages = nn.ModuleList()
    for i in range(num_stages):
        start = sum(depths[:i])
        stages.append(MLLAStage(embed_dims * 2**i, depths[i], num_heads[i], mlp_ratio, drop,
                                dpr[start:start + depths[i]], downsample=i < num_stages - 1))
    return stages


def run_module(module: nn.Module, x: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
    """``module(x)`` for the stem or a downsample layer, checkpointed when ``checkpoint`` and gradients are needed."""
    if checkpoint and needs_checkpoint(module, x):
        return checkpoint_module(module, x)
    return module(x)


def run_stages(stem: nn.Module, stages: Sequence[MLLAStage], x: torch.Tensor, last: int,
               outputs: Optional[Mapping[int, Callable[[torch.Tensor], torch.Tensor]]] = None,
               checkpoint: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The stage walk of both models: the stem, then stages ``0..last``, each one's blocks and (before the next
    stage) its downsample.

    Args:
        stem, stages: The model's ``patch_embed`` and ``layers``.
        x: Images ``(B, C, H, W)``.
        last: The last stage to run.
        outputs: ``{i: fn}``: the map of stage ``i`` after its blocks and before its downsample (the
            pyramid's map) goes through ``fn`` (e.g. an output norm), in stage order.
        checkpoint: Checkpoint the stem and the downsample layers when gradients are needed (the blocks
            are checkpointed by their stage's ``grad_checkpointing``).

    Returns:
        The output of stage ``last``'s blocks, and the ``outputs`` maps in stage order.
    """
    outputs = outputs or {}
    x = run_module(stem, x, checkpoint)
    taken = []
    for i in range(last + 1):
        stage = stages[i]
        x = stage(x)
        if i in outputs:
            taken.append(outputs[i](x))
        if i < last:
            x = run_module(stage.downsample, x, checkpoint)
    return x, taken


__all__ = ['ARCH_SETTINGS', 'ARCH_ALIASES', 'resolve_arch', 'check_hyperparameters', 'check_images',
           'ConvLayer', 'LayerNorm', 'Stem', 'Downsample', 'Mlp', 'rope_angles', 'rope_cos_sin', 'apply_rope',
           'RoPE', 'LinearAttention', 'MLLABlock', 'MLLAStage', 'checkpoint_module', 'init_module',
           'build_stages', 'run_module', 'run_stages']
