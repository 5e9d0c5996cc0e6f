"""Crash-safe training: atomic checkpoints, resumable random state, a loss guard.

- :class:`SafeRunner` (``runner_type='SafeRunner'``, set by
  :func:`~mlla_mm.engine.launch.prepare_config`) writes every checkpoint to a
  hidden temporary file in the same folder, flushes and fsyncs it, then renames
  it into place: a kill at any moment leaves the previous checkpoint intact
  and never a truncated ``epoch_N.pth``. Auto-resume (``--resume`` without a
  file) skips a damaged or dangling ``last_checkpoint`` marker and falls back
  to the newest checkpoint in the work dir. Checkpoints given to ``load_from``
  are checked against the model: a checkpoint of another MLLA size or of
  another model entirely is a clear error instead of mmengine's warnings.
- :class:`RandomStateHook` stores python/NumPy/torch random states and the
  run's seed in every checkpoint and restores them on resume, so a resumed
  run on the CPU continues exactly like an uninterrupted one.
- :class:`FiniteLossHook` stops training with :class:`NonFiniteLossError`
  when the loss becomes NaN or infinite (naming the iteration) and refuses to
  save a checkpoint whose weights are not finite.
"""
from __future__ import annotations

import functools
import glob
import math
import os
import os.path as osp
import random
import re
import time
import zipfile
from typing import Any, Dict, Optional

import numpy as np
import torch
from mmengine.dist import master_only
from mmengine.hooks import Hook
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.registry import HOOKS, RUNNERS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint, _load_checkpoint_to_model

from ..checkpoint import CheckpointError

#: ``FILENAME:SECONDS`` - testing aid: half-write the temporary file of the
#: checkpoint FILENAME, then sleep SECONDS before finishing it (to kill a run
#: in the middle of a checkpoint write).
SAVE_PAUSE_ENV = 'MLLA_MM_DEBUG_SAVE_PAUSE'
_TMP_TAG = '.tmp-'
_CKPT_NAME = re.compile(r'^(epoch|iter)_(\d+)\.pth$')


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights about to be saved) became NaN or infinite."""


def _tmp_name(filename: str) -> str:
    return f'.{filename}{_TMP_TAG}{os.getpid()}'


def remove_stale_temp_files(folder: str) -> None:
    """Delete temporary checkpoint files that a killed run left behind."""
    for path in glob.glob(osp.join(glob.escape(folder), f'.*.pth{_TMP_TAG}*')):
        try:
            os.unlink(path)
        except OSError:
            pass


def _is_readable_checkpoint(path: str) -> bool:
    """A cheap check: a complete torch zip archive (its central directory is written last)."""
    if not path or not osp.isfile(path) or osp.getsize(path) == 0:
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith('data.pkl') for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def find_resumable_checkpoint(work_dir: str, logger: Any = None) -> Optional[str]:
    """The checkpoint to auto-resume from, or ``None``.

    ``work_dir/last_checkpoint`` is used when it names a readable checkpoint;
    otherwise the newest readable ``epoch_N.pth`` / ``iter_N.pth`` in
    ``work_dir`` (newest by N, then by modification time).
    """
    marker = osp.join(work_dir, 'last_checkpoint')
    named = ''
    if osp.isfile(marker):
        with open(marker) as f:
            named = f.read().strip()
        if _is_readable_checkpoint(named):
            return named
    candidates = []
    for name in os.listdir(work_dir) if osp.isdir(work_dir) else []:
        m = _CKPT_NAME.match(name)
        if m:
            path = osp.join(work_dir, name)
            candidates.append((int(m.group(2)), osp.getmtime(path), path))
    for _, _, path in sorted(candidates, reverse=True):
        if _is_readable_checkpoint(path):
            if logger is not None and osp.isfile(marker):
                logger.warning(f'{marker} names {named!r}, which is missing or unreadable; '
                               f'resuming from {path} instead.')
            return path
    return None


def check_checkpoint_fits(model: torch.nn.Module, state_dict: Dict[str, Any], filename: str) -> None:
    """Raise :class:`CheckpointError` when ``state_dict`` cannot be meant for ``model``.

    Backbone tensors of another shape (another MLLA size) or no tensor in
    common at all (another model) are errors; other shape differences (e.g.
    a head with another number of classes when fine-tuning) are left to
    mmengine, which skips them with a warning.
    """
    own = model.state_dict()
    keys = [re.sub(r'^module\.', '', k) for k in state_dict]
    common = [k for k in keys if k in own]
    if own and not common:
        sample = ', '.join(keys[:4]) or 'none'
        hint = (' It looks like backbone-only weights: load them with model.backbone.init_cfg='
                "dict(type='Pretrained', checkpoint=...) instead of load_from."
                if any(k.startswith(('layers.', 'patch_embed.')) for k in keys) else '')
        raise CheckpointError(
            f'{filename}: none of its {len(keys)} tensors belong to this model '
            f'(file keys e.g. {sample}; model keys e.g. {", ".join(list(own)[:3])}): '
            f'a checkpoint of another model?{hint}')
    wrong = [f'{k}: file {tuple(state_dict[o].shape)} vs model {tuple(own[k].shape)}'
             for o, k in zip(state_dict, keys)
             if k.startswith('backbone.') and k in own and hasattr(state_dict[o], 'shape')
             and tuple(state_dict[o].shape) != tuple(own[k].shape)]
    if wrong:
        raise CheckpointError(
            f'{filename}: {len(wrong)} backbone tensor(s) have the wrong shape, e.g. {"; ".join(wrong[:2])}. '
            'Is it a checkpoint of another MLLA size (arch)?')


@RUNNERS.register_module()
class SafeRunner(Runner):
    """mmengine's Runner with atomic checkpoint saving and checked loading."""

    @master_only
    def save_checkpoint(self, out_dir: str, filename: str, file_client_args: Optional[dict] = None,
                        save_optimizer: bool = True, save_param_scheduler: bool = True,
                        meta: Optional[dict] = None, by_epoch: bool = True,
                        backend_args: Optional[dict] = None) -> None:
        local = '://' not in str(out_dir) and file_client_args is None and not backend_args
        if not local:  # remote storage: no rename there, keep mmengine's way
            return super().save_checkpoint(out_dir, filename, file_client_args, save_optimizer,
                                           save_param_scheduler, meta, by_epoch, backend_args)
        os.makedirs(out_dir, exist_ok=True)
        final = osp.join(out_dir, filename)
        tmp_name = _tmp_name(filename)
        tmp = osp.join(out_dir, tmp_name)
        try:
            super().save_checkpoint(out_dir, tmp_name, None, save_optimizer, save_param_scheduler,
                                    meta, by_epoch, None)
            _debug_pause(filename, tmp)
            with open(tmp, 'rb+') as f:
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(out_dir)
        finally:
            if osp.exists(tmp):
                os.unlink(tmp)

    def load_checkpoint(self, filename: str, map_location: Any = 'cpu', strict: bool = False,
                        revise_keys: list = [(r'^module\.', '')]) -> dict:  # noqa: B006 (mmengine's signature)
        checkpoint = _load_checkpoint(filename, map_location=map_location)
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f'{filename}: expected a dict, got {type(checkpoint).__name__}')
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        state_dict = checkpoint.get('state_dict', checkpoint)
        if not isinstance(state_dict, dict):
            raise CheckpointError(f'{filename}: no state_dict of tensors in it')
        # A test-time-augmentation wrapper holds the real model as .module (mmengine's loader unwraps it too).
        check_checkpoint_fits(model.module if isinstance(model, BaseTTAModel) else model, state_dict, filename)
        checkpoint = _load_checkpoint_to_model(model, checkpoint, strict, revise_keys=revise_keys)
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint

    def load_or_resume(self) -> None:
        if self._has_loaded:
            return None
        if self._resume and self._load_from is None:
            remove_stale_temp_files(self.work_dir)
            resume_from = find_resumable_checkpoint(self.work_dir, self.logger)
            if resume_from is None:
                self.logger.info(f'No checkpoint to resume from in {self.work_dir}; starting from scratch.')
                return None
            self.logger.info(f'Auto resumed from the latest checkpoint {resume_from}.')
            self.resume(resume_from)
            self._has_loaded = True
            return None
        return super().load_or_resume()


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _debug_pause(filename: str, tmp: str) -> None:
    spec = os.environ.get(SAVE_PAUSE_ENV, '')
    name, _, seconds = spec.rpartition(':')
    if not spec or name != filename:
        return
    with open(tmp, 'rb') as f:
        data = f.read()
    with open(tmp, 'wb') as f:
        f.write(data[:len(data) // 2])
        f.flush()
        print(f'[{SAVE_PAUSE_ENV}] {tmp} half written; pausing {seconds} s', flush=True)
        time.sleep(float(seconds))
        f.write(data[len(data) // 2:])


# --------------------------------------------------------------------------
# Random state.
# --------------------------------------------------------------------------
def get_random_state(seed: Optional[int] = None) -> Dict[str, Any]:
    """The global random states of python, NumPy and torch (plus the run's seed)."""
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state(),
             'seed': seed}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`get_random_state` returned."""
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state['numpy']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        cuda = state['cuda']
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _reseed_dataloader(loader: Any, seed: int) -> None:
    """Point a dataloader's sampler and worker seeding at ``seed``."""
    sampler = getattr(loader, 'sampler', None)
    if sampler is not None and hasattr(sampler, 'seed'):
        sampler.seed = seed
    batch_sampler = getattr(loader, 'batch_sampler', None)
    inner = getattr(batch_sampler, 'sampler', None)
    if inner is not None and inner is not sampler and hasattr(inner, 'seed'):
        inner.seed = seed
    fn = getattr(loader, 'worker_init_fn', None)
    if isinstance(fn, functools.partial) and 'seed' in fn.keywords:
        loader.worker_init_fn = functools.partial(fn.func, *fn.args, **dict(fn.keywords, seed=seed))


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Save the random state in checkpoints and restore it on resume.

    mmengine stores the seed but not the state of the random generators, so a
    resumed run draws other random numbers (flips, proposal sampling, drop
    path) than an uninterrupted one. This hook stores python's, NumPy's and
    torch's generator states under ``checkpoint['rng_state']`` and restores
    them when training starts again after ``resume`` (not for ``load_from``),
    together with the seed of the train dataloader's sampler and worker
    initialisation. Exact continuation needs ``num_workers=0`` or
    non-persistent workers: a persistent worker's own generator is not saved.
    """

    priority = 'VERY_LOW'

    def __init__(self) -> None:
        self._pending: Optional[Dict[str, Any]] = None

    def before_save_checkpoint(self, runner: Runner, checkpoint: dict) -> None:
        checkpoint['rng_state'] = get_random_state(runner.seed)

    def after_load_checkpoint(self, runner: Runner, checkpoint: dict) -> None:
        if getattr(runner, '_resume', False) and isinstance(checkpoint.get('rng_state'), dict):
            self._pending = checkpoint['rng_state']

    def before_train(self, runner: Runner) -> None:
        # Restored here, not in after_load_checkpoint: Runner.resume may reseed afterwards.
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        seed = state.get('seed')
        if seed is not None:
            runner._seed = seed
            runner._randomness_cfg.update(seed=seed)
            _reseed_dataloader(runner.train_dataloader, seed)
        set_random_state(state)
        runner.logger.info('Restored the random state saved in the checkpoint (python, numpy, torch).')


# --------------------------------------------------------------------------
# NaN / inf guard.
# --------------------------------------------------------------------------
def _as_float(value: Any) -> Optional[float]:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean()) if value.numel() else None
    if isinstance(value, (int, float, np.floating, np.integer)):
        return float(value)
    return None


@HOOKS.register_module()
class FiniteLossHook(Hook):
    """Stop training when the loss becomes NaN or infinite.

    Raises :class:`NonFiniteLossError` naming the iteration (1-based, as in
    the log) right after the iteration that produced it, before any
    checkpoint hook runs, so the last good checkpoint is never overwritten.
    As a second line of defence it refuses to save a checkpoint whose
    floating-point weights are not all finite.
    """

    priority = 'VERY_HIGH'

    def after_train_iter(self, runner: Runner, batch_idx: int, data_batch: Any = None,
                         outputs: Optional[dict] = None) -> None:
        if not isinstance(outputs, dict):
            return
        bad = {}
        for key, value in outputs.items():
            if 'loss' not in key:
                continue
            v = _as_float(value)
            if v is not None and not math.isfinite(v):
                bad[key] = v
        if not bad:
            return
        total = bad.get('loss')
        parts = ', '.join(f'{k}={v}' for k, v in bad.items() if k != 'loss')
        what = f'loss = {total}' if total is not None else 'a loss term is not finite'
        last = runner.message_hub.get_info('last_ckpt')
        msg = (f'{what} at iteration {runner.iter + 1} (epoch {runner.epoch + 1}, batch {batch_idx + 1})'
               + (f' [{parts}]' if parts else '')
               + '; training stopped. '
               + (f'The last good checkpoint {last} was kept.' if last else 'No checkpoint had been saved yet.')
               + ' Try a lower learning rate, gradient clipping (optim_wrapper.clip_grad) or check the data.')
        runner.logger.error(msg)
        raise NonFiniteLossError(msg)

    def before_save_checkpoint(self, runner: Runner, checkpoint: dict) -> None:
        for name, t in checkpoint.get('state_dict', {}).items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                msg = (f'refusing to save a checkpoint at iteration {runner.iter + 1}: weight {name} is not '
                       'finite (NaN/inf); training stopped and the last good checkpoint was kept.')
                runner.logger.error(msg)
                raise NonFiniteLossError(msg)


@HOOKS.register_module()
class InjectNaNHook(Hook):
    """Testing aid: make the loss NaN from iteration ``at_iter`` (1-based) on.

    It fills one parameter of the model with NaN before that iteration.
    """

    priority = 'VERY_HIGH'

    def __init__(self, at_iter: int) -> None:
        self.at_iter = int(at_iter)

    def before_train_iter(self, runner: Runner, batch_idx: int, data_batch: Any = None) -> None:
        if runner.iter + 1 == self.at_iter:
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            param = next(p for p in model.parameters() if p.requires_grad)
            with torch.no_grad():
                param.fill_(float('nan'))


__all__ = ['SafeRunner', 'RandomStateHook', 'FiniteLossHook', 'InjectNaNHook', 'NonFiniteLossError',
           'find_resumable_checkpoint', 'check_checkpoint_fits', 'remove_stale_temp_files',
           'get_random_state', 'set_random_state', 'SAVE_PAUSE_ENV']
