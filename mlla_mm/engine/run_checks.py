"""What a run checks and settles from its config before anything is built (SafeRunner calls it, once).

:class:`~mlla_mm.engine.runner.SafeRunner` runs :func:`check_run` before
mmengine's ``Runner.__init__`` makes the work dir and its timestamped log
folder, so ``RUNNERS.build(cfg)`` in a script of one's own and
``tools/train.py`` / ``tools/test.py`` stop on the same one-line error:

- the settings mmengine only checks deep inside ``train()`` / ``test()``
  (:func:`check_run_settings`);
- a CPU-only mmcv on a machine with a GPU (:func:`~mlla_mm.engine.device.mmcv_cuda_problem`);
- the synthetic data set a demo config names (made here, before it is checked);
- the neck-channel check and the data checks of the dataloaders the run uses
  (:func:`mlla_mm.datasets.checks.check_data`; ``skip_bad_images=True`` in the
  config points the datasets at filtered copies);
- a whole-model checkpoint (``resume`` from a file, or
  ``CheckpointGuardHook(whole_model=True)`` as tools/test.py sets it) read
  against the config's model on the meta device (:func:`check_whole_checkpoint`).

The AMP policy (:func:`amp_optim_wrapper_cfg`) is decided here too, once, for
``--amp`` and for a config's own ``AmpOptimWrapper``.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.model import BaseTTAModel
from mmengine.registry import MODELS, DefaultScope

from ..checkpoint import check_checkpoint_fits, load_file
from ..datasets.checks import check_data
from ..datasets.synthetic import make_synthetic_data
from ..errors import CheckpointError, UsageError
from ..utils import cpu
from .device import cuda_amp_settings, mmcv_cuda_problem
from .schedules import schedule_errors

#: The dataloaders a training run uses (and checks); a run without training uses its test (else val) loader.
TRAIN_LOADERS = ('train_dataloader', 'val_dataloader')


def loaders_of_run(cfg: Any) -> Tuple[str, ...]:
    """The dataloaders a runner built from ``cfg`` runs: train and val when it trains, else test (or val)."""
    if cfg.get('train_dataloader'):
        return TRAIN_LOADERS
    return ('test_dataloader', ) if cfg.get('test_dataloader') else ('val_dataloader', )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_run_settings(cfg: Any, check: Sequence[str], config_path: str) -> None:
    """Settings that mmengine only checks deep inside ``train()`` / ``test()``: one clear error up front.

    The dataloaders in ``check``: ``batch_size`` >= 1, ``num_workers`` >= 0;
    when training: ``train_cfg.max_epochs`` / ``max_iters`` >= 1 and a
    numeric learning rate >= 0.
    """
    for name in check:
        loader = cfg.get(name)
        if not isinstance(loader, dict):
            continue
        bs, workers = loader.get('batch_size', 1), loader.get('num_workers', 0)
        if not _is_int(bs) or bs < 1:
            raise UsageError(f'{config_path}: {name}.batch_size must be an integer >= 1, got {bs!r}')
        if not _is_int(workers) or workers < 0:
            raise UsageError(f'{config_path}: {name}.num_workers must be an integer >= 0, got {workers!r}')
    if 'train_dataloader' in check:
        train_cfg = cfg.get('train_cfg') or {}
        for key in ('max_epochs', 'max_iters'):
            value = train_cfg.get(key)
            if value is not None and (not _is_int(value) or value < 1):
                raise UsageError(f'{config_path}: train_cfg.{key} must be an integer >= 1, got {value!r}')
        lr = (cfg.get('optim_wrapper') or {}).get('optimizer', {}).get('lr')
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0):
            raise UsageError(f'{config_path}: optim_wrapper.optimizer.lr must be a number >= 0, got {lr!r}')
        problems = schedule_errors(cfg)  # mmengine's raw ValueError when it builds the schedulers
        if problems:
            raise UsageError(f'{config_path}: {problems[0]}')


def skip_unneeded_pretrained(cfg: Any) -> Optional[str]:
    """A run that loads a whole model (``load_from``, ``--resume FILE``) needs no backbone pretrained file.

    When ``model.backbone.init_cfg`` names a ``Pretrained`` checkpoint that
    is not there, the backbone would say it is randomly initialised (or stop,
    with ``if_missing='error'``) right before ``load_from`` gives it its
    weights; its ``init_cfg`` is dropped instead. Returns the line to log, or
    ``None`` when nothing changed.
    """
    load_from = cfg.get('load_from')
    model = cfg.get('model')
    backbone = model.get('backbone') if isinstance(model, dict) else None  # (a built model: nothing to drop)
    init = backbone.get('init_cfg') if isinstance(backbone, dict) else None
    if not load_from or not isinstance(init, dict) or init.get('type') != 'Pretrained':
        return None
    path = init.get('checkpoint')
    if not isinstance(path, str) or os.path.isfile(os.path.expanduser(path)):
        return None
    backbone['init_cfg'] = None
    return (f'model.backbone.init_cfg.checkpoint {path} is not there and not needed: the weights come from '
            f'{load_from}')


def check_checkpoint_for_model(model: torch.nn.Module, checkpoint: Any, filename: str, whole: bool) -> None:
    """CheckpointGuardHook's check of a loaded ``checkpoint`` against ``model`` (also run before the runner).

    Raises:
        CheckpointError: Not a dict, no state dict, or it does not fit
            (:func:`~mlla_mm.checkpoint.check_checkpoint_fits`; ``whole``: every tensor of the model in it).
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{filename}: expected a dict, got {type(checkpoint).__name__}')
    state_dict = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state_dict, dict):
        raise CheckpointError(f'{filename}: no state_dict of tensors in it')
    # A test-time-augmentation wrapper holds the real model as .module (mmengine's loader unwraps it too).
    check_checkpoint_fits(model.module if isinstance(model, BaseTTAModel) else model, state_dict, filename,
                          whole=whole)


def check_whole_checkpoint(model_cfg: Dict, default_scope: str, path: str) -> None:
    """The whole-model check of ``path`` against the model of ``model_cfg``, before the runner exists.

    The model is built on the meta device (no memory, no weight
    initialisation) and the file is read to it (names and shapes only), so a
    checkpoint of another task or MLLA size is one error line, raised before
    mmengine makes its timestamped log folder. A model that cannot be built
    that way (one that loads weights while it is built) is left to the
    runner, whose :class:`~mlla_mm.engine.hooks.CheckpointGuardHook` makes the
    same check when it loads the file.

    Raises:
        CheckpointError: The file is not a whole checkpoint of this model (names it and example tensors), or
            holds no state dict.
    """
    try:
        with warnings.catch_warnings(), DefaultScope.overwrite_default_scope(default_scope):
            warnings.simplefilter('ignore')  # the runner builds the model again and shows them
            with torch.device('meta'):
                model = MODELS.build(copy.deepcopy(model_cfg))
    except Exception:  # noqa: BLE001 (the runner builds it for real and reports what is wrong)
        return
    check_checkpoint_for_model(model, load_file(path, map_location='meta'), path, whole=True)


def check_run(cfg: Any, which: Sequence[str], config_path: str, whole_checkpoint: Optional[str] = None) -> None:
    """Everything a run checks from its config before anything is built (see the module docstring).

    Args:
        cfg: The run's config (``work_dir`` set: ``skip_bad_images`` writes its filtered copies there). The
            datasets of ``which`` may be pointed at filtered copies.
        which: The dataloaders the run uses (:func:`loaders_of_run`).
        config_path: Names the config in the messages.
        whole_checkpoint: A checkpoint that must hold every tensor of the model (or None).

    Raises:
        UsageError, DataNotFoundError (and subclasses), CheckpointError: one line naming what to fix.
    """
    check_run_settings(cfg, which, config_path)
    problem = mmcv_cuda_problem(cfg.get('default_scope', 'mmdet'))  # a CPU-only mmcv on a GPU machine
    if problem:
        raise UsageError(f'{config_path}: {problem}')
    make_synthetic_data(cfg)  # the demo's data set, before it is checked (every process: reused when complete)
    check_data(cfg, tuple(which), config_path)
    if whole_checkpoint and isinstance(cfg.get('model'), dict):
        check_whole_checkpoint(cfg.get('model'), cfg.get('default_scope', 'mmdet'), whole_checkpoint)


# --------------------------------------------------------------------------
# The AMP policy.
# --------------------------------------------------------------------------
def _is_amp(kind: Any) -> bool:
    return kind in ('AmpOptimWrapper', 'mmengine.AmpOptimWrapper') or getattr(kind, '__name__', '') == 'AmpOptimWrapper'


def amp_optim_wrapper_cfg(optim_wrapper: Dict, cuda: Optional[bool] = None) -> Tuple[Dict, List[str]]:
    """The one AMP policy: what an ``AmpOptimWrapper`` config (a config's own, or ``--amp``) runs as here.

    - On CUDA: fp16 autocast with a dynamic loss scale, or bf16 with
      ``dtype='bfloat16'`` on GPUs that support it
      (:func:`~mlla_mm.engine.device.cuda_amp_settings`).
    - Without CUDA: a bf16 :class:`~mlla_mm.engine.optim.CPUAutocastOptimWrapper`
      (mmengine's AmpOptimWrapper needs CUDA), with a warning when bf16 would be
      slower than fp32 on this CPU (no AMX or AVX512-BF16: oneDNN emulates it,
      MLLA-T inference 9.7x slower on an AVX2 EPYC, docs/benchmarks.md).

    Any other wrapper is returned as it is. ``optim_wrapper`` is not changed.

    Returns:
        The wrapper config to build and the warning lines to log.

    Raises:
        UsageError: On CUDA, a dtype other than float16 / bfloat16, or bf16 on a GPU without it.
    """
    if not isinstance(optim_wrapper, dict) or not _is_amp(optim_wrapper.get('type')):
        return optim_wrapper, []
    out = copy.copy(optim_wrapper)
    if torch.cuda.is_available() if cuda is None else cuda:
        try:
            out.update(cuda_amp_settings(out.get('dtype')))
        except ValueError as err:
            raise UsageError(str(err)) from None
        return out, []
    for key in ('loss_scale', 'use_fsdp'):
        out.pop(key, None)
    out.update(type='CPUAutocastOptimWrapper', dtype='bfloat16')
    lines = ['No CUDA: AmpOptimWrapper (mixed precision, --amp) runs as CPUAutocastOptimWrapper (bf16 autocast '
             'of the backbone and neck).']
    fast, note = cpu.bf16_fast_on_this_cpu()  # looked up at call time (tests put a stand-in there)
    if not fast:
        lines.append(f'bf16 autocast will be slower than fp32 on this CPU: {note}')
    return out, lines


__all__ = ['check_run', 'check_run_settings', 'check_whole_checkpoint', 'check_checkpoint_for_model',
           'skip_unneeded_pretrained', 'loaders_of_run', 'amp_optim_wrapper_cfg', 'TRAIN_LOADERS']
