"""An optimizer wrapper for bfloat16 autocast on the CPU.

mmengine's ``AmpOptimWrapper`` requires CUDA (or NPU/MLU). On a CPU,
``--amp`` uses this one: the parts of the model where the time goes (the
backbone, the neck, the RPN head, the box and mask heads of a detector, the
decode and auxiliary heads of a segmentor) run under bfloat16 autocast and
hand float32 outputs on, because mmcv's CPU ops (nms, RoIAlign) only take
float32 and the losses are computed in float32. No loss scaling is needed:
bfloat16 has float32's exponent range.
"""
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

# The parts of mmdet's and mmseg's models that run under autocast: everything
# with convolutions or linear layers, nothing that calls mmcv's float32-only ops.
AUTOCAST_MODULES = ('backbone', 'neck', 'rpn_head', 'roi_head.bbox_head', 'roi_head.mask_head',
                    'decode_head', 'auxiliary_head')
# mmseg's decode heads call ``self.forward`` from ``loss``: their children are hooked instead.
BY_CHILDREN = ('decode_head', 'auxiliary_head')


def _to_float(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    return out


def find_module(model: nn.Module, path: str) -> Optional[nn.Module]:
    """``model.a.b`` for ``path='a.b'``; an ``nn.ModuleList`` (cascade heads) is returned as it is; None if absent."""
    module: Any = model
    for name in path.split('.'):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


@OPTIM_WRAPPERS.register_module()
class CPUAutocastOptimWrapper(OptimWrapper):
    """``OptimWrapper`` that autocasts the compute-heavy parts of the model to ``dtype`` on the CPU.

    Args:
        dtype: ``'bfloat16'`` (default) or ``'float16'``.
        modules: Dotted names of the submodules run under autocast (those a
            model does not have are skipped); each returns float32 tensors.
            The members of an ``nn.ModuleList`` (Cascade R-CNN's stages) are
            taken one by one. Names in ``by_children`` are run child by
            child instead, for modules whose own code calls ``self.forward``
            directly (mmseg's decode heads), which forward hooks do not see.
        by_children: See ``modules``.
    """

    def __init__(self, *args, dtype: str = 'bfloat16', modules: Sequence[str] = AUTOCAST_MODULES,
                 by_children: Sequence[str] = BY_CHILDREN, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if dtype not in ('bfloat16', 'float16'):
            raise ValueError(f'CPUAutocastOptimWrapper: dtype must be bfloat16 or float16, got {dtype!r}')
        for arg, names in (('modules', modules), ('by_children', by_children)):
            if isinstance(names, str) or not all(isinstance(m, str) and m for m in names):
                raise ValueError(f'CPUAutocastOptimWrapper: {arg} must be a list of dotted module names, '
                                 f'got {names!r}')
        self.cast_dtype = getattr(torch, dtype)
        self.module_names = tuple(modules)
        self.by_children = frozenset(by_children)
        self._hooked: set = set()
        self._active = False

    def _hook(self, module: nn.Module) -> None:
        state = {}

        def enter(mod, args):
            if self._active and not torch.is_autocast_enabled('cpu'):
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

    def autocast_modules(self, model: nn.Module) -> List[nn.Module]:
        """The submodules of ``model`` that run under autocast (after unwrapping DDP)."""
        model = model.module if is_model_wrapper(model) else model
        found: List[nn.Module] = []

        def add(module: nn.Module) -> None:
            if isinstance(module, nn.ModuleList):
                found.extend(module)
            else:
                found.append(module)

        for name in self.module_names:
            child = find_module(model, name)
            if child is None:
                continue
            if name in self.by_children:
                for grandchild in child.children():
                    add(grandchild)
            else:
                add(child)
        return found

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        for child in self.autocast_modules(model):
            if id(child) not in self._hooked:
                self._hook(child)
                self._hooked.add(id(child))
        self._active = True
        try:
            with super().optim_context(model):
                yield
        finally:
            self._active = False
