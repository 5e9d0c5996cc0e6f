"""Counting FLOPs and parameters of backbones, detectors and segmentors.

Counts come from :class:`torch.utils.flop_counter.FlopCounterMode`, which
sees every matmul and convolution at the aten level: ``mm``, ``addmm``,
``bmm`` (the per-head linear-attention products), ``baddbmm`` and all
convolutions, whether they come from ``nn.Linear``, ``nn.Conv2d`` or plain
tensor code. Element-wise work (activations, norms, adds, RoPE) is not
counted, as in the published numbers. ``FLOPs = 2 * MACs``; the papers'
"GFLOPs" are GMACs (the fvcore / mmcv convention), so
:attr:`FlopReport.published_gflops` reports MACs.

A product of a sparse matrix and a dense one (``SparseRoIAlign``'s
``A @ F``, mlla_mm/models/roi_align.py) is counted by its real work, one
multiply-accumulate per stored entry and column: ``nnz(A) * C``, i.e. for
RoIAlign bins x sampling points x 4 bilinear taps x channels. torch's
counter would count it as a dense ``(RoIs * bins) x (B * H * W) x C``
product (751 of the 1006 GMACs it gave Mask R-CNN MLLA-T at 1280x800).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class FlopReport:
    """FLOPs (multiply and add counted separately) of one forward, by module."""

    flops: int
    by_module: Dict[str, int] = field(default_factory=dict)
    by_op: Dict[str, int] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        """Multiply-accumulates: ``flops / 2``."""
        return self.flops // 2

    @property
    def published_gflops(self) -> float:
        """The papers' "GFLOPs" figure, which counts MACs, in units of 1e9."""
        return self.macs / 1e9


def _sparse_aware_mm(a: Any, b: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``aten.mm(a, b)``: dense ``2 m k n``; a sparse ``a`` only its stored entries, ``2 nnz n``."""
    n = b.shape[-1]
    if a.layout != torch.strided:
        return 2 * int(a._nnz()) * n
    return 2 * a.shape[0] * a.shape[1] * n


def _sparse_aware_addmm(bias: Any, a: Any, b: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``aten.addmm(bias, a, b)``, as :func:`_sparse_aware_mm` (the add is not counted, as torch's)."""
    return _sparse_aware_mm(a, b)


_sparse_aware_mm._get_raw = True  # torch's FlopCounterMode passes the tensors, not their shapes
_sparse_aware_addmm._get_raw = True
#: ``FlopCounterMode(custom_mapping=...)``: matrix products with a sparse operand counted by their stored entries.
SPARSE_AWARE_FORMULAS = {torch.ops.aten.mm: _sparse_aware_mm, torch.ops.aten.addmm: _sparse_aware_addmm}


def count_params(module: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


def count_flops(fn: Callable[[], Any], module: nn.Module = None, depth: int = 2) -> FlopReport:
    """FLOPs of one call of ``fn()``, with a breakdown by module (down to ``depth``).

    The call runs with gradients enabled but nothing is backpropagated, so
    the MLLA blocks take their autograd path (plain ``linear``/``bmm`` ops
    rather than in-place ones); the count is the same either way.
    """
    del module  # FlopCounterMode tracks modules by itself
    counter = FlopCounterMode(display=False, depth=depth, custom_mapping=SPARSE_AWARE_FORMULAS)
    with counter, torch.enable_grad():
        fn()
    counts = counter.get_flop_counts()
    by_module = {name: int(sum(ops.values())) for name, ops in counts.items()}
    glob = counts.get('Global', {})
    by_op = {str(op).split('.')[-1] if '.' in str(op) else str(op): int(v) for op, v in glob.items()}
    return FlopReport(flops=int(counter.get_total_flops()), by_module=by_module, by_op=by_op)


def backbone_flops(backbone: nn.Module, height: int, width: int, batch: int = 1) -> FlopReport:
    """FLOPs of a backbone forward on a ``(batch, 3, height, width)`` input."""
    x = torch.randn(batch, 3, height, width)
    was_training = backbone.training
    backbone.eval()
    try:
        return count_flops(lambda: backbone(x), backbone)
    finally:
        backbone.train(was_training)
