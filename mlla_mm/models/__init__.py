"""Models of mlla-mm. Importing this needs only torch, mmengine and timm."""
from .mlla import MLLA, ARCH_SETTINGS

__all__ = ['MLLA', 'ARCH_SETTINGS']
