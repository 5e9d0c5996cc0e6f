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

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Tuple

# mmengine, mmdet and mmseg import setuptools' pkg_resources, whose deprecation notice (about ten lines on
# stderr from the tools) says nothing to a user of the tools; this filter matches only that notice.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated as an API', category=UserWarning)

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.logging import print_log  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from ..datasets.checks import (DEMO_COMMANDS, LAYOUTS, BadAnnotationError,  # noqa: F401,E402 (re-exported)
                               DataNotFoundError, check_annotations, check_data)
from ..utils.io import AtomicWriteError  # noqa: E402
from ..utils.malloc import malloc_state, tune_cpu_malloc  # noqa: E402
from .runner import end_distributed, make_synthetic_data  # noqa: E402


def apply_amp(cfg: Config) -> None:
    """``--amp``: fp16 ``AmpOptimWrapper`` on CUDA, bf16 ``CPUAutocastOptimWrapper`` on the CPU."""
    wrapper = cfg.optim_wrapper
    if wrapper.get('type', 'OptimWrapper') not in ('OptimWrapper', 'AmpOptimWrapper', 'CPUAutocastOptimWrapper'):
        raise UsageError(f'--amp needs an OptimWrapper-based optim_wrapper, got {wrapper.type}')
    if torch.cuda.is_available():  # fp16, dynamic loss scale; optim_wrapper.dtype=bfloat16 for bf16 (device.py)
        from .device import cuda_amp_settings
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
    from ..utils.cpu import bf16_fast_on_this_cpu
    fast, note = bf16_fast_on_this_cpu()
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


class UsageError(Exception):
    """A problem the user can fix (bad path, bad config); shown as one line, exit code 2."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (KeyError's repr quotes removed)."""
    if isinstance(err, OSError) and err.strerror:  # no '[Errno N]' prefix
        text = err.strerror if not err.filename or str(err.filename) in err.strerror \
            else f'{err.strerror}: {err.filename}'
    else:
        text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return ' '.join(str(text).split()) or type(err).__name__


class ToolArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one ``error:`` line (exit code 2), like the tools' other errors."""

    def error(self, message: str) -> NoReturn:
        print(f'error: {self.prog}: {" ".join(message.split())} (see {self.prog} --help)', file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f'expected an integer >= 0, got {text!r}')
    return value


def image_size(text: str) -> Tuple[int, int]:
    """argparse type: ``HxW`` with positive integers (e.g. ``800x1280``)."""
    h, sep, w = text.lower().partition('x')
    try:
        size = (int(h), int(w)) if sep else (0, 0)
    except ValueError:
        size = (0, 0)
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f'expected HxW with positive integers (e.g. 800x1280), got {text!r}')
    return size


def check_output(path: Optional[str], option: str, folder: bool = False) -> None:
    """Fail before any work when ``path`` (a file, or ``folder``) cannot be written: one :class:`UsageError`."""
    from ..utils.io import output_path_problem
    if path:
        problem = output_path_problem(path, folder=folder)
        if problem:
            raise UsageError(f'{option} {path}: cannot write there: {problem}')


def check_device(text: str, option: str = '--device') -> torch.device:
    """A torch device that exists on this machine, or a :class:`UsageError` naming ``option``."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f'{option} {text}: not a device (expected cpu, cuda, cuda:N, ...)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'{option} {text}: no CUDA device on this machine (use --device cpu)')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f'{option} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    if device.type not in ('cpu', 'cuda'):
        raise UsageError(f'{option} {text}: only cpu and cuda devices are supported')
    return device


class CfgOptionsAction(DictAction):
    """mmengine's ``DictAction`` (``--cfg-options k=v ...``) with parse errors as argparse errors."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        for kv in values or []:
            key, sep, val = kv.partition('=')
            if not sep or not key:
                raise argparse.ArgumentError(self, f'{kv!r} is not KEY=VALUE')
            try:
                self._parse_iterable(val)
            except (AssertionError, ValueError, RecursionError) as err:  # ('dict(a=1)' recurses in mmengine)
                raise argparse.ArgumentError(self, f'cannot parse the value of {kv!r}: {one_line(err)}') from None
        super().__call__(parser, namespace, values, option_string)


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """Read a config file and apply ``--cfg-options``; a config that does not parse is a :class:`UsageError`.

    A config is Python that runs when it is read: whatever it raises (a syntax
    error, a failing ``_base_`` or ``custom_imports``, ``1/0``) is reported as
    one line naming the file. It must define ``model``.
    """
    if os.path.isdir(path):
        raise UsageError(f'{path} is a directory, not a config file')
    if not os.path.isfile(path):
        raise UsageError(f'config file not found: {path}')
    try:
        cfg = Config.fromfile(path)
    except Exception as err:  # noqa: BLE001 (the config's own code may raise anything)
        raise UsageError(f'{path}: cannot read the config: {type(err).__name__}: {one_line(err)}') from None
    if not isinstance(cfg.get('model'), dict):
        raise UsageError(f'{path}: the config defines no model (a dict `model = dict(type=...)`, as in the '
                         'configs under configs/ or mmdet / mmseg configs)')
    if cfg_options:
        try:
            cfg.merge_from_dict(cfg_options)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UsageError(f'--cfg-options {" ".join(f"{k}={v}" for k, v in cfg_options.items())}: '
                             f'{one_line(err)}') from None
    return cfg


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
        from .schedules import schedule_errors
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
    from mmengine.hooks import LoggerHook
    from mmengine.runner import BaseLoop

    from .schedules import fit_to_run, run_unit
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
    import copy

    from mmengine.registry import MODELS, DefaultScope

    from ..checkpoint import load_file
    from .hooks import check_checkpoint_for_model
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
    from mmengine.registry import RUNNERS, init_default_scope
    check_run_settings(cfg, check, config_path)
    from .device import mmcv_cuda_problem
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


def _last_checkpoint() -> Optional[str]:
    """The newest checkpoint of the current run (mmengine's message hub), if one was written and exists."""
    try:
        from mmengine.logging import MessageHub
        path = MessageHub.get_current_instance().get_info('last_ckpt')
    except Exception:  # noqa: BLE001 (only a hint in an error message)
        return None
    return str(path) if path and os.path.isfile(str(path)) else None


def run_main(main: Callable[[], int]) -> int:
    """Run a tool's ``main()``; problems the user can fix become one ``error:`` line on stderr.

    First tunes glibc malloc for large CPU tensors (:mod:`mlla_mm.utils.malloc`).

    Exit codes: 0 done, 2 bad input (paths, config, data, checkpoint) or a
    failed write (disk full: the message names the file), 1 training stopped
    on a non-finite loss or a dead dataloader worker (one line naming it and
    the command that resumes), 128 + N training stopped on signal N after writing
    a resumable checkpoint (143 SIGTERM, 130 SIGINT), 130 also for Ctrl-C
    outside training or pressed twice (one ``error:`` line). A distributed
    run's process group is destroyed before returning, unless the run failed
    (:func:`~mlla_mm.engine.runner.end_distributed`).
    """
    try:
        # large CPU tensors off fresh mmap pages; MLLA_MM_MALLOC=default to skip; a CPU setting, not on a GPU machine
        tune_cpu_malloc(False if torch.cuda.is_available() else None)
    except ValueError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    from ..checkpoint import CheckpointError
    from .hooks import NonFiniteLossError, TrainingAborted, TrainingInterrupted
    from .workers import WorkerDied, worker_death_message
    try:
        try:
            return main()
        except Exception as err:  # noqa: BLE001 (a dead worker's error surfaces inside whatever ran)
            death = worker_death_message(err, _last_checkpoint())
            if death is None:
                raise
            raise WorkerDied(death) from None
    except WorkerDied as err:  # a dataloader worker died (SIGKILL, out of memory): which one, how to resume
        print(f'error: {err}', file=sys.stderr)
        return 1
    except DataNotFoundError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    except (UsageError, CheckpointError, AtomicWriteError, FileNotFoundError) as err:
        print(f'error: {one_line(err)}', file=sys.stderr)
        return 2
    except (NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError) as err:
        # a path the user gave that cannot be used (checked up front where the tools can; this is the net)
        from ..utils.io import output_path_problem
        path = err.filename or ''
        reason = (output_path_problem(path, folder=isinstance(err, FileExistsError)) if path else '') \
            or err.strerror or str(err)
        print(f'error: cannot use {path}: {reason}' if path else f'error: {one_line(err)}', file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f'error: {one_line(err)}', file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:  # the hook logged where the resumable checkpoint is
        return int(stop.code)
    except TrainingAborted as stop:  # Ctrl-C twice during training
        print(f'error: {stop}', file=sys.stderr)
        return stop.code
    except KeyboardInterrupt:
        print('error: interrupted (Ctrl-C)', file=sys.stderr)
        return 130
    finally:
        end_distributed()  # a gloo group left to interpreter shutdown can abort the process (SIGABRT)
