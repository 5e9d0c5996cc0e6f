"""What a run on a CUDA machine needs that a CPU run does not: checked before any work (issue 29).

* :func:`mmcv_cuda_problem`: mmdet's detectors run mmcv's NMS / RoIAlign
  kernels on GPU tensors; an mmcv built with its CPU ops only (the set-up's
  CPU build) fails there inside the first RPN step. On a machine with a GPU
  this says so before the run starts (``tools/train.py`` / ``test.py`` turn it
  into one ``error:`` line).
* :func:`cuda_amp_settings`: ``--amp`` on CUDA is fp16 autocast with a dynamic
  loss scale (mmengine's ``AmpOptimWrapper``); ``optim_wrapper.dtype=bfloat16``
  (``--cfg-options``) asks for bf16 on GPUs that support it.

The CPU-only settings (bf16 CPU autocast, gloo, tuned glibc malloc) are made
only where there is no CUDA: :mod:`mlla_mm.engine.runner`, :mod:`mlla_mm.engine.launch`.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

#: How to get mmcv's CUDA ops, for the error messages.
REBUILD_HINT = ('run `make setup` (tools/setup_env.sh builds mmcv with its CUDA kernels where torch sees a GPU, '
                'docs/gpu.md), or run on the CPU with CUDA_VISIBLE_DEVICES=""')


def mmcv_compiling_cuda_version() -> str:
    """``mmcv.ops.get_compiling_cuda_version()``: e.g. ``'13.0'``, or ``'not available'`` for a CPU-only build."""
    from mmcv.ops import get_compiling_cuda_version
    return str(get_compiling_cuda_version())


def mmcv_cuda_problem(default_scope: str, cuda_available: Optional[bool] = None,
                      compiled: Optional[Callable[[], str]] = None) -> Optional[str]:
    """Why this machine's mmcv cannot run a detector of ``default_scope`` on its GPU; None when it can.

    Only mmdet models need mmcv's ops on the GPU (NMS, RoIAlign, deformable
    attention); mmseg's UperNet does not, and a machine without CUDA runs
    mmcv's CPU ops.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available or default_scope != 'mmdet':
        return None
    try:
        version = (compiled or mmcv_compiling_cuda_version)()
    except Exception as err:  # noqa: BLE001 (mmcv without its compiled ops raises ImportError / ModuleNotFoundError)
        return f'mmcv\'s compiled ops do not load ({type(err).__name__}: {" ".join(str(err).split())}): {REBUILD_HINT}'
    if not version or version.strip().lower() in ('not available', 'none', '0'):
        return ('this machine has a GPU but mmcv was built without CUDA kernels (its NMS and RoIAlign run on the '
                f'CPU only, so the detector would fail in its first step): {REBUILD_HINT}')
    runtime = torch.version.cuda or ''
    if runtime and version.split('.')[0] != runtime.split('.')[0]:
        return (f'mmcv\'s CUDA kernels were built for CUDA {version}, torch uses CUDA {runtime}: {REBUILD_HINT}')
    return None


def cuda_amp_settings(dtype: Optional[str], bf16_supported: Optional[Callable[[], bool]] = None) -> Dict[str, str]:
    """The ``AmpOptimWrapper`` settings of ``--amp`` on CUDA: fp16 with a dynamic loss scale, or bf16 by option.

    Args:
        dtype: The config's ``optim_wrapper.dtype`` (None: fp16).
        bf16_supported: ``torch.cuda.is_bf16_supported`` (a stand-in in tests).

    Raises:
        ValueError: Another dtype, or bf16 on a GPU without it.
    """
    dtype = {None: 'float16', 'fp16': 'float16', 'half': 'float16', 'bf16': 'bfloat16'}.get(dtype, dtype)
    if dtype not in ('float16', 'bfloat16'):
        raise ValueError(f'--amp on CUDA: optim_wrapper.dtype must be float16 or bfloat16, got {dtype!r}')
    if dtype == 'bfloat16' and not (bf16_supported or torch.cuda.is_bf16_supported)():
        raise ValueError('--amp with optim_wrapper.dtype=bfloat16: this GPU does not support bf16 '
                         '(use the default fp16)')
    return dict(type='AmpOptimWrapper', loss_scale='dynamic', dtype=dtype)


__all__ = ['mmcv_cuda_problem', 'cuda_amp_settings', 'mmcv_compiling_cuda_version', 'REBUILD_HINT']
