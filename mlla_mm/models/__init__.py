"""Models of mlla-mm. Importing this needs only torch, mmengine and timm.

The model family, ordered like timm's model files (each file imports only those above it):

* ``ops.py``: small shared helpers (tracing, layout, padding) and the switch of
  the fast inference path: decided once per model when it is built
  (``MLLA_MM_FAST_INFERENCE=0|1``, default on), changed with
  ``model.set_fast_inference(False)``.
* ``fast_inference.py``: the in-place, chunked, fused inference forward of the
  stem, the blocks and the downsample layers, taken where the switch is on and
  the module runs in eval mode without gradients, tracing or export: change
  inference speed-ups here.
* ``mlla.py``: the maths as readable autograd code (RoPE, attention, block,
  stage, the shared stage builder and stage walk): change the maths here.
* ``backbone.py``: ``MLLA``, the backbone for mmdet/mmseg (``type='MLLA'``).
* ``timm_mlla.py``: the ImageNet classifier ``MLLAClassifier``, its checkpoint
  filter and cfgs, registered in timm as ``mlla_tiny/small/base``.
* ``roi_align.py``: mmcv's RoIAlign as one multi-threaded sparse matrix
  product, and ``SparseRoIExtractor`` (mmdet's ``SingleRoIExtractor`` with it)
  for the detection configs.

A slow implementation straight from the spec, which the tests compare both
paths against, is ``tests/test_models/mlla_reference.py``.
"""
from .backbone import MLLA
from .mlla import ARCH_SETTINGS
from .roi_align import SparseRoIAlign, SparseRoIExtractor, sparse_roi_align
from .timm_mlla import MLLAClassifier, checkpoint_filter_fn, load_checkpoint_weights

__all__ = ['MLLA', 'ARCH_SETTINGS', 'MLLAClassifier', 'checkpoint_filter_fn', 'load_checkpoint_weights',
           'SparseRoIAlign', 'SparseRoIExtractor', 'sparse_roi_align']
