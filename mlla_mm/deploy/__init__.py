"""Deployment: ONNX export of MLLA backbones, UperNet segmentors and whole detectors.

:mod:`.onnx_export` builds what to export, exports it with dynamic batch and
image size, checks the file against PyTorch with ONNX Runtime and writes it
atomically; :mod:`.wrappers` holds the exported modules, :mod:`.detector`
a whole mmdet detector (NMS, RoIAlign, heads) as one graph;
:mod:`.ort_model` evaluates an exported file with tools/test.py;
:mod:`.quantize` makes INT8 files; :mod:`.postprocess` (numpy only) rescales
boxes and pastes masks (``tools/benchmark.py onnx`` times ONNX Runtime against
PyTorch eager). ``onnx`` and ``onnxruntime`` are
imported only when used, so this package imports without them.
See docs/deploy.md.
"""
from .wrappers import (AdaptiveAvgPool2dAnySize, BackboneForExport, DetectorFeaturesForExport, SegmentorForExport,
                       make_shape_agnostic)

__all__ = ['AdaptiveAvgPool2dAnySize', 'BackboneForExport', 'DetectorFeaturesForExport', 'SegmentorForExport',
           'make_shape_agnostic']
