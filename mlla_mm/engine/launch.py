"""What the command-line tools add to a config: arguments, data checks, one-line errors.

Everything a run needs is in the config (``configs/_base_/mlla_runtime.py``
and :class:`~mlla_mm.engine.runner.SafeRunner`); ``tools/train.py`` and
``tools/test.py`` only apply their options (:func:`prepare_config`), check the
data (:func:`check_run_data`), build the runner as mmdet's and mmseg's own
tools do (:func:`build_runner`) and turn problems the user can fix into one
``error:`` line with exit code 2 (:func:`run_main`). One implementation
serves mmdet and mmseg configs: the config's ``default_scope`` decides which
registries are used.
"""
from __future__ import annotations

import copy
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
from mmengine.config import Config
from mmengine.hooks import LoggerHook
from mmengine.logging import print_log
from mmengine.registry import MODELS, RUNNERS, DefaultScope, init_default_scope
from mmengine.runner import BaseLoop, Runner

from ..checkpoint import load_file
from ..datasets.checks import check_data
from ..datasets.synthetic import make_synthetic_data
from ..errors import UsageError, one_line
from ..utils import cpu
from ..utils.io import output_path_problem
from ..utils.malloc import malloc_state
from .device import cuda_amp_settings, mmcv_cuda_problem
from .hooks import check_checkpoint_for_model
from .schedules import fit_to_run, run_unit, schedule_errors


def apply_amp(cfg: Config) -> None:
    """``--amp``: fp16 ``AmpOptimWrapper`` on CUDA, bf16 ``CPUAutocastOptimWrapper`` on the CPU."""
    wrapper = cfg.optim_wrapper
    if wrapper.get('type', 'OptimWrapper') not in ('OptimWrapper', 'AmpOptimWrapper', 'CPUAutocastOptimWrapper'):
        raise UsageError(f'--amp needs an OptimWrapper-based optim_wrapper, got {wrapper.type}')
    if torch.cuda.is_available():  # fp16, dynamic loss scale; optim_wrapper.dtype=bfloat16 for bf16 (device.py)
        try:
            wrapper.update(cuda_amp_settings(wrapper.get('dtype')))
        except ValueError as err:
            raise UsageError(str(err)) from None
    else:
        wrapper.type = 'CPUAutocastOptimWrapper'
        wrapper.dtype = 'bfloat16'
        warn_if_bf16_slow()


def warn_if_bf16_slow() -> bool:
    """Print one ``warning:`` line on stderr when bf16 autocast would be slower than fp32 on this CPU.

    bf16 only pays with AMX or AVX512-BF16 (:func:`mlla_mm.utils.cpu.bf16_fast_on_this_cpu`);
    elsewhere oneDNN emulates it through fp32 (MLLA-T inference 9.7x slower on an AVX2 EPYC, docs/benchmarks.md).

    Returns:
        Whether the warning was printed.
    """
    fast, note = cpu.bf16_fast_on_this_cpu()  # looked up at call time (tests put a stand-in there)
    if not fast:
        print(f'warning: --amp runs bf16 autocast, which will be slower than fp32 on this CPU: {note}',
              file=sys.stderr, flush=True)
    return not fast


def prepare_config(cfg: Config, *, work_dir: Optional[str] = None, config_path: str = '',
                   launcher: str = 'none', amp: bool = False) -> Config:
    """Apply what the command line says; everything else a run needs is in the config.

    - ``work_dir`` (``--work-dir``) defaults to ``work_dirs/<config name>``;
    - ``launcher`` (``--launcher``);
    - ``amp`` (``--amp``): see :func:`apply_amp`.

    Machine-dependent settings (SyncBN, gloo, CPU DDP) are made by
    :class:`~mlla_mm.engine.runner.SafeRunner` when it is built.
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


def skip_unneeded_pretrained(cfg: Config) -> Optional[str]:
    """A run that loads a whole model (``load_from``, ``--resume FILE``) needs no backbone pretrained file.

    When ``model.backbone.init_cfg`` names a ``Pretrained`` checkpoint that
    is not there, the backbone would say it is randomly initialised (or stop,
    with ``if_missing='error'``) right before ``load_from`` gives it its
    weights; its ``init_cfg`` is dropped instead. Returns the line to log, or
    ``None`` when nothing changed.
    """
    load_from = cfg.get('load_from')
    backbone = (cfg.get('model') or {}).get('backbone')
    init = backbone.get('init_cfg') if isinstance(backbone, dict) else None
    if not load_from or not isinstance(init, dict) or init.get('type') != 'Pretrained':
        return None
    path = init.get('checkpoint')
    if not isinstance(path, str) or os.path.isfile(os.path.expanduser(path)):
        return None
    backbone['init_cfg'] = None
    return (f'model.backbone.init_cfg.checkpoint {path} is not there and not needed: the weights come from '
            f'{load_from}')


def check_output(path: Optional[str], option: str, folder: bool = False) -> None:
    """Fail before any work when ``path`` (a file, or ``folder``) cannot be written: one :class:`UsageError`."""
    if path:
        problem = output_path_problem(path, folder=folder)
        if problem:
            raise UsageError(f'{option} {path}: cannot write there: {problem}')


def check_run_data(cfg: Config, check: Tuple[str, ...], config_path: str) -> None:
    """Make the config's synthetic data if it names some (as SafeRunner would), then check the data.

    Runs before the Runner is built: the checks may point datasets at a
    filtered copy of their annotations (``--skip-bad-images``).

    Raises:
        DataNotFoundError: Data the ``check`` dataloaders need is missing or broken.
    """
    make_synthetic_data(cfg)
    check_data(cfg, check, config_path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_run_settings(cfg: Config, check: Tuple[str, ...], config_path: str) -> None:
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


def check_whole_checkpoint(cfg: Config, path: str) -> None:
    """CheckpointGuardHook's whole-model check of ``path`` (tools/test.py, ``--resume``), before the runner exists.

    The config's model is built on the meta device (no memory, no weight
    initialisation) and the file is read to it (names and shapes only), so a
    checkpoint of another task or MLLA size is one error line, raised before
    mmengine makes its timestamped log folder. A model that cannot be built
    that way (one that loads weights while it is built) is left to the
    runner, whose hook makes the same check when it loads the file.

    Raises:
        CheckpointError: The file is not a whole checkpoint of this model (names it and example tensors), or
            holds no state dict.
    """
    try:
        with warnings.catch_warnings(), DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmdet')):
            warnings.simplefilter('ignore')  # the runner builds the model again and shows them
            with torch.device('meta'):
                model = MODELS.build(copy.deepcopy(cfg.model))
    except Exception:  # noqa: BLE001 (the runner builds it for real and reports what is wrong)
        return
    check_checkpoint_for_model(model, load_file(path, map_location='meta'), path, whole=True)


def build_runner(cfg: Config, *, config_path: str, launcher: str, check: Tuple[str, ...],
                 whole_checkpoint: Optional[str] = None) -> Runner:
    """Check the settings, the data (:func:`check_run_data`) and ``whole_checkpoint`` (the file tools/test.py
    tests or ``--resume`` continues, :func:`check_whole_checkpoint`), then build the config's Runner as mmdet's
    tools do.

    ``RUNNERS.build(cfg)`` honours ``runner_type`` (``SafeRunner`` in every
    config of this project); a config without it gets mmengine's Runner and a
    warning.

    Raises:
        DataNotFoundError: Data the ``check`` dataloaders need is missing or broken.
        UsageError: The config does not build (unknown arch, misspelt argument, ...).
        CheckpointError: ``whole_checkpoint`` is not a whole checkpoint of the config's model.
    """
    check_run_settings(cfg, check, config_path)
    problem = mmcv_cuda_problem(cfg.get('default_scope', 'mmdet'))  # a CPU-only mmcv on a GPU machine
    if problem:
        raise UsageError(f'{config_path}: {problem}')
    check_run_data(cfg, check, config_path)
    if whole_checkpoint:
        check_whole_checkpoint(cfg, whole_checkpoint)  # another task or MLLA size: before any log folder
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    if cfg.get('runner_type') != 'SafeRunner':
        print_log(f'{config_path} does not use SafeRunner (it does not inherit configs/_base_/mlla_runtime.py): '
                  'no atomic checkpoints, exact resume or preemption handling.', logger='current',
                  level=logging.WARNING)
    try:
        runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    except (ValueError, TypeError, KeyError) as err:
        raise UsageError(f'{config_path}: {one_line(err)}') from None
    model = runner.model.module if hasattr(runner.model, 'module') else runner.model
    step = 'train_step' if 'train_dataloader' in check else 'test_step'
    if not callable(getattr(model, step, None)):
        raise UsageError(f'{config_path}: the model ({type(model).__name__}) has no {step}: it is not a whole '
                         'detector or segmentor (a backbone alone cannot be trained or tested; put it in a '
                         'detector or segmentor config)')
    print_log(f'mlla-mm: glibc malloc {malloc_state()} (MLLA_MM_MALLOC=default leaves it alone; '
              'see mlla_mm/utils/malloc.py)', logger='current')
    return runner
