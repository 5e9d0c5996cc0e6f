"""Data for mlla-mm: synthetic data sets for the demos and tests, and the data checks run before training."""
from .checks import (BadAnnotationError, BadImageError, DataNotFoundError, check_annotations, check_data,
                     check_model_config, check_seg_folder, inspect_image, inspect_label_map)
from .synthetic import SHAPE_CLASSES, make_ade_shapes, make_coco_shapes

__all__ = ['SHAPE_CLASSES', 'make_coco_shapes', 'make_ade_shapes', 'BadAnnotationError', 'BadImageError',
           'DataNotFoundError', 'check_annotations', 'check_data', 'check_model_config', 'check_seg_folder',
           'inspect_image', 'inspect_label_map']
