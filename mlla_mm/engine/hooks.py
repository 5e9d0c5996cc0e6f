"""The reliability hooks of an mlla-mm run (listed in ``configs/_base_/mlla_runtime.py``).

They work with any mmengine Runner (``Runner.from_cfg`` included);
:class:`~mlla_mm.engine.runner.SafeRunner` always runs them.

- :class:`RandomStateHook`: exact resume. Python/NumPy/torch random states in
  every checkpoint, restored on resume; validation leaves the random state as
  it found it, so the saved state is the one training continues with; the
  train loop becomes its exact-resume counterpart
  (:func:`~mlla_mm.engine.loops.make_exact`: a resume from the middle of an
  epoch skips the batches already trained).
- :class:`ValidationResumeHook`: a run resumed from a checkpoint whose
  validation did not complete (killed during it) runs that validation first.
- :class:`PreemptionHook`: SIGTERM/SIGINT finish the current iteration, write
  a resumable checkpoint atomically, log one line and exit with 128 + the
  signal number.
- :class:`FiniteLossHook`: stop on a NaN/inf loss, never save non-finite weights.
- :class:`CheckpointGuardHook`: checkpoints are written atomically; a
  checkpoint of another model or MLLA size is an error naming the file, not
  mmengine's warnings.
"""
from __future__ import annotations

import functools
import json
import math
import os.path as osp
import signal
import threading
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.dist import all_reduce, get_world_size, is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import BaseLoop, EpochBasedTrainLoop, Runner

from ..errors import CheckpointError, NonFiniteLossError, TrainingAborted, TrainingInterrupted
from ..utils.io import atomic_write
from .loops import make_exact, validation_due
from .run_checks import check_checkpoint_for_model
from .rng import RandomStateError, check_random_state, get_random_state, set_random_state
from .work_dir import ATOMIC_BACKEND, checkpoint_name
from .workers import SignalSafeWorkerInit, guard_dataloader_workers, unwrap_worker_init

#: file in the work dir naming the last position whose validation completed
VALIDATION_MARKER = 'last_validation.json'


def _training(runner: Runner) -> bool:
    return isinstance(getattr(runner, '_train_loop', None), BaseLoop)


def _position(meta: Dict[str, Any]) -> Tuple[int, int]:
    return int(meta.get('epoch', 0)), int(meta.get('iter', 0))



# --------------------------------------------------------------------------
# Random state.
# --------------------------------------------------------------------------
def _reseed_dataloader(loader: Any, seed: int) -> None:
    """Point a dataloader's sampler and worker seeding at ``seed``."""
    sampler = getattr(loader, 'sampler', None)
    if sampler is not None and hasattr(sampler, 'seed'):
        sampler.seed = seed
    batch_sampler = getattr(loader, 'batch_sampler', None)
    inner = getattr(batch_sampler, 'sampler', None)
    if inner is not None and inner is not sampler and hasattr(inner, 'seed'):
        inner.seed = seed
    wrapped = getattr(loader, 'worker_init_fn', None)
    fn = unwrap_worker_init(wrapped)  # inside PreemptionHook's SignalSafeWorkerInit
    if isinstance(fn, functools.partial) and 'seed' in fn.keywords:
        fn = functools.partial(fn.func, *fn.args, **dict(fn.keywords, seed=seed))
        loader.worker_init_fn = (SignalSafeWorkerInit(fn, wrapped.signals) if isinstance(wrapped, SignalSafeWorkerInit)
                                 else fn)



def _set_runner_seed(runner: Runner, seed: int) -> None:
    """Make ``seed`` the runner's seed (``runner.seed``, and the one its checkpoints record).

    The one place a hook writes mmengine's private attributes: the Runner has no public setter for its seed
    (``_seed``, ``_randomness_cfg``); mmengine's own ``Runner.resume`` writes them the same way.
    """
    runner._seed = seed
    runner._randomness_cfg.update(seed=seed)


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Exact resume: the random state in checkpoints, restored on resume, and the exact-resume loop.

    mmengine stores the seed but not the state of the random generators, so a
    resumed run draws other random numbers (flips, proposal sampling, drop
    path) than an uninterrupted one. This hook stores python's, NumPy's and
    torch's generator states under ``checkpoint['rng_state']`` and restores
    them when training starts again after ``resume`` (not for ``load_from``),
    together with the seed of the train dataloader's sampler and worker
    initialisation.

    Validation during training does not change the random state (it is put
    back after ``after_val``), and a checkpoint written during validation
    (a best checkpoint, a preemption checkpoint) stores the state from before
    it: the saved state is always the one training continues with. Exact
    continuation needs ``num_workers=0`` or non-persistent workers: a
    persistent worker's own generator is not saved.

    In ``before_run`` (after ``Runner.train`` has built the train loop) an
    mmengine ``EpochBasedTrainLoop`` or ``IterBasedTrainLoop`` becomes its
    counterpart of :mod:`mlla_mm.engine.loops`
    (:func:`~mlla_mm.engine.loops.make_exact`): the data of a resumed run is
    fast-forwarded without drawing random numbers, and a checkpoint from the
    middle of an epoch (``iter_N.pth`` of a preempted run) continues with the
    next batch of that epoch instead of starting it again.
    """

    priority = 'VERY_LOW'

    def __init__(self) -> None:
        self._pending: Optional[Dict[str, Any]] = None
        self._before_val: Optional[Dict[str, Any]] = None

    def before_run(self, runner: Runner) -> None:
        loop = getattr(runner, '_train_loop', None)
        if isinstance(loop, BaseLoop) and not make_exact(loop):
            runner.logger.info(f'RandomStateHook: {type(loop).__name__} is not mmengine\'s epoch- or '
                               'iteration-based loop; a resume continues the way that loop does.')

    def before_save_checkpoint(self, runner: Runner, checkpoint: dict) -> None:
        checkpoint['rng_state'] = self._before_val or get_random_state(runner.seed)

    def after_load_checkpoint(self, runner: Runner, checkpoint: dict) -> None:
        if getattr(runner, '_resume', False) and 'rng_state' in checkpoint:
            try:  # checked here, before anything is resumed: one line naming the field, not a traceback later
                check_random_state(checkpoint['rng_state'])
            except RandomStateError as err:
                raise CheckpointError(f'{checkpoint_name(runner)}: {err}; cannot resume from it') from None
            self._pending = checkpoint['rng_state']

    def before_train(self, runner: Runner) -> None:
        # Restored here, not in after_load_checkpoint: Runner.resume may reseed afterwards.
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        seed = state.get('seed')
        if seed is not None:
            _set_runner_seed(runner, seed)
            _reseed_dataloader(runner.train_dataloader, seed)
        set_random_state(state)
        runner.logger.info('Restored the random state saved in the checkpoint (python, numpy, torch).')

    def before_val(self, runner: Runner) -> None:
        if _training(runner):
            self._before_val = get_random_state(runner.seed)

    def after_val(self, runner: Runner) -> None:
        if self._before_val is not None:
            state, self._before_val = self._before_val, None
            set_random_state(state)


# --------------------------------------------------------------------------
# Validation interrupted by a kill.
# --------------------------------------------------------------------------
@HOOKS.register_module()
class ValidationResumeHook(Hook):
    """Re-run a validation that a killed run did not complete.

    mmengine writes a checkpoint and then validates; ``--resume`` from that
    checkpoint would continue training and skip the validation. After each
    validation during training this hook records the position (epoch,
    iteration and the checkpoint's run) in ``work_dir/last_validation.json``;
    a run resumed from a checkpoint after which the training loop validates
    runs that validation first unless the record says it completed. When
    it was the final validation, the resumed run validates and ends.
    """

    priority = 'LOWEST'  # before_train: after the standard hooks' (CheckpointHook, LoggerHook)

    def __init__(self) -> None:
        self._resumed: Optional[Dict[str, Any]] = None
        self._rerun: Optional[Dict[str, Any]] = None

    def after_load_checkpoint(self, runner: Runner, checkpoint: dict) -> None:
        if getattr(runner, '_resume', False):
            meta = checkpoint.get('meta') or {}
            epoch, it = _position(meta)
            self._resumed = dict(experiment_name=meta.get('experiment_name'), epoch=epoch, iter=it)

    def before_train(self, runner: Runner) -> None:
        resumed, self._resumed = self._resumed, None
        if resumed is None or not validation_due(runner.train_loop):
            return
        marker = osp.join(runner.work_dir, VALIDATION_MARKER)
        try:
            with open(marker, encoding='utf-8') as f:
                if json.load(f) == resumed:
                    return
        except (OSError, ValueError):
            pass
        what = (f'epoch {resumed["epoch"]}' if isinstance(runner.train_loop, EpochBasedTrainLoop)
                else f'iteration {resumed["iter"]}')
        runner.logger.info(f'The validation after {what} did not complete before the run stopped; running it now.')
        self._rerun = resumed
        try:
            runner.val_loop.run()
        finally:
            self._rerun = None

    def after_val(self, runner: Runner) -> None:
        if not _training(runner) or not is_main_process():
            return
        record = self._rerun or dict(experiment_name=runner.experiment_name, epoch=runner.epoch, iter=runner.iter)
        with atomic_write(osp.join(runner.work_dir, VALIDATION_MARKER), 'w') as f:
            json.dump(record, f)


# --------------------------------------------------------------------------
# Preemption.
# --------------------------------------------------------------------------
@HOOKS.register_module()
class PreemptionHook(Hook):
    """On SIGTERM or SIGINT, checkpoint at the end of the current iteration and exit.

    Schedulers (Slurm, Kubernetes, cloud spot instances) send SIGTERM some
    time before they kill a job. While training, the first such signal is
    noted; after the iteration that is running, a checkpoint of that
    iteration is written atomically (``iter_N.pth``, or ``epoch_N.pth`` when
    the signal came during the validation after epoch N and no checkpoint of
    that position exists yet), ``last_checkpoint`` names it, one line is
    logged and :class:`TrainingInterrupted` exits with 128 + the signal
    number. ``--resume`` continues exactly (the exact-resume loops skip the
    batches of the epoch already trained). During validation the
    validation is abandoned and re-run on resume. A second signal stops at
    once: a second SIGTERM the default way (a checkpoint being written stays a
    temporary file, removed by the next start), a second SIGINT (Ctrl-C
    twice) as :class:`TrainingAborted`, which discards the file being written
    and ends the tool with one line and exit code 130. In a distributed run
    all processes stop after the same iteration.

    The signal may reach the whole process group (``timeout``, ``kill -TERM
    -- -PGID``, Slurm, Ctrl-C in a terminal): the workers of the train and
    validation dataloaders ignore SIGTERM and SIGINT
    (:func:`~mlla_mm.engine.workers.guard_dataloader_workers`, installed in
    ``before_run`` around each loader's ``worker_init_fn``), so they keep
    serving the main process until it has saved.

    Args:
        signals: Names of the signals to handle.
    """

    priority = 'LOWEST'  # after_train_iter: after the checkpoint and scheduler hooks

    def __init__(self, signals: Sequence[str] = ('SIGTERM', 'SIGINT')) -> None:
        unknown = [s for s in signals if not isinstance(getattr(signal, str(s), None), signal.Signals)]
        if unknown:
            raise ValueError(f'PreemptionHook: unknown signal name(s) {unknown}')
        self.signals = tuple(getattr(signal, s) for s in signals)
        #: the signal received (None until one arrives)
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}
        self._saved: Optional[Tuple[Tuple[int, int], str]] = None  # (position, path) of the newest checkpoint

    # -- signal handling ----------------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            return
        # A second signal: stop now. SIGTERM the default way (the process ends at once; a checkpoint
        # being written is left as a temporary file, which the next start removes); SIGINT, Ctrl-C twice,
        # as an exception, so the file being written is discarded and the tool says so in one line.
        self._restore()
        if signum != signal.SIGINT:
            signal.raise_signal(signum)
            return
        resume = (f'--resume continues from {self._saved[1]}' if self._saved is not None
                  else 'no checkpoint of this run yet: it starts again from the beginning')
        raise TrainingAborted(f'{signal.Signals(signum).name} received again: stopped at once, without the '
                              f'checkpoint of the first one; {resume}.', 128 + signum)

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def before_run(self, runner: Runner) -> None:
        # before_run: the handlers are in place for a validation that a resumed run repeats in before_train
        if not _training(runner):
            return
        if threading.current_thread() is not threading.main_thread():
            runner.logger.warning('PreemptionHook: not in the main thread, signals are not handled.')
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        # A signal to the process group reaches the dataloader workers too: they leave it to this process.
        loop = runner._train_loop  # the built loop (_training checked it)
        guard_dataloader_workers(getattr(loop, 'dataloader', None), getattr(loop, 'dataloader_iterator', None),
                                 self.signals)
        val_loop = getattr(runner, '_val_loop', None)
        if isinstance(val_loop, BaseLoop):
            guard_dataloader_workers(getattr(val_loop, 'dataloader', None), signals=self.signals)

    def after_train(self, runner: Runner) -> None:
        self._restore()

    def after_run(self, runner: Runner) -> None:
        self._restore()

    # -- where checkpoints are ----------------------------------------------
    def after_load_checkpoint(self, runner: Runner, checkpoint: dict) -> None:
        if getattr(runner, '_resume', False):
            self._saved = (_position(checkpoint.get('meta') or {}), checkpoint_name(runner))

    def before_save_checkpoint(self, runner: Runner, checkpoint: dict) -> None:
        meta = checkpoint.get('meta') or {}
        last = runner.message_hub.get_info('last_ckpt')  # set by CheckpointHook just before it saves
        epoch, it = _position(meta)
        if last and osp.basename(str(last)) in (f'epoch_{epoch}.pth', f'iter_{it}.pth'):
            self._saved = ((epoch, it), str(last))

    # -- stopping -------------------------------------------------------------
    def _requested(self) -> int:
        signum = self.received or 0
        if get_world_size() > 1:
            flag = torch.tensor([signum], dtype=torch.int64)
            all_reduce(flag, op='max')
            signum = int(flag.item())
        return signum

    def after_train_iter(self, runner: Runner, batch_idx: int, data_batch: Any = None,
                         outputs: Optional[dict] = None) -> None:
        signum = self._requested() if self._previous else 0
        if signum:
            position = (runner.epoch, runner.iter + 1)
            self._stop(runner, signum, position, f'iter_{position[1]}.pth', 'after')

    def after_val_iter(self, runner: Runner, batch_idx: int, data_batch: Any = None,
                       outputs: Any = None) -> None:
        signum = self._requested() if self._previous and _training(runner) else 0
        if signum:
            position = (runner.epoch, runner.iter)
            epoch_loop = isinstance(runner.train_loop, EpochBasedTrainLoop)
            name = f'epoch_{position[0]}.pth' if epoch_loop else f'iter_{position[1]}.pth'
            self._stop(runner, signum, position, name, 'during the validation after')

    def _stop(self, runner: Runner, signum: int, position: Tuple[int, int], name: str, when: str) -> None:
        # The handlers stay until the checkpoint is written: a second signal during the write is _handle's.
        if self._saved is not None and self._saved[0] == position and osp.isfile(self._saved[1]):
            path = self._saved[1]
        else:  # where the CheckpointHook writes, the way it writes (atomically: CheckpointGuardHook)
            hook = next((h for h in runner.hooks if isinstance(h, CheckpointHook)
                         and isinstance(getattr(h, 'out_dir', None), str)), None)
            out_dir = hook.out_dir if hook is not None else runner.work_dir
            backend_args = hook.backend_args if hook is not None else None
            if not backend_args and '://' not in out_dir:
                backend_args = dict(backend=ATOMIC_BACKEND)
            path = osp.join(out_dir, name)
            runner.save_checkpoint(out_dir, name, meta=dict(epoch=position[0], iter=position[1]),
                                   by_epoch=False, backend_args=backend_args)
            self._saved = (position, path)
        if is_main_process():
            with atomic_write(osp.join(runner.work_dir, 'last_checkpoint'), 'w') as f:
                f.write(path)
        runner.message_hub.update_info('last_ckpt', path)
        where = f'iteration {position[1]}'
        if isinstance(runner.train_loop, EpochBasedTrainLoop):
            per_epoch = len(runner.train_loop.dataloader)
            done = position[1] - position[0] * per_epoch if when == 'after' else 0
            where += (f' (epoch {position[0] + 1}, batch {done} of {per_epoch})' if done
                      else f' (end of epoch {position[0]})')
        self._restore()
        name_of = signal.Signals(signum).name
        runner.logger.warning(f'{name_of} received: stopped {when} {where}; resumable checkpoint {path} '
                              f'(continue with --resume); exit code {128 + signum}.')
        raise TrainingInterrupted(128 + signum)


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


# --------------------------------------------------------------------------
# Checkpoints: written atomically, refused when they do not fit the model
# (mlla_mm.checkpoint.check_checkpoint_fits).
# --------------------------------------------------------------------------
@HOOKS.register_module()
class CheckpointGuardHook(Hook):
    """Checkpoints written atomically; checkpoints of another model refused when loading.

    - ``before_run``: a ``CheckpointHook`` writing to a local folder with no
      ``backend_args`` of its own writes through
      :class:`~mlla_mm.engine.work_dir.AtomicLocalBackend` (temporary file,
      fsync, rename), so any Runner writes checkpoints atomically (SafeRunner
      does so for every checkpoint it saves).
    - ``after_load_checkpoint`` (``load_from``, ``--resume``, tools/test.py),
      before mmengine copies the tensors into the model: not a dict, no
      state dict, no tensor in common with the model (another model, or
      backbone-only weights) or backbone tensors of another shape (another
      MLLA size) raise :class:`~mlla_mm.checkpoint.CheckpointError` naming the
      file; the model is not changed. When resuming, and with
      ``whole_model=True`` (tools/test.py sets it), every tensor of the model
      must be in the file with its shape. Other shape differences (a head with
      another number of classes when fine-tuning) are left to mmengine,
      which skips them with a warning.

    Args:
        whole_model: ``load_from`` is a whole model of the config (evaluating it): every tensor of the model must
            be in it. :class:`~mlla_mm.engine.runner.SafeRunner` also checks the file before it builds anything.
    """

    priority = 'VERY_HIGH'

    def __init__(self, whole_model: bool = False) -> None:
        self.whole_model = bool(whole_model)

    def before_run(self, runner: Runner) -> None:
        for hook in runner.hooks:
            if not isinstance(hook, CheckpointHook) or hook.backend_args or hook.file_client_args:
                continue
            if '://' not in str(hook.out_dir or runner.work_dir):
                hook.backend_args = dict(backend=ATOMIC_BACKEND)

    def after_load_checkpoint(self, runner: Runner, checkpoint: Any) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        # The whole model comes from the file when resuming and with whole_model (tools/test.py); load_from for
        # fine-tuning may leave parts new.
        whole = self.whole_model or bool(getattr(runner, '_resume', False))
        check_checkpoint_for_model(model, checkpoint, checkpoint_name(runner), whole=whole)
        if getattr(runner, '_resume', False):
            check_resume_fields(checkpoint, checkpoint_name(runner))


def _field_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and low <= value < high


def check_resume_fields(checkpoint: Any, filename: str) -> None:
    """What ``--resume`` reads from a checkpoint besides the weights, checked before mmengine or a hook uses it.

    ``meta`` (a dict with ``epoch`` and ``iter``, non-negative ints; ``seed``
    None or an int below 2**32; no ``config``, which mmengine's
    ``Runner.resume`` would execute), ``rng_state`` (restorable: see
    :func:`~mlla_mm.engine.rng.check_random_state`) and ``message_hub`` (a
    dict of mmengine's three dicts). A malformed field is one line naming it.

    Raises:
        CheckpointError: A field is missing or malformed (the message names the file and the field).
    """
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f'{filename}: {what}; cannot resume from it (a damaged or crafted checkpoint?)')

    if not isinstance(checkpoint, dict):
        raise refuse(f'expected a dict, got {type(checkpoint).__name__}')
    meta = checkpoint.get('meta')
    if not isinstance(meta, dict):
        raise refuse(f'meta must be a dict, got {type(meta).__name__}')
    for key in ('epoch', 'iter'):
        if not _field_int(meta.get(key), 0, 2 ** 62):
            raise refuse(f'meta.{key} must be an int >= 0, got {_short_repr(meta.get(key))}')
    if meta.get('seed') is not None and not _field_int(meta['seed'], 0, 2 ** 32):
        raise refuse(f'meta.seed must be an int in [0, 2**32), got {_short_repr(meta["seed"])}')
    if 'config' in meta:  # mmengine's Runner.resume runs it through Config.fromstring(..., '.py'): code
        raise refuse('it has meta.config, which mmengine\'s resume would execute as a Python config (mmengine '
                     'writes its config as meta.cfg, never as meta.config)')
    if 'rng_state' in checkpoint:
        try:
            check_random_state(checkpoint['rng_state'])
        except RandomStateError as err:
            raise refuse(str(err)) from None
    hub = checkpoint.get('message_hub')
    if 'message_hub' in checkpoint and not (isinstance(hub, dict) and all(
            isinstance(hub.get(k), dict) for k in ('log_scalars', 'runtime_info', 'resumed_keys'))):
        raise refuse('message_hub must be a dict with the dicts log_scalars, runtime_info and resumed_keys '
                     '(what mmengine writes)')


def _short_repr(value: Any) -> str:
    if isinstance(value, int) and abs(value) >= 10 ** 30:
        return f'an int of {value.bit_length()} bits'
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + '...'


__all__ = ['RandomStateHook', 'ValidationResumeHook', 'PreemptionHook', 'FiniteLossHook', 'CheckpointGuardHook',
           'NonFiniteLossError', 'TrainingAborted', 'TrainingInterrupted', 'check_checkpoint_for_model',
           'check_resume_fields', 'get_random_state', 'set_random_state', 'VALIDATION_MARKER']
