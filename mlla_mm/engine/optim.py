"""An optimizer wrapper for bfloat16 autocast on the CPU.

mmengine's ``AmpOptimWrapper`` requires CUDA (or NPU/MLU); on a CPU,
``--amp`` uses this one: autocast to bfloat16 in the forward, no loss scaling
(bfloat16 has float32's exponent range).
"""
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module()
class CPUAutocastOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose ``optim_context`` autocasts to ``dtype`` on the CPU."""

    def __init__(self, *args, dtype: str = 'bfloat16', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if dtype not in ('bfloat16', 'float16'):
            raise ValueError(f'CPUAutocastOptimWrapper: dtype must be bfloat16 or float16, got {dtype!r}')
        self.cast_dtype = getattr(torch, dtype)

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        with super().optim_context(model), torch.autocast('cpu', dtype=self.cast_dtype):
            yield
