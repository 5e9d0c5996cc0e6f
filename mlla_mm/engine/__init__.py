"""Training-side helpers shared by tools/train.py and tools/test.py."""
from .optim import CPUAutocastOptimWrapper
from .hooks import (FiniteLossHook, InjectNaNHook, NonFiniteLossError, RandomStateHook, SafeRunner,
                    find_resumable_checkpoint)
from .launch import DataNotFoundError, check_data, prepare_config

__all__ = ['CPUAutocastOptimWrapper', 'DataNotFoundError', 'check_data', 'prepare_config', 'SafeRunner',
           'RandomStateHook', 'FiniteLossHook', 'InjectNaNHook', 'NonFiniteLossError',
           'find_resumable_checkpoint']
