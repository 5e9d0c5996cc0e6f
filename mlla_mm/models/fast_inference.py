"""The fast inference forward of MLLA's blocks: in place, chunked, fused.

The model and its maths live in :mod:`mlla_mm.models.mlla` (autograd code
that reads like the paper). This module computes the same numbers for a
stage's blocks with fewer and smaller temporaries; nothing here is needed to
understand, train or export the model.

When it runs is decided by one rule, :func:`use_fast_inference`, called in
one place, ``MLLAStage.forward``: the stage is in eval mode, no autograd
graph is recorded, autocast is off, and nothing is being traced, exported or
compiled. Otherwise the plain code of ``mlla.py`` runs.

What it does differently (measured in docs/benchmarks.md):

* residual adds, SiLU, ELU, the gate product, the attention normaliser and
  the LePE add write into tensors that were just allocated; ``out_proj`` and
  ``fc2`` accumulate straight into the residual stream with ``addmm_``;
* ``in_proj`` and ``act_proj`` run as one ``C -> 2C`` matmul;
* RoPE is one in-place complex multiply on q and k together;
* ``z`` is one ``(N, C) x (C, heads)`` matmul against a block-diagonal
  matrix of per-head key means, and the per-head products are ``bmm`` calls
  on strided ``(heads, N, d)`` views (no layout copies), written in place;
* the MLP runs over chunks of 4096 tokens, so its 4C-wide hidden
  activations stay small and cache-resident.

It only reads the modules' parameters (duck-typed on the published
attribute names), so it holds no state of its own.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover - type hints only (mlla.py imports this module)
    from .mlla import LinearAttention, MLLABlock, MLLAStage, Mlp

MLP_CHUNK = 4096  # tokens per MLP chunk


def is_tracing() -> bool:
    """True under ``torch.jit.trace``, ONNX export, ``torch.compile`` or ``torch.export``."""
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def use_fast_inference(module: nn.Module, x: torch.Tensor) -> bool:
    """The one rule: may ``module`` run on ``x`` with this module's in-place code?

    True when ``module`` and all its submodules are in eval mode (no dropout,
    drop-path or batch statistics), no autograd graph is recorded, autocast
    is off, and nothing is being traced, exported or compiled (those record
    the plain, real-valued code).
    """
    return (not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
            and not is_tracing() and not any(m.training for m in module.modules()))


def _conv_bhwc(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A convolution on a ``(B, H, W, C)`` tensor (a channels-last NCHW view), same layout out."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def forward_blocks(stage: 'MLLAStage', x: torch.Tensor) -> torch.Tensor:
    """``stage``'s blocks on ``x`` (B, H, W, C); the downsample is not run."""
    _, h, w, _ = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    rope = stage.rope.cached(('complex', h, w, x.device, dtype),
                             lambda: torch.complex(*stage.rope.build(h, w, x.device, dtype)))
    for blk in stage.blocks:
        x = block_forward(blk, x, rope)
    return x


def block_forward(blk: 'MLLABlock', x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """``MLLABlock.forward`` with few large temporaries; ``rope`` is the complex ``(H, W, C/2)`` table."""
    c = x.shape[-1]
    x = _conv_bhwc(blk.cpe1, x).add_(x).contiguous()  # a no-op copy unless the conv changed the layout
    y, gate = in_act_proj(blk, blk.norm1(x))
    y = attention_forward(blk.attn, F.silu(_conv_bhwc(blk.dwc, y), inplace=True), rope)
    y.mul_(F.silu(gate, inplace=True))
    x.view(-1, c).addmm_(y.reshape(-1, c), blk.out_proj.weight.t()).add_(blk.out_proj.bias)
    x = _conv_bhwc(blk.cpe2, x).add_(x).contiguous()
    return mlp_residual_(blk.mlp, blk.norm2, x)


def in_act_proj(blk: 'MLLABlock', y: torch.Tensor):
    """``in_proj(y), act_proj(y)`` as one matmul (strided views of its output)."""
    weight = torch.cat([blk.in_proj.weight, blk.act_proj.weight])
    bias = torch.cat([blk.in_proj.bias, blk.act_proj.bias])
    return F.linear(y, weight, bias).unflatten(-1, (2, -1)).unbind(-2)


def attention_forward(attn: 'LinearAttention', x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """``LinearAttention.forward`` in place; ``rope`` is the complex table. Returns a fresh tensor."""
    b, h, w, c = x.shape
    n, heads = h * w, attn.num_heads
    d = c // heads
    qk = attn.qk(x)
    dtype = torch.promote_types(x.dtype, torch.float32)
    qk = qk if qk.dtype == dtype else qk.to(dtype)
    v = (x if x.dtype == dtype else x.to(dtype)).reshape(b, n, c)
    F.elu(qk, inplace=True).add_(1.0)
    q, k = qk.view(b, n, 2, c).unbind(2)  # (B, N, C) strided views
    # z = 1 / (q . mean(k) + eps) per token and head: one (N, C) x (C, heads) matmul against the
    # block-diagonal matrix of the per-head key means. Computed before RoPE rotates q and k in place.
    k_mean = k.mean(dim=1)  # (B, C)
    eye = torch.eye(heads, dtype=dtype, device=x.device)
    k_blk = (k_mean.view(b, heads, d, 1) * eye.view(1, heads, 1, heads)).view(b, c, heads)
    z = torch.bmm(q, k_blk).add_(1e-6).reciprocal_()  # (B, N, heads)
    # RoPE: (B, H, W, 2, C/2) complex times (H, W, 1, C/2); q and k are views of qk, so rotated too.
    torch.view_as_complex(qk.view(b, h, w, 2, c // 2, 2)).mul_(rope[:, :, None])
    out = torch.empty(b, n, c, dtype=dtype, device=x.device)
    for i in range(b):
        # (heads, N, d) strided views of the (N, C) rows: bmm reads and writes them without copies.
        q_i = q[i].view(n, heads, d).transpose(0, 1)
        k_i = k[i].view(n, heads, d).transpose(0, 1)
        v_i = v[i].view(n, heads, d).transpose(0, 1)
        kv = torch.bmm(k_i.transpose(1, 2), v_i).mul_(1.0 / n)  # (heads, d, d)
        torch.bmm(q_i, kv, out=out[i].view(n, heads, d).transpose(0, 1))
    out = out.view(b, n, heads, d).mul_(z.unsqueeze(-1)).view(b, h, w, c)
    return _conv_bhwc(attn.lepe, x).add_(out)


def mlp_residual_(mlp: 'Mlp', norm: nn.Module, x: torch.Tensor, chunk: int = MLP_CHUNK) -> torch.Tensor:
    """``x += mlp(norm(x))`` in place, ``chunk`` tokens at a time (no dropout: eval only)."""
    x2 = x.view(-1, x.shape[-1])
    w2 = mlp.fc2.weight.t()
    for i in range(0, x2.shape[0], chunk):
        part = x2[i:i + chunk]
        hidden = F.gelu(F.linear(norm(part), mlp.fc1.weight, mlp.fc1.bias))
        part.addmm_(hidden, w2).add_(mlp.fc2.bias)
    return x


__all__ = ['use_fast_inference', 'is_tracing', 'forward_blocks', 'block_forward', 'attention_forward',
           'mlp_residual_', 'in_act_proj']
