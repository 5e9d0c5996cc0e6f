"""Synthetic data sets for the demos and tests."""
from .synthetic import SHAPE_CLASSES, make_coco_shapes, make_ade_shapes

__all__ = ['SHAPE_CLASSES', 'make_coco_shapes', 'make_ade_shapes']
