"""Small helpers shared by the model files (the bottom of ``mlla_mm.models``; imports only torch).

* tracing: :func:`is_tracing`;
* layout and padding of ``(B, H, W, C)`` token maps: :func:`dwconv_bhwc`,
  :func:`as_channels_last`, :func:`pad_to_multiple`, :func:`attention_dtype`;
* the switch of the fast inference path (:mod:`mlla_mm.models.fast_inference`).

The fast inference path switch
------------------------------
Like timm's ``fused_attn``, it is decided once per model, when the model is
built: every module that can take the fast path (the stem, the downsample
layers and the stages) keeps a ``fast_inference`` attribute, set from
:func:`fast_inference_default`, i.e. the environment variable
``MLLA_MM_FAST_INFERENCE``:

* unset (or empty) or ``1``: the fast path wherever it applies (the default);
* ``0``: always the model's autograd code.

Any other value is a ``ValueError`` naming the variable, raised when a model
is built. ``model.set_fast_inference(False)`` (or :func:`set_fast_inference`
on any module holding MLLA parts) changes it for one built model. Where it is
on, the fast path runs only where it computes the same numbers: the module
is in eval mode, no autograd graph is recorded and nothing is traced,
exported or compiled (:func:`use_fast_inference`, asked by each forward).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UsageError

FAST_INFERENCE_ENV = 'MLLA_MM_FAST_INFERENCE'
#: Devices where the fast path runs: it was designed and measured on CPUs; on CUDA the autograd code runs
#: until ``make gpu-check`` (tools/gpu_check.py, ``speed_infer``) measures the fast path faster there.
FAST_INFERENCE_DEVICES = ('cpu', )


def is_tracing() -> bool:
    """True under ``torch.jit.trace``, ONNX export, ``torch.compile``, ``torch.export`` or ``torch.fx`` tracing."""
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
                or torch.fx._symbolic_trace.is_fx_symbolic_tracing())


class FastInferenceSettingError(UsageError, ValueError):
    """``MLLA_MM_FAST_INFERENCE`` holds neither 0 nor 1 (a ValueError; the tools print it as one ``error:`` line)."""


def fast_inference_default() -> bool:
    """The switch for a model built now: ``MLLA_MM_FAST_INFERENCE`` (``1`` or unset: on, ``0``: off).

    Raises:
        ValueError: the variable holds anything else (the message names it).
    """
    value = os.environ.get(FAST_INFERENCE_ENV, '').strip()
    if value in ('', '1'):
        return True
    if value == '0':
        return False
    raise FastInferenceSettingError(f'{FAST_INFERENCE_ENV} must be 0 (always the autograd code) or 1 (the fast '
                                    f'inference path where it applies), got {os.environ[FAST_INFERENCE_ENV]!r}')


def set_fast_inference(module: nn.Module, enable: bool = True) -> nn.Module:
    """Switch the fast inference path of every MLLA part in ``module`` on or off; returns ``module``."""
    if not isinstance(enable, bool):
        raise ValueError(f'set_fast_inference: enable must be True or False, got {enable!r}')
    for m in module.modules():
        if isinstance(getattr(m, 'fast_inference', None), bool):
            m.fast_inference = enable
    return module


def use_fast_inference(module: nn.Module, x: torch.Tensor) -> bool:
    """May ``module`` run on ``x`` with the fast inference path?

    True when ``module.fast_inference`` is on (the switch above), ``module``
    and all its submodules are in eval mode (no dropout, drop-path or batch
    statistics), no autograd graph is recorded, and nothing is being traced,
    exported or compiled (those record the plain, real-valued code). Autocast
    is allowed (the fast path runs in the autocast dtype). Only on the
    devices of :data:`FAST_INFERENCE_DEVICES` (the CPU).
    """
    return (getattr(module, 'fast_inference', False) and x.device.type in FAST_INFERENCE_DEVICES
            and not torch.is_grad_enabled() and not is_tracing() and not any(m.training for m in module.modules()))


def dwconv_bhwc(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a convolution to a ``(B, H, W, C)`` tensor (a channels-last NCHW view), same layout out."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def as_channels_last(x: torch.Tensor) -> torch.Tensor:
    """An NCHW tensor in channels-last memory (no copy when it already is)."""
    return x.contiguous(memory_format=torch.channels_last)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad an NCHW map on the right and bottom to multiples of ``multiple``."""
    pad_h = (-x.shape[2]) % multiple
    pad_w = (-x.shape[3]) % multiple
    if is_tracing() or pad_h or pad_w:  # traced sizes: always pad (by zero or more)
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


def attention_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the attention maths runs in: float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


__all__ = ['FAST_INFERENCE_ENV', 'is_tracing', 'fast_inference_default', 'set_fast_inference', 'use_fast_inference',
           'dwconv_bhwc', 'as_channels_last', 'pad_to_multiple', 'attention_dtype']
