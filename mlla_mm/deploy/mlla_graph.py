"""An export-only formulation of MLLA's stages that ONNX Runtime runs faster. Same numbers, other graph.

``MLLAStage`` traces to a graph that computes the model as written in
:mod:`mlla_mm.models.mlla`: RoPE on adjacent channel pairs (a ``Split`` of
the pairs and a ``Concat`` to put them back, per block), five head
transposes, bias adds on 4-D ``MatMul`` s that ONNX Runtime does not fuse. For
export, :func:`export_friendly` swaps every stage of a *copy* of the model
for an :class:`ExportStage` holding the same weights, rearranged once:

* the rows of the ``qk`` projection are permuted inside each head so that
  the RoPE pairs ``(2m, 2m+1)`` become the two halves ``[a_0..a_{d/2-1},
  b_0..b_{d/2-1}]`` (q and k get the same order, which leaves every q.k
  product unchanged; ``v`` and the output keep their order);
* RoPE never shuffles full-size tensors. With ``C2 = [cos, cos]``,
  ``S2 = [sin, sin]`` and ``swap(u) = [-u_b, u_a]`` (a signed swap of the
  halves), ``RoPE(u) = u C2 + swap(u S2)``, and a swap can be moved onto
  the small ``d x d`` matrices of each head:
  ``RoPE(k)^T v = (k C2)^T v + swap_rows((k S2)^T v)`` and
  ``RoPE(q) kv = [q C2, q S2] [kv; swap'(kv)]`` with ``swap'(kv) = [kv_b;
  -kv_a]``. ``[u C2, u S2]`` is one broadcast ``Mul`` of ``u`` with the
  stage's table ``(heads, N, 2, d)``, so each side costs one ``Mul`` and one
  ``MatMul`` with a ``2d`` inner size;
* q and k come from two 2-D ``Gemm`` s (bias fused; no split of a ``qk``
  tensor), ``z = 1 / (q . mean(k) + 1e-6)`` is one ``(N, C) x (C, heads)``
  product with the block-diagonal matrix of per-head key means (as in the
  fast inference path), and only q, k, v and the output are transposed;
* every linear layer sees a 2-D ``(tokens, C)`` input, so its bias is fused
  into a ``Gemm``;
* the residual around the 3x3 depthwise ``cpe1`` and ``cpe2`` is folded into
  the kernel (``x + conv(x)`` is ``conv'(x)`` with 1 added to the centre tap).

The eager model, its training maths and the fast inference path are not
touched; the export check compares the ONNX file with the original model.
Tested to equal the original model (float64, ``tests/test_deploy``).
"""
from __future__ import annotations

import copy
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.mlla import MLLABlock, MLLAStage, dwconv_bhwc, rope_angles


def rope_pair_halves_permutation(channels: int, heads: int) -> torch.Tensor:
    """Channel order that turns the RoPE pairs of each head into halves: ``[0, 2, .., d-2, 1, 3, .., d-1]`` + offset."""
    d = channels // heads
    within = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    return (torch.arange(heads)[:, None] * d + within).flatten()


def rope_half_tables(height, width, channels: int, heads: int, device: torch.device, dtype: torch.dtype,
                     base: float = 10000.) -> torch.Tensor:
    """``(heads, H*W, 2, d)``: ``[cos, cos]`` and ``[sin, sin]`` of each head's pairs, for the halves layout.

    ``height`` and ``width`` may be traced sizes.
    """
    d = channels // heads
    ang = rope_angles(height, width, channels, device, dtype, base)  # (H, W, C/2): pair p, head p // (d/2)
    ang = ang.reshape(-1, heads, d // 2)
    ang = torch.cat([ang, ang], dim=-1)  # (N, heads, d)
    return torch.stack([ang.cos(), ang.sin()], dim=2).transpose(0, 1)  # (heads, N, 2, d)


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

    def __init__(self, blk: MLLABlock, layout: str = 'heads') -> None:
        super().__init__()
        self.layout = layout
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
        """The linear attention without LePE on ``v`` (B, H, W, C); returns ``(B, N, heads, d)``."""
        b, h, w, c = v.shape
        heads = self.num_heads
        d = c // heads
        half = d // 2
        v2 = v.reshape(-1, c)
        q = F.elu(self.q(v2)) + 1.0  # (B*N, C), channels in the halves order
        k = F.elu(self.k(v2)) + 1.0
        q3 = q.view(b, h * w, c)
        # z = 1 / (q . mean(k) + eps) per token and head: one product with the block-diagonal key means.
        k_mean = k.view(b, h * w, c).mean(dim=1)  # (B, C)
        k_blk = (k_mean.view(b, heads, d, 1) * self.head_eye).reshape(b, c, heads)
        z = 1.0 / (torch.bmm(q3, k_blk) + 1e-6)  # (B, N, heads)
        qh = q.view(b, h * w, heads, d).transpose(1, 2)  # (B, heads, N, d)
        kh = k.view(b, h * w, heads, d).transpose(1, 2)
        vh = v2.view(b, h * w, heads, d).transpose(1, 2)
        k_side = kh.unsqueeze(-2) * table  # (B, heads, N, 2, d): [k C2, k S2]
        kk = k_side.reshape(*k_side.shape[:-2], 2 * d)
        m = (kk.transpose(-2, -1) @ vh) * (1.0 / (h * w))  # (B, heads, 2d, d): [(k C2)^T v; (k S2)^T v] / N
        mc, ms = m[..., :d, :], m[..., d:, :]
        kv = mc + torch.cat([-ms[..., half:, :], ms[..., :half, :]], dim=-2)  # RoPE(k)^T v / N
        kv2 = torch.cat([kv, kv[..., half:, :], -kv[..., :half, :]], dim=-2)  # (B, heads, 2d, d)
        q_side = qh.unsqueeze(-2) * table
        qq = q_side.reshape(*q_side.shape[:-2], 2 * d)  # [q C2, q S2]
        out = (qq @ kv2).transpose(1, 2)  # (B, N, heads, d) = RoPE(q) kv
        return out * z.unsqueeze(-1)

    def attention_channels(self, v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """The linear attention without LePE on ``v`` (B, C, H, W) channel-major; returns (B, C, H, W).

        ``table``: (heads, 2, d, N). q and k come channel-major from weight-left products, so
        only the output is transposed (the per-head products contract over N on both sides).
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
        k_side = k.view(b, heads, 1, d, h * w) * table  # (B, heads, 2, d, N): [k C2; k S2]
        kk = k_side.reshape(b, heads, 2 * d, h * w)
        m = (kk @ v3.view(b, heads, d, h * w).transpose(-2, -1)) * (1.0 / (h * w))  # (B, heads, 2d, d)
        mc, ms = m[..., :d, :], m[..., d:, :]
        kv = mc + torch.cat([-ms[..., half:, :], ms[..., :half, :]], dim=-2)
        kv2 = torch.cat([kv, kv[..., half:, :], -kv[..., :half, :]], dim=-2)  # (B, heads, 2d, d)
        q_side = q.view(b, heads, 1, d, h * w) * table
        qq = q_side.reshape(b, heads, 2 * d, h * w)
        out = (kv2.transpose(-2, -1) @ qq) * z.unsqueeze(2)  # (B, heads, d, N)
        return out.reshape(b, c, h, w)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C); table: the stage's :func:`rope_half_tables`. Returns (B, H, W, C)."""
        b, h, w, c = x.shape
        x = dwconv_bhwc(self.cpe1, x)  # x + cpe1(x)
        t = x.reshape(-1, c)
        y = self.norm1(t)
        gate = F.silu(self.act_proj(y))
        if self.layout == 'channels':
            v = F.silu(self.dwc(self.in_proj(y).view(b, h, w, c).permute(0, 3, 1, 2)))  # (B, C, H, W)
            att = (self.attention_channels(v, table) + self.lepe(v)).permute(0, 2, 3, 1)
        else:
            v = F.silu(dwconv_bhwc(self.dwc, self.in_proj(y).view(b, h, w, c)))
            att = self.attention(v, table) + dwconv_bhwc(self.lepe, v).reshape(b, h * w, self.num_heads, -1)
        t = t + self.out_proj(att.reshape(-1, c) * gate)
        x = dwconv_bhwc(self.cpe2, t.view(b, h, w, c))  # x + cpe2(x)
        t = x.reshape(-1, c)
        t = t + self.mlp(self.norm2(t))
        return t.view(b, h, w, c)


class ExportStage(nn.Module):
    """An :class:`~mlla_mm.models.mlla.MLLAStage` of :class:`ExportBlock` s (``downsample`` kept as it is)."""

    def __init__(self, stage: MLLAStage, layout: str = 'heads') -> None:
        super().__init__()
        self.layout = layout
        self.dim = stage.dim
        self.base = stage.rope.base
        self.num_heads = stage.blocks[0].attn.num_heads if len(stage.blocks) else 1
        self.blocks = nn.ModuleList(ExportBlock(blk, layout) for blk in stage.blocks)
        self.downsample = copy.deepcopy(stage.downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C) through the blocks."""
        if not len(self.blocks):
            return x
        _, h, w, _ = x.shape
        dtype = torch.promote_types(x.dtype, torch.float32)
        table = rope_half_tables(h, w, self.dim, self.num_heads, x.device, dtype, self.base)
        if self.layout == 'channels':
            table = table.permute(0, 2, 3, 1)  # (heads, 2, d, N)
        for blk in self.blocks:
            x = blk(x, table)
        return x


LAYOUT = 'heads'


def export_friendly(model: nn.Module, layout: str = None) -> nn.Module:
    """``model`` with every :class:`MLLAStage` replaced by an :class:`ExportStage` (in place; pass a copy).

    Only for float32/float64 inference (no autocast, eval mode): the export path.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MLLAStage):
                setattr(parent, name, ExportStage(child, layout or LAYOUT))
    return model


def count_replaced(model: nn.Module) -> Tuple[int, int]:
    """``(ExportStage count, MLLAStage count)`` in ``model``."""
    mods = list(model.modules())
    return sum(isinstance(m, ExportStage) for m in mods), sum(isinstance(m, MLLAStage) for m in mods)


__all__ = ['ExportBlock', 'ExportStage', 'count_replaced', 'export_friendly', 'rope_half_tables',
           'rope_pair_halves_permutation']
