"""The command-line helpers of mlla-mm's tools: argument parsing, one-line errors, warnings filters.

Only ``tools/`` and ``dev/`` import this module; the package never does, so
``import mlla_mm`` (what every config's ``custom_imports`` does) installs no
process-wide warnings filter and defines no argument parser
(``tests/test_layout/test_import_graph.py`` holds that). A tool parses its
options (:class:`ToolArgumentParser`), applies them to the config
(:func:`load_config`, :func:`mlla_mm.engine.launch.prepare_config`), builds
the config's runner and turns problems the user can fix into one ``error:``
line with exit code 2 (:func:`run_main`).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, Callable, NoReturn, Optional, Tuple

# mmengine, mmdet and mmseg import setuptools' pkg_resources, whose deprecation notice (about ten lines on
# stderr from the tools) says nothing to a user of the tools; this filter matches only that notice.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated as an API', category=UserWarning)

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402

from .engine.launch import check_output  # noqa: E402,F401 (re-exported for the tools)
from .engine.distributed import end_distributed  # noqa: E402
from .engine.workers import WorkerDied, worker_death_message  # noqa: E402
from .errors import (CheckpointError, DataNotFoundError, NonFiniteLossError, TrainingAborted,  # noqa: E402
                     TrainingInterrupted, UsageError, one_line)
from .utils.io import AtomicWriteError, output_path_problem  # noqa: E402
from .utils.malloc import tune_cpu_malloc  # noqa: E402


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


def add_skip_bad_images(parser: argparse.ArgumentParser) -> None:
    """``--skip-bad-images`` of tools/train.py and tools/test.py."""
    parser.add_argument('--skip-bad-images', action='store_true',
                        help='leave out missing or unreadable images (listed in a warning) instead of '
                             'stopping with an error; see docs/reliability.md, Data checks')


def parse_with_launcher(parser: argparse.ArgumentParser, argv: Optional[list] = None) -> argparse.Namespace:
    """Add ``--launcher`` and the hidden ``--local_rank`` (torch.distributed.launch), parse ``argv`` and
    export ``LOCAL_RANK`` for mmengine unless it is set already."""
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


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
    run's ranks meet (unless main() raised) and its process group is
    destroyed before returning, unless the run failed
    (:func:`~mlla_mm.engine.distributed.end_distributed`).
    """
    try:
        # large CPU tensors off fresh mmap pages; MLLA_MM_MALLOC=default to skip; a CPU setting, not on a GPU machine
        tune_cpu_malloc(False if torch.cuda.is_available() else None)
    except ValueError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    finished = False  # main() returned or training stopped on a signal: every rank is at the end
    try:
        try:
            code = main()
            finished = True
            return code
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
        path = err.filename or ''
        reason = (output_path_problem(path, folder=isinstance(err, FileExistsError)) if path else '') \
            or err.strerror or str(err)
        print(f'error: cannot use {path}: {reason}' if path else f'error: {one_line(err)}', file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f'error: {one_line(err)}', file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:  # the hook logged where the resumable checkpoint is
        finished = True  # every rank stopped after the same iteration
        return int(stop.code)
    except TrainingAborted as stop:  # Ctrl-C twice during training
        print(f'error: {stop}', file=sys.stderr)
        return stop.code
    except KeyboardInterrupt:
        print('error: interrupted (Ctrl-C)', file=sys.stderr)
        return 130
    finally:
        end_distributed(meet=finished)  # a rank ending while gloo releases tensors can abort (SIGABRT)


__all__ = ['ToolArgumentParser', 'CfgOptionsAction', 'UsageError', 'one_line', 'positive_int', 'non_negative_int',
           'image_size', 'check_device', 'check_output', 'load_config', 'run_main']
