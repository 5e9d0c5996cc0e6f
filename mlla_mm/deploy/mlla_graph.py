"""An export-only formulation of MLLA's stages that ONNX Runtime runs faster. Same numbers, other graph.

``MLLAStage`` traces to a graph that computes the model as written in
:mod:`mlla_mm.models.mlla`: RoPE on adjacent channel pairs (a ``Split`` of
the pairs and a ``Concat`` to put them back, per block), five head
transposes and a transpose around every depthwise convolution, bias adds on
4-D ``MatMul`` s that ONNX Runtime does not fuse. For export,
:func:`export_friendly` swaps every stage of a *copy* of the model for an
:class:`ExportStage` holding the same weights, rearranged once:

* the rows of the ``qk`` projection are permuted inside each head so that
  the RoPE pairs ``(2m, 2m+1)`` become the two halves ``[a_0..a_{d/2-1},
  b_0..b_{d/2-1}]`` (q and k get the same order, which leaves every q.k
  product unchanged; ``v`` and the output keep their order);
* RoPE never shuffles full-size tensors. With ``C2 = [cos, cos]``,
  ``S2 = [sin, sin]`` and ``swap(u) = [-u_b, u_a]`` (a signed swap of the
  halves), ``RoPE(u) = u C2 + swap(u S2)``, and the swap moves onto the
  small ``d x d`` matrices of each head:
  ``RoPE(k)^T v = (k C2)^T v + swap_rows((k S2)^T v)`` and
  ``RoPE(q) kv = [q C2, q S2] [kv; swap'(kv)]`` with ``swap'(kv) = [kv_b;
  -kv_a]``. ``[u C2, u S2]`` is one broadcast ``Mul`` with the stage's
  ``(heads, 2, 1, d/2, N)`` table, so each side costs one ``Mul`` and one
  ``MatMul`` with a ``2d`` inner size;
* the attention is channel-major (``(B, C, N)``, what the depthwise
  convolutions give and take): ``v`` is the ``dwc`` convolution's output,
  q and k come from weight-left ``MatMul`` s, the per-head products contract
  over positions on both sides (``FusedMatMul`` with a transposed operand,
  no copy), ``z = 1 / (q . mean(k) + 1e-6)`` is one ``(heads, C) x (C, N)``
  product with the block-diagonal matrix of per-head key means (as in the
  fast inference path), ``lepe`` reads ``v`` as it is, and the output is
  transposed back to tokens once;
* the token-major linear layers see 3-D ``(B, tokens, C)`` inputs, so they
  export as ``MatMul`` + ``Add``: ONNX Runtime keeps the ``MatMul`` (its
  ``Gemm`` with a bias first broadcasts the bias into the output, 1.3-1.9x
  slower at stage 0 on an AVX-512 Xeon) and fuses ``fc1``'s bias into its
  GELU (``BiasGelu``);
* the residual around the 3x3 depthwise ``cpe1`` and ``cpe2`` is folded into
  the kernel (``x + conv(x)`` is ``conv'(x)`` with 1 added to the centre tap).

The eager model, its training maths and the fast inference path are not
touched; the export check compares the ONNX file with the original model.
Tested to equal the original model (float64, ``tests/test_deploy/test_mlla_graph.py``).
"""
from __future__ import annotations

import copy
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.mlla import MLLABlock, MLLAStage
from ..models.ops import attention_dtype, dwconv_bhwc


def rope_pair_halves_permutation(channels: int, heads: int) -> torch.Tensor:
    """Channel order that turns the RoPE pairs of each head into halves: ``[0, 2, .., d-2, 1, 3, .., d-1]`` + offset."""
    d = channels // heads
    within = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    return (torch.arange(heads)[:, None] * d + within).flatten()


def rope_half_tables(height, width, channels: int, heads: int, device: torch.device, dtype: torch.dtype,
                     base: float = 10000.) -> torch.Tensor:
    """``(heads, 2, 1, d/2, H*W)``: ``cos`` and ``sin`` of each head's RoPE pairs, positions last.

    The same angles as :func:`mlla_mm.models.mlla.rope_angles` (pair ``p < C/4``: ``row * theta_p``,
    else ``col * theta_(p - C/4)``), with ``cos``/``sin`` taken on the small row and column
    tables before they are expanded. ``height`` and ``width`` may be traced sizes.
    """
    d = channels // heads
    k = channels // 4
    theta = base ** (-torch.arange(k, dtype=dtype, device=device) / k)
    rows = torch.arange(height, dtype=dtype, device=device)[None, :] * theta[:, None]  # (K, H)
    cols = torch.arange(width, dtype=dtype, device=device)[None, :] * theta[:, None]  # (K, W)

    def per_pair(fn) -> torch.Tensor:  # (heads, 1, 1, d/2, N): pair p = head * d/2 + m
        r = fn(rows)[:, :, None].expand(-1, -1, width)
        c = fn(cols)[:, None, :].expand(-1, height, -1)
        return torch.cat([r, c], dim=0).reshape(heads, 1, 1, d // 2, -1)

    return torch.cat([per_pair(torch.cos), per_pair(torch.sin)], dim=1)


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0])
    out.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    out.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return out


def _with_identity(conv: nn.Conv2d) -> nn.Conv2d:
    """A copy of a 3x3 depthwise convolution (padding 1) whose output is ``x + conv(x)``."""
    if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.groups != conv.in_channels \
            or conv.in_channels != conv.out_channels or conv.stride != (1, 1):
        raise ValueError(f'cannot fold a residual into {conv}')
    out = copy.deepcopy(conv)
    with torch.no_grad():
        out.weight[:, 0, 1, 1] += 1.0
    return out


class ExportBlock(nn.Module):
    """One :class:`~mlla_mm.models.mlla.MLLABlock` rearranged for export (see the module docstring)."""

    def __init__(self, blk: MLLABlock) -> None:
        super().__init__()
        attn = blk.attn
        c, heads = attn.dim, attn.num_heads
        self.dim, self.num_heads = c, heads
        self.cpe1 = _with_identity(blk.cpe1)
        self.norm1 = copy.deepcopy(blk.norm1)
        self.act_proj = copy.deepcopy(blk.act_proj)
        self.in_proj = copy.deepcopy(blk.in_proj)
        self.dwc = copy.deepcopy(blk.dwc)
        perm = rope_pair_halves_permutation(c, heads)
        wq, wk = attn.qk.weight.split(c)
        bq, bk = attn.qk.bias.split(c)
        self.q = _linear(wq[perm], bq[perm])
        self.k = _linear(wk[perm], bk[perm])
        self.lepe = copy.deepcopy(attn.lepe)
        self.out_proj = copy.deepcopy(blk.out_proj)
        self.cpe2 = _with_identity(blk.cpe2)
        self.norm2 = copy.deepcopy(blk.norm2)
        self.mlp = copy.deepcopy(blk.mlp)
        self.register_buffer('head_eye', torch.eye(heads).view(1, heads, 1, heads), persistent=False)

    def attention(self, v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """The linear attention without LePE on ``v`` (B, C, H, W); returns (B, C, H, W).

        ``table``: :func:`rope_half_tables`. Everything is channel-major (positions last, as the
        depthwise convolutions give and take it): q and k come from weight-left products and the
        per-head products contract over positions on both sides, so no full-size transpose is needed.
        """
        b, c, h, w = v.shape
        heads = self.num_heads
        d = c // heads
        half = d // 2
        v3 = v.reshape(b, c, h * w)
        q = F.elu(torch.matmul(self.q.weight, v3) + self.q.bias[:, None]) + 1.0  # (B, C, N), halves order
        k = F.elu(torch.matmul(self.k.weight, v3) + self.k.bias[:, None]) + 1.0
        k_mean = k.mean(dim=-1)  # (B, C)
        k_blk = (k_mean.view(b, heads, d, 1) * self.head_eye).reshape(b, c, heads)
        z = 1.0 / (torch.matmul(k_blk.transpose(1, 2), q) + 1e-6)  # (B, heads, N)
        k_side = k.view(b, heads, 1, 2, half, h * w) * table  # (B, heads, 2, 2, d/2, N): [k C2; k S2]
        kk = k_side.reshape(b, heads, 2 * d, h * w)
        m = (kk @ v3.view(b, heads, d, h * w).transpose(-2, -1)) * (1.0 / (h * w))  # (B, heads, 2d, d)
        mc, ms = m[..., :d, :], m[..., d:, :]
        kv = mc + torch.cat([-ms[..., half:, :], ms[..., :half, :]], dim=-2)
        kv2 = torch.cat([kv, kv[..., half:, :], -kv[..., :half, :]], dim=-2)  # (B, heads, 2d, d)
        q_side = q.view(b, heads, 1, 2, half, h * w) * table
        qq = q_side.reshape(b, heads, 2 * d, h * w)
        out = (kv2.transpose(-2, -1) @ qq) * z.unsqueeze(2)  # (B, heads, d, N)
        return out.reshape(b, c, h, w)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C); table: the stage's :func:`rope_half_tables`. Returns (B, H, W, C)."""
        b, h, w, c = x.shape
        x = dwconv_bhwc(self.cpe1, x)  # x + cpe1(x)
        t = x.reshape(b, h * w, c)
        y = self.norm1(t)
        gate = F.silu(self.act_proj(y))
        v = F.silu(self.dwc(self.in_proj(y).view(b, h, w, c).permute(0, 3, 1, 2)))  # (B, C, H, W)
        att = (self.attention(v, table) + self.lepe(v)).permute(0, 2, 3, 1)  # the one transpose back
        t = t + self.out_proj(att.reshape(b, h * w, c) * gate)
        x = dwconv_bhwc(self.cpe2, t.view(b, h, w, c))  # x + cpe2(x)
        t = x.reshape(b, h * w, c)
        t = t + self.mlp(self.norm2(t))
        return t.view(b, h, w, c)


class ExportStage(nn.Module):
    """An :class:`~mlla_mm.models.mlla.MLLAStage` of :class:`ExportBlock` s (``downsample`` kept as it is)."""

    def __init__(self, stage: MLLAStage) -> None:
        super().__init__()
        self.dim = stage.dim
        self.base = stage.rope.base
        self.num_heads = stage.blocks[0].attn.num_heads if len(stage.blocks) else 1
        self.blocks = nn.ModuleList(ExportBlock(blk) for blk in stage.blocks)
        self.downsample = copy.deepcopy(stage.downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C) through the blocks."""
        if not len(self.blocks):
            return x
        _, h, w, _ = x.shape
        dtype = attention_dtype(x.dtype)
        table = rope_half_tables(h, w, self.dim, self.num_heads, x.device, dtype, self.base)
        for blk in self.blocks:
            x = blk(x, table)
        return x


def export_friendly(model: nn.Module) -> nn.Module:
    """``model`` with every :class:`MLLAStage` replaced by an :class:`ExportStage` (in place; pass a copy).

    Only for float32/float64 inference (no autocast, eval mode): the export path.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MLLAStage):
                setattr(parent, name, ExportStage(child))
    return model


def count_replaced(model: nn.Module) -> Tuple[int, int]:
    """``(ExportStage count, MLLAStage count)`` in ``model``."""
    mods = list(model.modules())
    return sum(isinstance(m, ExportStage) for m in mods), sum(isinstance(m, MLLAStage) for m in mods)


__all__ = ['ExportBlock', 'ExportStage', 'count_replaced', 'export_friendly', 'rope_half_tables',
           'rope_pair_halves_permutation']
