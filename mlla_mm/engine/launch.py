"""Applying a tool's options to a config and building its runner (tools/train.py, tools/test.py).

Everything a run needs is in the config (``configs/_base_/mlla_runtime.py``
and :class:`~mlla_mm.engine.runner.SafeRunner`, which checks the settings,
the data and a whole-model checkpoint before it builds anything, and decides
the AMP policy: :mod:`mlla_mm.engine.run_checks`). The tools only apply their
options (:func:`prepare_config`), build the runner as mmdet's and mmseg's own
tools do (:func:`build_runner`) and turn problems the user can fix into one
``error:`` line (:func:`mlla_mm.cli.run_main`). One implementation serves
mmdet and mmseg configs: the config's ``default_scope`` decides which
registries are used.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from mmengine.config import Config
from mmengine.hooks import LoggerHook
from mmengine.logging import print_log
from mmengine.registry import RUNNERS, init_default_scope
from mmengine.runner import BaseLoop, Runner

from ..errors import UsageError, one_line
from ..utils.io import output_path_problem
from ..utils.malloc import malloc_state
from .run_checks import check_run, loaders_of_run, skip_unneeded_pretrained  # noqa: F401 (re-exported)
from .runner import SafeRunner, check_model_step, guard_wants_whole_model
from .schedules import fit_to_run, run_unit

#: The optimizer wrappers ``--amp`` can turn into mixed precision.
AMP_WRAPPERS = ('OptimWrapper', 'AmpOptimWrapper', 'CPUAutocastOptimWrapper')


def apply_amp(cfg: Config) -> None:
    """``--amp``: the config's optimizer wrapper becomes an ``AmpOptimWrapper``.

    What it runs as on this machine (fp16 with a dynamic loss scale on CUDA,
    bf16 CPU autocast without) is the runner's AMP policy
    (:func:`~mlla_mm.engine.run_checks.amp_optim_wrapper_cfg`), the same for
    a config that names ``AmpOptimWrapper`` itself.
    """
    wrapper = cfg.optim_wrapper
    if wrapper.get('type', 'OptimWrapper') not in AMP_WRAPPERS:
        raise UsageError(f'--amp needs an OptimWrapper-based optim_wrapper, got {wrapper.type}')
    wrapper.type = 'AmpOptimWrapper'


def prepare_config(cfg: Config, *, work_dir: Optional[str] = None, config_path: str = '',
                   launcher: str = 'none', amp: bool = False) -> Config:
    """Apply what the command line says; everything else a run needs is in the config.

    - ``work_dir`` (``--work-dir``) defaults to ``work_dirs/<config name>``;
    - ``launcher`` (``--launcher``);
    - ``amp`` (``--amp``): see :func:`apply_amp`.

    Machine-dependent settings (SyncBN, gloo, CPU DDP, what AMP runs as) are
    made by :class:`~mlla_mm.engine.runner.SafeRunner` when it is built.
    """
    if work_dir:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = os.path.join('work_dirs', Path(config_path).stem or 'run')
    check_output(cfg.work_dir, '--work-dir' if work_dir else 'work_dir', folder=True)
    cfg.launcher = launcher
    if amp:
        apply_amp(cfg)
    return cfg


def check_output(path: Optional[str], option: str, folder: bool = False) -> None:
    """Fail before any work when ``path`` (a file, or ``folder``) cannot be written: one :class:`UsageError`."""
    if path:
        problem = output_path_problem(path, folder=folder)
        if problem:
            raise UsageError(f'{option} {path}: cannot write there: {problem}')


def fit_schedule(runner: Runner, *, shorten_warmup: bool = False) -> None:
    """Fit the runner's (not yet built) schedulers and logger to the run, before training; log what changed.

    Builds the train loop (what ``Runner.train()`` does first) for the
    iterations per epoch, then :func:`~mlla_mm.engine.schedules.fit_to_run`:
    one warning line per scheduler that does not fit the run, a warm-up in
    iterations shortened to the run when ``shorten_warmup`` (``--epochs``),
    and a logger interval of at most the iterations per epoch.
    """
    unit, length = run_unit(runner.cfg)
    scheds = runner.param_schedulers
    if unit is None or not isinstance(scheds, (list, dict)) or runner._train_loop is None:
        return
    if isinstance(scheds, list) and any(not isinstance(s, dict) for s in scheds):
        return  # already built
    loop = runner.train_loop
    if not isinstance(loop, BaseLoop):
        return
    try:
        per_epoch = len(loop.dataloader)
    except TypeError:  # an iterable data set without a length
        return
    if per_epoch < 1:
        return
    length = getattr(loop, 'max_epochs' if unit == 'epochs' else 'max_iters', length)
    lines = fit_to_run(scheds, loop_unit=unit, length=length, iters_per_epoch=per_epoch,
                       shorten_warmup=shorten_warmup,
                       logger_hooks=tuple(h for h in runner.hooks if isinstance(h, LoggerHook)))
    for line in lines:
        if line.startswith('warning: '):
            runner.logger.warning(line[len('warning: '):])
        else:
            runner.logger.info(line)


def build_runner(cfg: Config, *, config_path: str, step: str = 'train_step') -> Runner:
    """Build the config's Runner as mmdet's tools do (``RUNNERS.build(cfg)``, honouring ``runner_type``).

    :class:`~mlla_mm.engine.runner.SafeRunner` (every config of this project)
    checks the settings, the data and a whole-model checkpoint itself before
    it builds anything. A config without it gets mmengine's Runner, a warning,
    and the same checks (:func:`~mlla_mm.engine.run_checks.check_run`, and
    that the model has ``step``, which SafeRunner's ``train`` / ``test`` check) here.

    Raises:
        DataNotFoundError: Data the run's dataloaders need is missing or broken.
        UsageError: The config does not build (unknown arch, misspelt argument, ...).
        CheckpointError: A whole-model checkpoint (``--resume FILE``, tools/test.py) does not fit the model.
    """
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    runner_type = cfg.get('runner_type')
    runner_cls = RUNNERS.get(runner_type) if isinstance(runner_type, str) else runner_type
    if not (isinstance(runner_cls, type) and issubclass(runner_cls, SafeRunner)):
        print_log(f'{config_path} does not use SafeRunner (it does not inherit configs/_base_/mlla_runtime.py): '
                  'no atomic checkpoints, exact resume or preemption handling.', logger='current',
                  level=logging.WARNING)
        wants_whole = cfg.get('resume') or guard_wants_whole_model(cfg.get('custom_hooks'))
        whole = cfg.get('load_from') if wants_whole else None
        check_run(cfg, loaders_of_run(cfg), config_path, whole_checkpoint=whole)
    try:
        runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    except (ValueError, TypeError, KeyError) as err:
        raise UsageError(f'{config_path}: {one_line(err)}') from None
    if not isinstance(runner, SafeRunner):  # (SafeRunner checks and logs these itself)
        check_model_step(runner, step, config_path)
        print_log(f'mlla-mm: glibc malloc {malloc_state()} (MLLA_MM_MALLOC=default leaves it alone; '
                  'see mlla_mm/utils/malloc.py)', logger='current')
    return runner


__all__ = ['prepare_config', 'apply_amp', 'check_output', 'fit_schedule', 'build_runner', 'skip_unneeded_pretrained']
