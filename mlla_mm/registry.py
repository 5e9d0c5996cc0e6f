"""Registries of mlla-mm.

mlla-mm has its own ``MODELS`` registry (scope ``mlla_mm``), a child of
mmengine's root registry, as mmpretrain does. Modules meant to be swapped
into existing mmdet and mmseg configs are also registered in the root
registry, so ``type='MLLA'`` resolves from any default scope once
``custom_imports=dict(imports=['mlla_mm'])`` has run, and
``type='mlla_mm.MLLA'`` works everywhere. Its ``VISUALIZERS`` registry (scope
``mlla_mm`` too) holds ``FastDetVisualizer``, found as
``type='mlla_mm.FastDetVisualizer'``.
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import VISUALIZERS as MMENGINE_VISUALIZERS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mlla_mm', locations=['mlla_mm.models'])


def register_everywhere(cls: type) -> type:
    """Register ``cls`` in mlla-mm's registry and in mmengine's root one."""
    MODELS.register_module(module=cls)
    MMENGINE_MODELS.register_module(module=cls)
    return cls


# Visualizers (``type='mlla_mm.FastDetVisualizer'`` in a config): mmengine
# imports ``mlla_mm.visualization`` on first use, so ``import mlla_mm`` stays
# free of matplotlib and OpenCV drawing code.
VISUALIZERS = Registry('visualizer', parent=MMENGINE_VISUALIZERS, scope='mlla_mm',
                       locations=['mlla_mm.visualization'])
