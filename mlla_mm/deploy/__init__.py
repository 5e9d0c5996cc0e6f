"""Deployment: ONNX export of MLLA backbones, UperNet segmentors and detector features.

:mod:`.onnx_export` builds what to export, exports it with dynamic batch and
image size, checks the file against PyTorch with ONNX Runtime and writes it
atomically; :mod:`.wrappers` holds the exported modules; :mod:`.benchmark`
measures ONNX Runtime against PyTorch eager. ``onnx`` and ``onnxruntime`` are
imported only when used, so this package imports without them.
See docs/deploy.md.
"""
from .wrappers import (AdaptiveAvgPool2dAnySize, BackboneForExport, DetectorFeaturesForExport, SegmentorForExport,
                       make_shape_agnostic)

__all__ = ['AdaptiveAvgPool2dAnySize', 'BackboneForExport', 'DetectorFeaturesForExport', 'SegmentorForExport',
           'make_shape_agnostic']
