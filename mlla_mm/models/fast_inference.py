"""The fast inference forward of MLLA's blocks: in place, chunked, fused.

The model and its maths live in :mod:`mlla_mm.models.mlla` (autograd code
that reads like the paper). This module computes the same numbers for a
stage's blocks with fewer and smaller temporaries; nothing here is needed to
understand, train or export the model.

When it runs: the model's switch is on (decided once when the model is
built, ``MLLA_MM_FAST_INFERENCE=0|1``, ``model.set_fast_inference(...)``:
:mod:`mlla_mm.models.ops`) and, asked by ``MLLAStage.forward`` (and
``Stem``/``Downsample``) on each call (:func:`~mlla_mm.models.ops.use_fast_inference`),
the module is in eval mode, no autograd graph is recorded, and nothing is
being traced, exported or compiled. Otherwise the plain code of ``mlla.py`` runs.

Under autocast (``torch.autocast('cpu', dtype=torch.bfloat16)``, or
mmengine's ``--amp`` test loop) it runs in the autocast dtype with autocast
itself switched off: every weight is cast once per call (:func:`cast`), the
linear layers, convolutions and the residual stream run in bf16, and, as in
the plain code under autocast, the LayerNorms normalise in float32 and the
attention maths (ELU, RoPE, the key statistics, the per-head products and
the normaliser) runs in float32. On CPUs with AMX or AVX512-BF16 this is
where bf16 pays (docs/benchmarks.md, "bf16 on AMX").

What it does differently (measured in docs/benchmarks.md):

* residual adds, SiLU, ELU, the gate product, the attention normaliser and
  the LePE add write into tensors that were just allocated; ``out_proj`` and
  ``fc2`` accumulate straight into the residual stream with ``addmm_``;
* ``in_proj`` runs with its bias in one ``addmm`` per band; the q, k and gate
  projections run with their bias (and SiLU for the gate) in one fused
  linear call where oneDNN offers it (:func:`linear_act`);
* RoPE is an in-place complex multiply on each band of q and of k;
* the key statistics (sum of k, ``RoPE(k)^T v`` per head) accumulate band by
  band with ``baddbmm_`` on strided ``(heads, d, n)`` views (no layout
  copies); ``z`` is one ``(n, C) x (C, heads)`` matmul per band against a
  block-diagonal matrix of per-head key means;
* the eval BatchNorms of the stem and the downsample layers are folded into
  their convolutions (:func:`fold_batch_norm`, once per call);
* the MLP runs over chunks of at most 4096 tokens (fewer where its 4C-wide
  hidden activations would exceed ``BAND_BYTES``), so they stay small;
* every block, and the stem and downsample layers (``Stem.forward`` and
  ``Downsample.forward`` ask the same rule), run in bands of rows
  (:func:`conv_rows` reads one halo row per 3x3 convolution) where a
  full-map temporary would be very large (:data:`WHOLE_MAP_BYTES`, 256 MiB,
  for a block; :data:`WIDE_MAP_BYTES`, 1 GiB, for the stem's and downsample
  layers' 4-8x wider hidden maps): apart from the stage's output and one
  map for the attention input, no temporary is then a full map. Up to
  2048x2048 (MLLA-T, fp32) every map is whole: bands cost time there, with
  or without tuned malloc (2048x2048, 2 threads, torch 2.14: banded blocks
  took 1.3-1.7x, the banded stem and downsample layers 1.7-4.5x as long).
  The band size depends on the input's size only (:func:`band_rows`), not
  on how malloc is set up.

It only reads the modules' parameters (duck-typed on the published
attribute names), so it holds no state of its own.
"""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import as_channels_last, is_tracing, pad_to_multiple, use_fast_inference

MLP_CHUNK = 4096  # tokens per MLP chunk
BAND_BYTES = 4 << 20  # the widest per-row temporary of a band of rows takes at most this much
WHOLE_MAP_BYTES = 256 << 20  # a block's full-map temporary below this is not banded (MLLA-T: above 2048x2048)
WIDE_MAP_BYTES = 1 << 30  # the same for the stem's and downsample layers' wide hidden maps


def band_rows(height: int, row_bytes: int, budget: Optional[int] = None, whole: Optional[int] = None) -> int:
    """Rows per band of a map ``height`` rows high whose widest temporary takes ``row_bytes`` per row.

    The whole map (``height``) while that temporary, ``height * row_bytes``,
    stays below ``whole`` (default :data:`WHOLE_MAP_BYTES`): whole maps are
    faster than bands up to 2048x2048, also with glibc's default malloc
    (module docstring). Larger maps run in bands of the most rows whose temporaries fit
    ``budget`` (default :data:`BAND_BYTES`): at least 2 (the in-place 3x3
    convolutions read one row beyond their band), at most ``height``. Decided
    from the sizes only, so the memory behaviour is the same whether or not a
    tool tuned malloc.
    """
    if height * row_bytes < (WHOLE_MAP_BYTES if whole is None else whole):
        return height
    budget = BAND_BYTES if budget is None else budget
    return max(2, min(height, budget // max(row_bytes, 1)))


def mlp_chunk(tokens: int, hidden_bytes: int) -> int:
    """Tokens per MLP chunk: :data:`MLP_CHUNK`, fewer where their hidden activations (``hidden_bytes`` a token)
    would reach :data:`WHOLE_MAP_BYTES`, then wider than :data:`BAND_BYTES` (at least 256)."""
    if min(tokens, MLP_CHUNK) * hidden_bytes < WHOLE_MAP_BYTES:
        return MLP_CHUNK
    return max(256, min(MLP_CHUNK, BAND_BYTES // max(hidden_bytes, 1)))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the fast path computes in: the autocast dtype when autocast is on for ``x``'s device, else ``x``'s."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


def without_autocast(fn):
    """Run a fast-path entry point with autocast off; its tensors are cast to :func:`compute_dtype` instead."""
    @functools.wraps(fn)
    def wrapper(module: nn.Module, x: torch.Tensor, *args, **kwargs):
        dtype = compute_dtype(x)
        if dtype == x.dtype and not torch.is_autocast_enabled(x.device.type):
            return fn(module, x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return fn(module, x.to(dtype), *args, **kwargs)
    return wrapper


def cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t`` in ``dtype`` (the same tensor when it already is; None stays None)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _conv_bhwc(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A convolution on a ``(B, H, W, C)`` tensor (a channels-last NCHW view), same layout out.

    The weights are cast to ``x``'s dtype (bf16 under autocast).
    """
    return F.conv2d(x.permute(0, 3, 1, 2), cast(conv.weight, x.dtype), cast(conv.bias, x.dtype), conv.stride,
                    conv.padding, conv.dilation, conv.groups).permute(0, 2, 3, 1)


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A LayerNorm (float32 at least, as in the model), returned in ``x``'s dtype.

    A bf16 ``x`` goes to PyTorch's mixed-dtype kernel with the float32
    weights: it reads bf16 and computes the statistics and the affine map in
    float32 (the same numbers as normalising a float32 copy, rounded to
    bf16), without the two conversion passes.
    """
    if x.dtype == torch.bfloat16 and norm.weight.dtype == torch.float32:
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return cast(norm(x), x.dtype)


_FUSED_LINEAR: dict = {}  # whether oneDNN's fused linear op works here (checked once)


def fused_linear_available() -> bool:
    """Whether ``torch.ops.mkldnn._linear_pointwise`` runs (oneDNN builds of PyTorch on x86 CPUs)."""
    if 'ok' not in _FUSED_LINEAR:
        try:
            x = torch.ones(2, 4, dtype=torch.bfloat16)
            out = torch.ops.mkldnn._linear_pointwise(x, torch.ones(3, 4, dtype=torch.bfloat16),
                                                     torch.zeros(3, dtype=torch.bfloat16), 'swish', [], '')
            _FUSED_LINEAR['ok'] = bool(out.shape == (2, 3) and torch.allclose(out.float(), torch.full((2, 3), 3.9281),
                                                                                  atol=0.05))
        except (AttributeError, RuntimeError, NotImplementedError):
            _FUSED_LINEAR['ok'] = False
    return _FUSED_LINEAR['ok']


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, act: str = 'none') -> torch.Tensor:
    """``act(x @ weight.T + bias)`` for ``act`` in ``'none'``, ``'gelu'`` (exact), ``'silu'``.

    bf16 on the CPU goes to oneDNN's fused linear op, which adds the bias and
    applies the activation in the matmul's epilogue: 20-30% faster than
    ``F.linear`` and a separate activation pass (docs/benchmarks.md, "bf16 on
    AMX"). Elsewhere: ``F.linear`` and the activation.
    """
    if x.dtype == torch.bfloat16 and x.device.type == 'cpu' and fused_linear_available():
        attr, algorithm = {'none': ('none', ''), 'gelu': ('gelu', 'none'), 'silu': ('swish', '')}[act]
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
    y = F.linear(x, weight, bias)
    if act == 'gelu':
        return F.gelu(y)
    return F.silu(y, inplace=True) if act == 'silu' else y


def relu_(x: torch.Tensor) -> torch.Tensor:
    """ReLU in place; a bf16 tensor as int16 bit patterns.

    Every negative bf16 value (and -0) has the sign bit set, i.e. is a
    negative int16, so ``clamp_min_(0)`` on the int16 view is ReLU exactly
    (NaN with the sign bit set becomes 0). PyTorch's bf16 ReLU converts to
    float32 and back; this is 11x faster on a stage-0 map (docs/benchmarks.md).
    """
    if x.dtype == torch.bfloat16:
        x.view(torch.int16).clamp_min_(0)
        return x
    return x.relu_()


def row_bands(height: int, rows: int) -> List[Tuple[int, int]]:
    """``[(r0, r1), ...]`` covering ``range(height)`` in steps of ``rows``."""
    return [(r, min(r + rows, height)) for r in range(0, height, rows)]


def input_rows(conv: nn.Conv2d, height: int, o0: int, o1: int) -> Tuple[int, int]:
    """The input rows ``[s0, s1)`` that :func:`conv_rows` reads for output rows ``[o0, o1)``."""
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    if k == 1 and p == 0:
        return o0 * s, (o1 - 1) * s + 1
    if (k, p) != (3, 1):
        raise ValueError(f'conv_rows: kernel {conv.kernel_size} with padding {conv.padding} is not supported')
    return max(0, s * (o0 - 1)), min(height, s * (o1 - 1) + 2)


def conv_rows(conv: nn.Conv2d, x: torch.Tensor, o0: int, o1: int, base: int = 0,
              height: Optional[int] = None) -> torch.Tensor:
    """Output rows ``[o0, o1)`` of ``conv`` on a ``(B, H, W, C)`` map, as ``(B, o1 - o0, W', C')``.

    ``x`` holds rows ``base, base + 1, ...`` of the map, which is ``height``
    rows high (default: all of it, ``base + x.shape[1]``). Reads only the
    input rows those outputs need (:func:`input_rows`: one more at each inner
    edge, dropped from the output), so the zero padding stays at the map's
    true top and bottom. 3x3 convolutions with padding 1 and 1x1 ones without
    padding, any stride.
    """
    height = base + x.shape[1] if height is None else height
    s0, s1 = input_rows(conv, height, o0, o1)
    if s0 < base or s1 > base + x.shape[1]:
        raise ValueError(f'conv_rows: rows {o0}:{o1} need input rows {s0}:{s1}, '
                         f'given {base}:{base + x.shape[1]}')
    out = _conv_bhwc(conv, x[:, s0 - base:s1 - base])
    skip = 0 if conv.kernel_size[0] == 1 else o0 - s0 // conv.stride[0]
    return out[:, skip:skip + o1 - o0]


class FoldedConv(NamedTuple):
    """What :func:`conv_rows` reads of an ``nn.Conv2d``: a convolution with its eval BatchNorm folded in."""
    weight: torch.Tensor
    bias: torch.Tensor
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


class FoldedLayer(NamedTuple):
    """A ``ConvLayer`` as :func:`layer_rows` reads it, its BatchNorm folded into the convolution (``norm`` None)."""
    conv: FoldedConv
    norm: None
    act: Optional[nn.Module]


def fold_batch_norm(layer: nn.Module, dtype: torch.dtype):
    """``layer`` (a ``ConvLayer``) with its eval BatchNorm folded into the convolution's weights, in ``dtype``.

    ``bn(conv(x)) = conv'(x)`` with ``w' = w * s`` and ``b' = (b - mean) * s + beta`` per output channel,
    ``s = gamma / sqrt(var + eps)`` (computed in float32 at least, then cast). Saves the BatchNorm's pass
    over the stem's and the downsample layers' wide maps (ONNX Runtime folds it the same way). A layer
    without BatchNorm, or whose BatchNorm has no running statistics, is returned as it is.

    Not torch's :func:`~torch.nn.utils.fusion.fuse_conv_bn_weights`: its weights are the same bits, but it
    rounds the bias as ``((b - mean) / sqrt(var + eps)) * gamma`` and so moves the outputs by up to 3e-7
    (relative); the published-code golden outputs stay bit for bit with this order.
    """
    bn, conv = layer.norm, layer.conv
    if bn is None or bn.running_mean is None or bn.running_var is None:
        return layer
    work = torch.promote_types(conv.weight.dtype, torch.float32)
    scale = bn.running_var.to(work).add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.to(work)
    bias = -bn.running_mean.to(work)
    if conv.bias is not None:
        bias = bias + conv.bias.to(work)
    bias = bias * scale
    if bn.bias is not None:
        bias = bias + bn.bias.to(work)
    weight = conv.weight.to(work) * scale.view(-1, 1, 1, 1)
    folded = FoldedConv(weight.to(dtype), bias.to(dtype), conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups)
    return FoldedLayer(folded, None, layer.act)


def layer_rows(layer: nn.Module, x: torch.Tensor, o0: int, o1: int, base: int = 0,
               height: Optional[int] = None) -> torch.Tensor:
    """:func:`conv_rows` of a ``ConvLayer`` (convolution, optional eval BatchNorm, optional ReLU) or a
    :class:`FoldedLayer`."""
    y = conv_rows(layer.conv, x, o0, o1, base, height)
    if layer.norm is not None:
        y = layer.norm(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    if layer.act is not None:  # ConvLayer's act is ReLU
        y = relu_(y)
    return y


def _rows_in_place(x: torch.Tensor, rows: int, compute, write) -> None:
    """Band by band: ``write(r0, r1, compute(r0, r1))``, where ``compute`` may read the rows next to its band.

    Each band is written only after the next band was computed, so a 3x3
    convolution of ``x`` written back into ``x`` reads the old values.
    """
    pending = None
    for r0, r1 in row_bands(x.shape[1], rows):
        value = compute(r0, r1)
        if pending is not None:
            write(*pending)
        pending = (r0, r1, value)
    if pending is not None:
        write(*pending)


class BlockWeights(NamedTuple):
    """A block's matrix weights and biases in the compute dtype (cast once per block call)."""
    in_w: torch.Tensor
    in_b: torch.Tensor
    act_w: torch.Tensor
    act_b: torch.Tensor
    out_wt: torch.Tensor
    out_b: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    bq: torch.Tensor
    bk: torch.Tensor


def block_weights(blk: nn.Module, dtype: torch.dtype) -> BlockWeights:
    """The :class:`BlockWeights` of ``blk`` in ``dtype`` (no copies when the block already is)."""
    c = blk.dim
    wq, wk = cast(blk.attn.qk.weight, dtype).split(c)
    bq, bk = cast(blk.attn.qk.bias, dtype).split(c)
    return BlockWeights(cast(blk.in_proj.weight, dtype), cast(blk.in_proj.bias, dtype),
                        cast(blk.act_proj.weight, dtype), cast(blk.act_proj.bias, dtype),
                        cast(blk.out_proj.weight, dtype).t(), cast(blk.out_proj.bias, dtype), wq, wk, bq, bk)


@without_autocast
def forward_blocks(stage: nn.Module, x: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
    """``stage``'s blocks on ``x`` (B, H, W, C); the downsample is not run. ``x`` is not modified.

    ``rows``: rows per band (default: :func:`band_rows` of the widest per-row temporary).
    """
    if not len(stage.blocks):
        return x
    b, h, w, c = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    rope = stage.rope.cached(('complex', h, w, x.device, dtype),
                             lambda: torch.complex(*stage.rope.build(h, w, x.device, dtype)))
    out = torch.empty(b, h, w, c, dtype=x.dtype, device=x.device)
    work = torch.empty(1, h, w, c, dtype=x.dtype, device=x.device)
    for i in range(b):
        for j, blk in enumerate(stage.blocks):
            block_forward_into(blk, x[i:i + 1] if j == 0 else out[i:i + 1], out[i:i + 1], rope, work, rows)
    return out


@without_autocast
def block_forward(blk: nn.Module, x: torch.Tensor, rope: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
    """``MLLABlock.forward`` on ``x`` (B, H, W, C) into a new tensor; ``rope`` is the complex ``(H, W, C/2)`` table."""
    b, h, w, c = x.shape
    out = torch.empty(b, h, w, c, dtype=x.dtype, device=x.device)
    work = torch.empty(1, h, w, c, dtype=x.dtype, device=x.device)
    for i in range(b):
        block_forward_into(blk, x[i:i + 1], out[i:i + 1], rope, work, rows)
    return out


def block_forward_into(blk: nn.Module, x: torch.Tensor, out: torch.Tensor, rope: torch.Tensor,
                       work: torch.Tensor, rows: Optional[int] = None) -> None:
    """One block on one image ``x`` (1, H, W, C) into ``out`` (may be ``x``), band by band of rows.

    ``work`` (1, H, W, C) holds the attention input ``v`` for the whole map
    (the attention's key statistics need all of it before any output row).
    Every other temporary is one band of rows: at high resolution they stay
    small enough for malloc's heap instead of fresh ``mmap`` pages.
    """
    _, h, w, c = x.shape
    attn = blk.attn
    p = block_weights(blk, x.dtype)
    heads = attn.num_heads
    d, n = c // heads, h * w
    dtype = torch.promote_types(x.dtype, torch.float32)
    rows = rows or band_rows(h, w * c * dtype.itemsize)
    tokens = lambda t, r0, r1: t[:, r0:r1].view(-1, c)  # noqa: E731 (rows of a (1, H, W, C) map as (n, C))

    # x1 = x + cpe1(x), into out.
    _rows_in_place(x, rows, lambda r0, r1: conv_rows(blk.cpe1, x, r0, r1),
                   lambda r0, r1, y: torch.add(x[:, r0:r1], y, out=out[:, r0:r1]))
    # v = silu(dwc(in_proj(norm1(x1)))), into work.
    for r0, r1 in row_bands(h, rows):
        torch.addmm(p.in_b, _norm(blk.norm1, tokens(out, r0, r1)), p.in_w.t(), out=tokens(work, r0, r1))
    _rows_in_place(work, rows, lambda r0, r1: F.silu(conv_rows(blk.dwc, work, r0, r1), inplace=True),
                   lambda r0, r1, y: work[:, r0:r1].copy_(y))

    # The attention's key statistics over all tokens: sum of k, and kv = RoPE(k)^T v per head.
    k_sum = torch.zeros(c, dtype=dtype, device=x.device)
    kv = torch.zeros(heads, d, d, dtype=dtype, device=x.device)

    def elu1(t: torch.Tensor) -> torch.Tensor:  # ELU(t) + 1 in the attention's dtype, in place when it can
        if t.dtype == dtype:
            return F.elu(t, inplace=True).add_(1.0)
        # bf16 linear output: ELU in place in bf16, then "+ 1" writes the float32 copy (two passes, not three).
        return torch.add(F.elu(t, inplace=True), 1.0, out=torch.empty(t.shape, dtype=dtype, device=t.device))

    def rope_(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:  # RoPE in place on (n, C) rows r0..r1
        torch.view_as_complex(t.view(r1 - r0, w, c // 2, 2)).mul_(rope[r0:r1])
        return t

    for r0, r1 in row_bands(h, rows):
        v = tokens(work, r0, r1)
        v = v if v.dtype == dtype else v.to(dtype)
        k = elu1(linear_act(tokens(work, r0, r1), p.wk, p.bk))
        k_sum += k.sum(0)
        k = rope_(k, r0, r1)
        kv.baddbmm_(k.view(-1, heads, d).permute(1, 2, 0), v.view(-1, heads, d).transpose(0, 1))
    kv.mul_(1.0 / n)
    # z = 1 / (q . mean(k) + eps) per token and head: one (n, C) x (C, heads) matmul against the
    # block-diagonal matrix of the per-head key means.
    eye = torch.eye(heads, dtype=dtype, device=x.device)
    k_blk = ((k_sum / n).view(heads, d, 1) * eye.view(heads, 1, heads)).view(c, heads)

    # Per band: out = (RoPE(q) @ kv) * z + lepe(v); x2 = x1 + out_proj(out * silu(act_proj(norm1(x1)))).
    for r0, r1 in row_bands(h, rows):
        q = elu1(linear_act(tokens(work, r0, r1), p.wq, p.bq))
        z = torch.mm(q, k_blk).add_(1e-6).reciprocal_()  # (n, heads)
        q = rope_(q, r0, r1)
        # (RoPE(q) @ kv) * z as (RoPE(q) * z) @ kv: z is one number per token and head, and the
        # product with the contiguous q is cheaper than with bmm's transposed output.
        q = q.view(-1, heads, d).mul_(z.unsqueeze(-1))
        att = torch.bmm(q.transpose(0, 1), kv).transpose(0, 1)  # (n, heads, d) view
        y = conv_rows(attn.lepe, work, r0, r1).reshape(-1, heads, d).add_(att).view(-1, c)
        x1 = tokens(out, r0, r1)
        y.mul_(linear_act(_norm(blk.norm1, x1), p.act_w, p.act_b, 'silu'))
        x1.addmm_(y, p.out_wt).add_(p.out_b)

    # x3 = x2 + cpe2(x2); x4 = x3 + mlp(norm2(x3)), band by band in place.
    def write_cpe2_mlp(r0: int, r1: int, y: torch.Tensor) -> None:
        out[:, r0:r1].add_(y)
        mlp_residual_(blk.mlp, blk.norm2, out[:, r0:r1])

    _rows_in_place(out, rows, lambda r0, r1: conv_rows(blk.cpe2, out, r0, r1), write_cpe2_mlp)


@without_autocast
def stem_forward(stem: nn.Module, x: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
    """``Stem.forward`` band by band of rows: (B, 3, H, W) -> (B, ceil(H/4), ceil(W/4), C).

    ``conv1`` fills one half-resolution map, ``x + conv2(x)`` is written back
    into it band by band (``conv2``'s first layer recomputed on the two rows
    at each band edge), then ``conv3`` runs band by band into the output.
    """
    img = as_channels_last(pad_to_multiple(x, 4)).permute(0, 2, 3, 1)  # (B, H, W, 3) view
    b, h, w, _ = img.shape
    conv1, conv2a, conv2b, conv3a, conv3b = (fold_batch_norm(layer, x.dtype)
                                             for layer in (stem.conv1, *stem.conv2, *stem.conv3))
    h2, w2, h4, w4 = h // 2, w // 2, h // 4, w // 4
    half = torch.empty(b, h2, w2, conv2b.conv.out_channels, dtype=x.dtype, device=x.device)
    out = torch.empty(b, h4, w4, conv3b.conv.out_channels, dtype=x.dtype, device=x.device)
    item = x.element_size()
    rows2 = rows or band_rows(h2, w2 * conv2b.conv.out_channels * item, 2 * BAND_BYTES, WIDE_MAP_BYTES)
    for r0, r1 in row_bands(h2, rows2):
        half[:, r0:r1] = layer_rows(conv1, img, r0, r1)

    def conv2_rows(r0: int, r1: int) -> torch.Tensor:
        t0, t1 = input_rows(conv2b.conv, h2, r0, r1)
        t = layer_rows(conv2a, half, t0, t1)
        return layer_rows(conv2b, t, r0, r1, base=t0, height=h2)

    _rows_in_place(half, rows2, conv2_rows, lambda r0, r1, y: half[:, r0:r1].add_(y))
    rows4 = rows or band_rows(h4, w4 * conv3a.conv.out_channels * item, None, WIDE_MAP_BYTES)
    for r0, r1 in row_bands(h4, rows4):
        out[:, r0:r1] = layer_rows(conv3b, layer_rows(conv3a, half, r0, r1), 0, r1 - r0)
    return out


@without_autocast
def downsample_forward(down: nn.Module, x: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
    """``Downsample.forward`` band by band of output rows: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C).

    The wide hidden maps of the inverted bottleneck exist one band at a time;
    the input rows two bands share are expanded once.
    """
    if x.shape[1] % 2 or x.shape[2] % 2:
        x = pad_to_multiple(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    expand, dw, project = (fold_batch_norm(layer, x.dtype) for layer in down.conv)
    b, h, w, _ = x.shape
    ho, wo = h // 2, w // 2
    out = torch.empty(b, ho, wo, project.conv.out_channels, dtype=x.dtype, device=x.device)
    rows = rows or max(1, band_rows(h, w * expand.conv.out_channels * x.element_size(), 2 * BAND_BYTES,
                                    WIDE_MAP_BYTES) // 2)
    carry, carry_start = None, 0
    for o0, o1 in row_bands(ho, rows):
        s0, s1 = input_rows(dw.conv, h, o0, o1)
        if carry is None:
            hid = layer_rows(expand, x, s0, s1)
        else:  # the rows the previous band expanded already, then the new ones
            kept = carry[:, s0 - carry_start:]
            hid = torch.cat([kept, layer_rows(expand, x, carry_start + carry.shape[1], s1)], dim=1)
        carry, carry_start = hid, s0
        out[:, o0:o1] = layer_rows(project, layer_rows(dw, hid, o0, o1, base=s0, height=h), 0, o1 - o0)
    return out


def mlp_residual_(mlp: nn.Module, norm: nn.Module, x: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
    """``x += mlp(norm(x))`` in place, ``chunk`` tokens at a time (no dropout: eval only).

    ``chunk`` defaults to :func:`mlp_chunk` of the tokens and the width of the hidden activations.
    """
    x2 = x.view(-1, x.shape[-1])
    if chunk is None:
        chunk = mlp_chunk(x2.shape[0], mlp.fc1.out_features * x.element_size())
    w1, b1 = cast(mlp.fc1.weight, x.dtype), cast(mlp.fc1.bias, x.dtype)
    w2, b2 = cast(mlp.fc2.weight, x.dtype).t(), cast(mlp.fc2.bias, x.dtype)
    for i in range(0, x2.shape[0], chunk):
        part = x2[i:i + chunk]
        hidden = linear_act(_norm(norm, part), w1, b1, 'gelu')
        part.addmm_(hidden, w2).add_(b2)
    return x


__all__ = ['use_fast_inference', 'compute_dtype', 'is_tracing', 'forward_blocks', 'block_forward', 'stem_forward',
           'downsample_forward', 'mlp_residual_']
