"""An optimizer wrapper for bfloat16 autocast on the CPU.

mmengine's ``AmpOptimWrapper`` requires CUDA (or NPU/MLU). On a CPU,
``--amp`` uses this one: the model's ``backbone`` and ``neck`` (where the
time goes) run under bfloat16 autocast and hand float32 features to the
heads, because mmcv's CPU ops (nms, RoIAlign) only take float32. No loss
scaling is needed: bfloat16 has float32's exponent range.
"""
from contextlib import contextmanager
from typing import Iterator, List

import torch
import torch.nn as nn
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS


def _to_float(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    return out


@OPTIM_WRAPPERS.register_module()
class CPUAutocastOptimWrapper(OptimWrapper):
    """``OptimWrapper`` that autocasts the feature extractor to ``dtype`` on the CPU.

    Args:
        dtype: ``'bfloat16'`` (default) or ``'float16'``.
        modules: Names of the model's children run under autocast.
    """

    def __init__(self, *args, dtype: str = 'bfloat16', modules: List[str] = ('backbone', 'neck'), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if dtype not in ('bfloat16', 'float16'):
            raise ValueError(f'CPUAutocastOptimWrapper: dtype must be bfloat16 or float16, got {dtype!r}')
        self.cast_dtype = getattr(torch, dtype)
        self.module_names = tuple(modules)
        self._hooked = set()
        self._active = False

    def _hook(self, module: nn.Module) -> None:
        state = {}

        def enter(mod, args):
            if self._active:
                state[id(mod)] = ctx = torch.autocast('cpu', dtype=self.cast_dtype)
                ctx.__enter__()

        def leave(mod, args, out):
            ctx = state.pop(id(mod), None)
            if ctx is None:
                return out
            ctx.__exit__(None, None, None)
            return _to_float(out)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        model = model.module if is_model_wrapper(model) else model
        for name in self.module_names:
            child = getattr(model, name, None)
            if isinstance(child, nn.Module) and id(child) not in self._hooked:
                self._hook(child)
                self._hooked.add(id(child))
        self._active = True
        try:
            with super().optim_context(model):
                yield
        finally:
            self._active = False
