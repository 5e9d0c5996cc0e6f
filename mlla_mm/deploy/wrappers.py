"""Modules that turn a backbone, segmentor or detector into ``forward(img) -> tuple of tensors``.

These are what gets exported to ONNX. They take an already normalised
``(B, 3, H, W)`` float image (no data preprocessor inside the graph) and
work at any ``H, W`` and batch size.

:func:`make_shape_agnostic` replaces the modules whose ONNX export depends on
the input size being known (``nn.AdaptiveAvgPool2d``, used by UperNet's
pyramid pooling) by :class:`AdaptiveAvgPool2dAnySize`, which computes the
same numbers with operations that stay valid for every input size.
"""
from __future__ import annotations

import copy
from typing import List, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def pooling_matrix(size: Union[int, torch.Tensor], bins: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """The ``(bins, size)`` matrix of adaptive average pooling along one axis.

    Row ``i`` averages the positions ``floor(i*size/bins) <= j < ceil((i+1)*size/bins)``,
    as ``torch.nn.functional.adaptive_avg_pool2d`` does. ``size`` may be a traced
    value, so the matrix follows the input size of an exported graph.
    """
    i = torch.arange(bins, device=device)
    start = torch.div(i * size, bins, rounding_mode='floor')
    end = torch.div((i + 1) * size + (bins - 1), bins, rounding_mode='floor')
    j = torch.arange(size, device=device)
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return inside.to(dtype) / (end - start)[:, None].to(dtype)


class AdaptiveAvgPool2dAnySize(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as two small matmuls, exportable with dynamic input sizes.

    ONNX has no adaptive pooling operator: the TorchScript exporter refuses it
    when the input size is not fixed, and the dynamo exporter bakes in the
    bins of the example input (wrong at other sizes). Pooling matrices built
    from the runtime size give the same result at every size.
    """

    def __init__(self, output_size: Union[int, Tuple[int, int]]) -> None:
        super().__init__()
        out = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        if len(out) != 2 or any(not isinstance(v, int) or v < 1 for v in out):
            raise ValueError(f'AdaptiveAvgPool2dAnySize needs positive int output sizes, got {output_size!r}')
        self.output_size = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = pooling_matrix(x.shape[-2], self.output_size[0], x.dtype, x.device)
        cols = pooling_matrix(x.shape[-1], self.output_size[1], x.dtype, x.device)
        return torch.matmul(torch.matmul(rows, x), cols.t())

    def extra_repr(self) -> str:
        return f'output_size={self.output_size}'


def make_shape_agnostic(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``nn.AdaptiveAvgPool2d`` replaced (see module docstring).

    The original model is left untouched, so it can serve as the reference
    the exported graph is checked against.
    """
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d):
                size = child.output_size
                if not isinstance(size, int) and any(v is None for v in size):
                    raise ValueError(f'cannot export AdaptiveAvgPool2d({size}) (a None output size)')
                setattr(parent, name, AdaptiveAvgPool2dAnySize(size))
    return model


class BackboneForExport(nn.Module):
    """A backbone returning its feature maps as a tuple."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, img: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.backbone(img))


class DetectorFeaturesForExport(nn.Module):
    """A detector's backbone + neck (FPN): ``img -> (P2, ..., P6)``."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, img: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.detector.extract_feat(img))


class SegmentorForExport(nn.Module):
    """An mmseg ``EncoderDecoder`` as ``img -> per-pixel class logits`` at the input size.

    The same tensor path as mmseg's whole-image ``encode_decode``: backbone,
    neck if any, ``decode_head.forward``, then a bilinear resize to the input
    size (the auxiliary head is not used at inference).
    """

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, img: torch.Tensor) -> Tuple[torch.Tensor]:
        head = self.segmentor.decode_head
        logits = head(self.segmentor.extract_feat(img))
        return (F.interpolate(logits, size=img.shape[2:], mode='bilinear', align_corners=head.align_corners), )


def output_names(kind: str, count: int) -> List[str]:
    """ONNX output names: ``feat0..`` (backbone), ``fpn0..`` (detector features), ``logits`` (segmentor)."""
    if kind == 'segmentor':
        return ['logits']
    prefix = 'fpn' if kind == 'detector-features' else 'feat'
    return [f'{prefix}{i}' for i in range(count)]


__all__ = ['AdaptiveAvgPool2dAnySize', 'BackboneForExport', 'DetectorFeaturesForExport', 'SegmentorForExport',
           'make_shape_agnostic', 'output_names', 'pooling_matrix']
