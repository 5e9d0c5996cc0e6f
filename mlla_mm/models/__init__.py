"""Models of mlla-mm. Importing this needs only torch, mmengine and timm.

* ``mlla.py``: the MLLA model as readable autograd code (blocks, stages, the
  ``MLLA`` backbone for mmdet/mmseg, and the ImageNet classifier
  ``MLLAClassifier`` registered in timm as ``mlla_tiny/small/base``): change
  the maths here.
* ``fast_inference.py``: the in-place, chunked, fused inference forward of a
  stage's blocks, chosen by one rule (``use_fast_inference``) in
  ``MLLAStage.forward``: change inference speed-ups here.
* ``mlla_reference.py``: a slow implementation straight from the spec, for tests.
* ``roi_align.py``: mmcv's RoIAlign as one multi-threaded sparse matrix
  product, and ``SparseRoIExtractor`` (mmdet's ``SingleRoIExtractor`` with it)
  for the detection configs.
"""
from .mlla import ARCH_SETTINGS, MLLA, MLLAClassifier, checkpoint_filter_fn, load_checkpoint_weights
from .roi_align import SparseRoIAlign, SparseRoIExtractor, sparse_roi_align

__all__ = ['MLLA', 'ARCH_SETTINGS', 'MLLAClassifier', 'checkpoint_filter_fn', 'load_checkpoint_weights',
           'SparseRoIAlign', 'SparseRoIExtractor', 'sparse_roi_align']
