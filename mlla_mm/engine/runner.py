"""SafeRunner: mmengine's Runner plus what a run of mlla-mm needs on any machine.

Every config of the project selects it (``runner_type='SafeRunner'`` in
``configs/_base_/mlla_runtime.py``), so ``RUNNERS.build(cfg)`` (what mmdet's
and mmseg's own ``tools/train.py`` do) and ``tools/train.py`` run the same
thing. At build time it:

- in a distributed run without CUDA, starts torch.distributed with gloo
  (mmengine's launchers need CUDA), reverts SyncBN to BN and gives DDP
  ``device_ids=None``; in one process mmengine itself reverts SyncBN;
- without CUDA, builds a config's ``AmpOptimWrapper`` (fp16, CUDA only) as a
  bf16 :class:`~mlla_mm.engine.optim.CPUAutocastOptimWrapper`;
- makes the synthetic data set a demo config names in ``synthetic_data``;
- in a distributed run, lets the ranks meet and ends the process group at
  exit unless the run failed (:func:`~mlla_mm.engine.distributed.end_distributed`): torch leaves it
  to the program, and a rank that ends while gloo still releases its last
  collective can abort (SIGABRT, "terminate called without an active
  exception") after training is done;
- runs the reliability hooks of :data:`REQUIRED_HOOKS` (adding any that
  ``custom_hooks`` lacks), so also the exact-resume loops that
  :class:`~mlla_mm.engine.hooks.RandomStateHook` switches to.

Checkpoints are written through :class:`~mlla_mm.engine.work_dir.AtomicLocalBackend`
(:func:`mlla_mm.utils.io.atomic_write`: temporary file, fsync, rename), and
so is mmengine's ``last_checkpoint`` marker. Auto-resume (``resume=True``
without ``load_from``) looks wherever the config writes checkpoints (the work
dir and ``default_hooks.checkpoint.out_dir``/<work dir name>), removes
temporary files that dead runs left, skips an empty, damaged or dangling
``last_checkpoint`` marker and never starts over silently: checkpoints that
exist but none of which can be read stop the run with one line. A training
run holds the work dir (:class:`~mlla_mm.engine.work_dir.WorkDirLock`): a second run there is refused
while the first lives. A full disk is one line naming the work dir, not an
``OSError`` traceback. A resumed run warns when the config's learning rate
or parameter schedule differs from the checkpoint's (the checkpoint's is used).
"""
from __future__ import annotations

import atexit
import inspect
import os.path as osp
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.dist import barrier, is_main_process, master_only
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper, revert_sync_batchnorm
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from ..datasets.checks import check_data
from ..datasets.synthetic import make_synthetic_data
from ..errors import UsageError
from ..utils.malloc import malloc_state
from .config_cache import text_once
from .console import keep_parameter_reports_off_console
from .distributed import cpu_ddp_wrapper_cfg, end_distributed_at_exit, init_cpu_distributed, run_noting_failure
from .run_checks import amp_optim_wrapper_cfg, check_run, loaders_of_run, skip_unneeded_pretrained
from .work_dir import (ATOMIC_BACKEND, WorkDirLock, checkpoint_candidates, checkpoint_folders, disk_full_is_one_line,
                       find_resumable_checkpoint, read_marker, remove_stale_temp_files, with_atomic_marker)

#: Hooks SafeRunner always runs (``custom_hooks`` of the runtime base lists them).
REQUIRED_HOOKS = ('RandomStateHook', 'PreemptionHook', 'ValidationResumeHook', 'FiniteLossHook',
                  'CheckpointGuardHook')


def _hook_type_name(hook: Any) -> str:
    if isinstance(hook, Hook):
        return type(hook).__name__
    kind = hook.get('type') if isinstance(hook, dict) else None
    return kind.__name__ if isinstance(kind, type) else str(kind).rpartition('.')[2]


def with_required_hooks(custom_hooks: Optional[list]) -> list:
    """``custom_hooks`` plus any hook of :data:`REQUIRED_HOOKS` it does not contain."""
    hooks = list(custom_hooks or [])
    have = {_hook_type_name(h) for h in hooks}
    return hooks + [dict(type=name) for name in REQUIRED_HOOKS if name not in have]


def check_model_step(runner: Runner, step: str, config_name: str) -> None:
    """A model without ``train_step`` / ``test_step`` (a backbone alone) is one :class:`UsageError`, not
    mmengine's assertion."""
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    if not callable(getattr(model, step, None)):
        raise UsageError(f'{config_name}: the model ({type(model).__name__}) has no {step}: it is not a whole '
                         'detector or segmentor (a backbone alone cannot be trained or tested; put it in a '
                         'detector or segmentor config)')


def guard_wants_whole_model(custom_hooks: Optional[list]) -> bool:
    """Whether ``custom_hooks`` has a ``CheckpointGuardHook`` with ``whole_model=True`` (tools/test.py's)."""
    for hook in custom_hooks or []:
        if _hook_type_name(hook) == 'CheckpointGuardHook':
            value = hook.get('whole_model', False) if isinstance(hook, dict) else getattr(hook, 'whole_model', False)
            return bool(value)
    return False


def set_hook_args(cfg: Any, hook_type: str, **kwargs: Any) -> None:
    """Set arguments of the ``hook_type`` entry of ``cfg.custom_hooks`` (added when the config lacks it)."""
    hooks = list(cfg.get('custom_hooks') or [])
    for hook in hooks:
        if isinstance(hook, dict) and _hook_type_name(hook) == hook_type:
            hook.update(kwargs)
            break
    else:
        hooks.append(dict(type=hook_type, **kwargs))
    cfg.custom_hooks = hooks


# --------------------------------------------------------------------------
# A resume with another learning rate or schedule than the checkpoint's.
# --------------------------------------------------------------------------
#: Scheduler attributes that change as training runs or follow from others (``total_iters`` is end - begin):
#: not settings of the config.
_RUNTIME_KEYS = {'last_step', '_last_value', 'base_values', '_global_step', '_get_value_called_within_step',
                 'verbose', '_step_count', 'last_epoch', '_last_lr', '_initial_step', 'total_iters'}


def _lrs(optim_wrapper: Any) -> List[float]:
    """The base learning rate (``initial_lr``, else ``lr``) of every parameter group."""
    groups = getattr(getattr(optim_wrapper, 'optimizer', None), 'param_groups', None)
    if groups is None and hasattr(optim_wrapper, 'items'):  # OptimWrapperDict
        return [lr for _, w in optim_wrapper.items() for lr in _lrs(w)]
    return [float(g.get('initial_lr', g.get('lr', float('nan')))) for g in groups or []]


def _schedulers(param_schedulers: Any) -> List[Any]:
    if isinstance(param_schedulers, dict):
        return [s for v in param_schedulers.values() for s in _schedulers(v)]
    return list(param_schedulers or [])


def _schedule_settings(scheduler: Any) -> Dict[str, Any]:
    """The plain settings of a scheduler (numbers, strings, flags and lists of them)."""
    try:
        state = scheduler.state_dict()
    except Exception:  # noqa: BLE001 (a scheduler without a state dict has nothing to compare)
        return {}
    plain = (int, float, str, bool, type(None))
    return {k: v for k, v in state.items() if k not in _RUNTIME_KEYS and (
        isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v)))}


def resume_setting_changes(lrs_before: List[float], lrs_after: List[float], schedules_before: List[Dict[str, Any]],
                           schedules_after: List[Dict[str, Any]], names: List[str]) -> List[str]:
    """One line per setting the config gave differently from the checkpoint (the checkpoint's value is used)."""
    lines = []
    differ = [i for i, (a, b) in enumerate(zip(lrs_before, lrs_after)) if a != b]
    if differ:
        i = differ[0]
        lines.append(f'the config\'s learning rate (optim_wrapper.optimizer.lr, param group {i}'
                     f'{f", {len(differ)} of {len(lrs_before)} groups differ" if len(differ) > 1 else ""}) is '
                     f'{lrs_before[i]:g} but the checkpoint\'s is {lrs_after[i]:g}')
    if len(schedules_before) != len(schedules_after):
        lines.append(f'the config has {len(schedules_before)} param_scheduler(s), the checkpoint '
                     f'{len(schedules_after)}')
    for i, (before, after) in enumerate(zip(schedules_before, schedules_after)):
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                lines.append(f'the config\'s param_scheduler[{i}] ({names[i]}) {key}={before.get(key)!r} but the '
                             f'checkpoint\'s is {after.get(key)!r}')
    return lines


@RUNNERS.register_module()
class SafeRunner(Runner):
    """mmengine's Runner with machine-dependent settings, the reliability hooks and atomic checkpoints.

    Takes exactly :class:`mmengine.runner.Runner`'s arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = inspect.signature(Runner.__init__).bind(self, *args, **kwargs)
        params: Dict[str, Any] = dict(bound.arguments)
        params.pop('self')
        params['custom_hooks'] = with_required_hooks(params.get('custom_hooks'))
        init_cpu_distributed(params.get('launcher', 'none'))
        params['cfg'] = cfg = text_once(params.get('cfg'))  # its text formatted once, not at every checkpoint
        #: names the config in the checks' messages
        self.config_name: str = str(getattr(cfg, 'filename', None) or 'the config')
        #: the dataloaders whose data has been checked (:meth:`_check_loaders`)
        self.checked_loaders: Tuple[str, ...] = ()
        self._check_before_building(params)  # before mmengine makes the work dir and its log folder
        #: the checkpoint being read by :meth:`load_checkpoint` (for the hooks' messages)
        self.checkpoint_being_loaded: Optional[str] = None
        #: the work dir's lock while :meth:`train` runs
        self._work_dir_lock: Optional[WorkDirLock] = None
        with disk_full_is_one_line(params.get('work_dir', '.'), 'starting the run'):
            super().__init__(**params)
        keep_parameter_reports_off_console(self.logger)  # per-parameter reports: log file only
        from mmengine.hooks import CheckpointHook
        for hook in self._hooks:  # mmengine writes last_checkpoint with a plain open(): atomically instead
            save = getattr(hook, '_save_checkpoint_with_step', None)
            if isinstance(hook, CheckpointHook) and save is not None and not hasattr(save, '__wrapped__'):
                hook._save_checkpoint_with_step = with_atomic_marker(save)
        if self.distributed:
            atexit.unregister(end_distributed_at_exit)  # once, however many runners a script builds
            atexit.register(end_distributed_at_exit)
        self.logger.info(f'mlla-mm: glibc malloc {malloc_state()} (MLLA_MM_MALLOC=default leaves it alone; '
                         'see mlla_mm/utils/malloc.py)')

    def _run_view(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """What the checks read, as the runner's own arguments (the same dicts: a check may redirect a dataset)."""
        cfg = params.get('cfg') or {}
        view = {key: params.get(key) for key in (
            'model', 'work_dir', 'load_from', 'resume', 'train_cfg', 'optim_wrapper', 'param_scheduler',
            'train_dataloader', 'val_dataloader', 'test_dataloader', 'val_evaluator', 'test_evaluator')}
        view['default_scope'] = cfg.get('default_scope', params.get('default_scope') or 'mmdet')
        view['skip_bad_images'] = bool(cfg.get('skip_bad_images', False))
        view['synthetic_data'] = cfg.get('synthetic_data')
        return view

    def _check_before_building(self, params: Dict[str, Any]) -> None:
        """The config's checks (:func:`~mlla_mm.engine.run_checks.check_run`) for the dataloaders this run uses.

        A training run checks its train and val data, a test-only one its test
        data; :meth:`val` and :meth:`test` check a loader not checked yet. A
        resume from a named file, or a ``CheckpointGuardHook(whole_model=True)``
        (tools/test.py), has the checkpoint checked against the model here.
        The AMP policy is applied to ``optim_wrapper`` here too (one line each
        is logged once the logger exists).
        """
        view = self._run_view(params)
        which = loaders_of_run(view)
        note = skip_unneeded_pretrained(view)  # no "backbone RANDOMLY initialised" before load_from fills it
        if note:
            print_log(note, logger='current')
        load_from = params.get('load_from')
        whole = load_from if load_from and (params.get('resume') or guard_wants_whole_model(
            params.get('custom_hooks'))) else None
        if view.get('synthetic_data'):
            if is_main_process():  # made first by one process (a CPU-distributed group is up already)
                make_synthetic_data(view)
            barrier()
        check_run(view, which, self.config_name, whole_checkpoint=whole)
        self.checked_loaders = tuple(which)

    def _check_loaders(self, which: Sequence[str]) -> None:
        """Check the data of the dataloaders in ``which`` not checked yet (:meth:`val` / :meth:`test` of a
        training config), before the loop builds them."""
        # mmengine keeps the unbuilt dataloader and evaluator configs as private attributes: read here, and changed
        # in place by the checks (skip_bad_images points a dataset at its filtered copy), never replaced.
        todo = tuple(n for n in which
                     if n not in self.checked_loaders and isinstance(getattr(self, f'_{n}', None), dict))
        if not todo:
            return
        view: Dict[str, Any] = dict(model=self.cfg.get('model'), work_dir=self.work_dir,
                                    default_scope=self.cfg.get('default_scope', 'mmdet'),
                                    skip_bad_images=bool(self.cfg.get('skip_bad_images', False)))
        for name in todo:
            view[name] = getattr(self, f'_{name}')
            evaluator = name.replace('_dataloader', '_evaluator')
            view[evaluator] = getattr(self, f'_{evaluator}', None)
        check_data(view, todo, self.config_name)
        self.checked_loaders += todo

    def train(self) -> Any:
        """mmengine's, holding the work dir (:class:`WorkDirLock`); a full disk is one line.

        A failure is recorded for :func:`~mlla_mm.engine.distributed.end_distributed`.
        """
        check_model_step(self, 'train_step', self.config_name)

        def run() -> Any:
            if is_main_process():
                self._work_dir_lock = WorkDirLock(self.work_dir)
                self._work_dir_lock.acquire(self.logger)
            try:
                with disk_full_is_one_line(self.work_dir, 'training'):
                    return super(SafeRunner, self).train()
            finally:
                if self._work_dir_lock is not None:
                    self._work_dir_lock.release()
                    self._work_dir_lock = None
        return run_noting_failure(run)

    def val(self) -> Any:
        """mmengine's, its data checked first; a failure is recorded for
        :func:`~mlla_mm.engine.distributed.end_distributed`."""
        self._check_loaders(('val_dataloader', ))
        return run_noting_failure(super().val)

    def test(self) -> Any:
        """mmengine's, its data checked first; a failure is recorded for
        :func:`~mlla_mm.engine.distributed.end_distributed`."""
        self._check_loaders(('test_dataloader', ))
        check_model_step(self, 'test_step', self.config_name)
        return run_noting_failure(super().test)

    def wrap_model(self, model_wrapper_cfg: Optional[Dict], model: torch.nn.Module) -> Any:
        """mmengine's wrapping; a distributed run without CUDA gets BN and a CPU DDP wrapper."""
        if self.distributed and not torch.cuda.is_available() and not is_model_wrapper(model):
            model = revert_sync_batchnorm(model)  # SyncBN needs CUDA
            model_wrapper_cfg = cpu_ddp_wrapper_cfg(model_wrapper_cfg, self.cfg.get('find_unused_parameters', False))
        return super().wrap_model(model_wrapper_cfg, model)

    def build_optim_wrapper(self, optim_wrapper: Any) -> Any:
        """mmengine's, with the AMP policy (:func:`~mlla_mm.engine.run_checks.amp_optim_wrapper_cfg`): an
        ``AmpOptimWrapper`` (the config's, or ``--amp``) is fp16 with a dynamic loss scale on CUDA, a bf16
        ``CPUAutocastOptimWrapper`` without CUDA."""
        optim_wrapper, lines = amp_optim_wrapper_cfg(optim_wrapper)
        for line in lines:
            self.logger.warning(line)
        return super().build_optim_wrapper(optim_wrapper)

    @master_only
    def save_checkpoint(self, out_dir: str, filename: str, file_client_args: Optional[dict] = None,
                        save_optimizer: bool = True, save_param_scheduler: bool = True,
                        meta: Optional[dict] = None, by_epoch: bool = True,
                        backend_args: Optional[dict] = None) -> None:
        """mmengine's checkpoint, written atomically to local folders (:class:`AtomicLocalBackend`)."""
        if file_client_args is None and backend_args is None and '://' not in str(out_dir):
            backend_args = dict(backend=ATOMIC_BACKEND)
        super().save_checkpoint(out_dir, filename, file_client_args, save_optimizer, save_param_scheduler,
                                meta, by_epoch, backend_args)

    def load_checkpoint(self, filename: str, map_location: Any = 'cpu', strict: bool = False,
                        revise_keys: list = [(r'^module.', '')]) -> dict:  # noqa: B006 (mmengine's signature)
        """mmengine's loading; the hooks' ``after_load_checkpoint`` can name ``filename``."""
        self.checkpoint_being_loaded = filename
        try:
            return super().load_checkpoint(filename, map_location, strict, revise_keys)
        finally:
            self.checkpoint_being_loaded = None

    def resume(self, filename: str, resume_optimizer: bool = True, resume_param_scheduler: bool = True,
               map_location: Any = 'default') -> None:
        """mmengine's; warns when the config's learning rate or schedule differs from the checkpoint's.

        mmengine's resume takes the optimizer's and the schedulers' settings
        from the checkpoint, so a changed ``lr`` or ``param_scheduler`` in the
        config has no effect; one warning per setting names both values.
        """
        from mmengine.optim import OptimWrapper, OptimWrapperDict
        optim = self.optim_wrapper if resume_optimizer and isinstance(
            self.optim_wrapper, (OptimWrapper, OptimWrapperDict)) else None
        scheds = _schedulers(self.param_schedulers) if resume_param_scheduler else []
        scheds = [s for s in scheds if hasattr(s, 'state_dict')]  # built ones only
        lrs_before = _lrs(optim) if optim is not None else []
        sched_before = [_schedule_settings(s) for s in scheds]
        super().resume(filename, resume_optimizer, resume_param_scheduler, map_location)
        lrs_after = _lrs(optim) if optim is not None else []
        sched_after = [_schedule_settings(s) for s in scheds]
        for line in resume_setting_changes(lrs_before, lrs_after, sched_before, sched_after,
                                           [type(s).__name__ for s in scheds]):
            self.logger.warning(f'--resume from {filename}: {line}; the checkpoint\'s value is used (to train '
                                'with the new one, start from the checkpoint with load_from instead of resuming).')

    def load_or_resume(self) -> None:
        """mmengine's, with an auto-resume that survives a killed checkpoint write and never starts over silently.

        Looks in the work dir and where the checkpoint hook writes
        (:func:`checkpoint_folders`); only temporary files of dead writers are
        removed. Checkpoints that exist but cannot be read (or a
        ``last_checkpoint`` naming one that is gone, with none left) stop the
        run with one line instead of a start from scratch that would
        overwrite them.
        """
        if self._has_loaded:
            return None
        if self._resume and self._load_from is None:
            folders = checkpoint_folders(self)
            if is_main_process():
                for folder in dict.fromkeys([self.work_dir, *folders]):
                    remove_stale_temp_files(folder)
            resume_from = find_resumable_checkpoint(self.work_dir, self.logger, folders)
            if resume_from is None:
                found = checkpoint_candidates([self.work_dir, *folders])
                marker = osp.join(self.work_dir, 'last_checkpoint')
                if found:
                    raise UsageError(f'--resume: none of the {len(found)} checkpoint(s) found can be read (newest: '
                                     f'{found[0]}); starting from scratch would overwrite them: move them away to '
                                     'start over, or resume from a good copy with --resume CKPT')
                if read_marker(marker):
                    raise UsageError(f'--resume: {marker} names {read_marker(marker)}, which is gone, and no other '
                                     f'checkpoint is in {", ".join(dict.fromkeys([self.work_dir, *folders]))}; '
                                     f'delete {marker} to start from scratch')
                searched = ', '.join(dict.fromkeys([self.work_dir, *folders]))
                self.logger.info(f'No checkpoint to resume from in {searched}'
                                 '; starting from scratch.')
                return None
            self.logger.info(f'Auto resumed from the latest checkpoint {resume_from}.')
            self.resume(resume_from)
            self._has_loaded = True
            return None
        return super().load_or_resume()


__all__ = ['SafeRunner', 'REQUIRED_HOOKS', 'with_required_hooks', 'check_model_step', 'guard_wants_whole_model',
           'set_hook_args', 'resume_setting_changes']
