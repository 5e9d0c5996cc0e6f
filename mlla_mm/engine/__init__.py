"""Training-side helpers shared by tools/train.py and tools/test.py."""
from .optim import CPUAutocastOptimWrapper
from .launch import DataNotFoundError, check_data, prepare_config

__all__ = ['CPUAutocastOptimWrapper', 'DataNotFoundError', 'check_data', 'prepare_config']
