"""mlla-mm: the MLLA backbone for mmdet 3.x and mmsegmentation 1.x.

``custom_imports=dict(imports=['mlla_mm'], allow_failed_imports=False)`` in a
config registers ``MLLA`` (usable as ``type='MLLA'`` from any scope) and makes
mmengine read checkpoints through mlla-mm's safe loader. Importing it also
registers the ImageNet classifiers ``mlla_tiny``, ``mlla_small`` and
``mlla_base`` in timm (``timm.create_model('mlla_tiny')``).
"""
from . import engine  # noqa: F401  (registers CPUAutocastOptimWrapper)
from .checkpoint import register_mmengine_loader
from .models import MLLA
from .version import __version__

register_mmengine_loader()

__all__ = ['MLLA', '__version__']
