"""Turning a config plus command-line options into something a Runner can run.

One implementation serves mmdet and mmseg configs: the config's
``default_scope`` decides which registries are used.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log

from ..datasets.checks import (DEMO_COMMANDS, LAYOUTS, BadAnnotationError,  # noqa: F401 (re-exported)
                               DataNotFoundError, check_annotations, check_data)
from ..utils.malloc import malloc_state, tune_cpu_malloc


def _replace_sync_bn(node: Any) -> Any:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == 'type' and v in ('SyncBN', 'MMSyncBN'):
                node[k] = 'BN'
            else:
                _replace_sync_bn(v)
    elif isinstance(node, list):
        for v in node:
            _replace_sync_bn(v)
    return node


def make_synthetic_data(cfg: Config) -> None:
    """Create the synthetic data set a demo config names in ``synthetic_data``."""
    spec = cfg.get('synthetic_data')
    if not spec:
        return
    from ..datasets import make_ade_shapes, make_coco_shapes
    spec = dict(spec)
    kind = spec.pop('kind')
    makers = {'coco-shapes': make_coco_shapes, 'ade-shapes': make_ade_shapes}
    if kind not in makers:
        raise ValueError(f'synthetic_data.kind must be one of {sorted(makers)}, got {kind!r}')
    makers[kind](**spec)


RELIABILITY_HOOKS = ('RandomStateHook', 'FiniteLossHook')


def _add_reliability(cfg: Config) -> None:
    """Select the crash-safe runner and add the reliability hooks (once)."""
    if cfg.get('runner_type') in (None, 'Runner'):
        cfg.runner_type = 'SafeRunner'
    hooks = list(cfg.get('custom_hooks') or [])
    have = {h.get('type') for h in hooks if isinstance(h, dict)}
    hooks += [dict(type=t) for t in RELIABILITY_HOOKS if t not in have]
    cfg.custom_hooks = hooks


def prepare_config(cfg: Config, *, work_dir: Optional[str] = None, config_path: str = '',
                   launcher: str = 'none', amp: bool = False) -> Config:
    """Apply the machine-dependent settings every run needs.

    - ``work_dir`` defaults to ``work_dirs/<config name>``;
    - without CUDA, SyncBN becomes BN and torch.distributed uses gloo;
    - in one process SyncBN becomes BN as well;
    - ``amp``: fp16 ``AmpOptimWrapper`` on CUDA, bf16 ``CPUAutocastOptimWrapper`` on the CPU;
    - the run uses :class:`~mlla_mm.engine.hooks.SafeRunner` (atomic checkpoints, checked
      loading, robust auto-resume) with ``RandomStateHook`` and ``FiniteLossHook``.
    """
    if work_dir:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = os.path.join('work_dirs', Path(config_path).stem or 'run')
    cfg.launcher = launcher
    cuda = torch.cuda.is_available()
    if not cuda or launcher == 'none':
        _replace_sync_bn(cfg.model)
    if not cuda:
        cfg.setdefault('env_cfg', ConfigDict())
        cfg.env_cfg.setdefault('dist_cfg', ConfigDict())
        cfg.env_cfg.dist_cfg.backend = 'gloo'
        if launcher != 'none':
            # mmengine gives DDP device_ids=[LOCAL_RANK], which CPU modules refuse.
            wrapper = cfg.get('model_wrapper_cfg') or ConfigDict(
                type='MMDistributedDataParallel', broadcast_buffers=False,
                find_unused_parameters=cfg.get('find_unused_parameters', False))
            wrapper.device_ids = None
            cfg.model_wrapper_cfg = wrapper
    _add_reliability(cfg)
    if amp:
        wrapper = cfg.optim_wrapper
        if wrapper.get('type', 'OptimWrapper') not in ('OptimWrapper', 'AmpOptimWrapper', 'CPUAutocastOptimWrapper'):
            raise ValueError(f'--amp needs an OptimWrapper-based optim_wrapper, got {wrapper.type}')
        if cuda:
            wrapper.type = 'AmpOptimWrapper'
            wrapper.loss_scale = 'dynamic'
        else:
            wrapper.type = 'CPUAutocastOptimWrapper'
            wrapper.dtype = 'bfloat16'
    return cfg


def init_cpu_distributed(launcher: str) -> None:
    """Start torch.distributed with gloo when there is no CUDA.

    mmengine's launchers call ``torch.cuda.set_device`` unconditionally; on a
    CPU-only machine the process group is started here instead, from the same
    environment variables (torchrun's, Slurm's or Open MPI's), and mmengine
    then finds it already initialised.
    """
    import subprocess

    import torch.distributed as dist
    if launcher == 'none' or torch.cuda.is_available() or (dist.is_available() and dist.is_initialized()):
        return
    env = os.environ
    if launcher == 'slurm':
        env.setdefault('MASTER_PORT', '29500')
        if 'MASTER_ADDR' not in env:
            env['MASTER_ADDR'] = subprocess.getoutput(f'scontrol show hostname {env["SLURM_NODELIST"]} | head -n1')
        env['WORLD_SIZE'], env['RANK'] = env['SLURM_NTASKS'], env['SLURM_PROCID']
        env['LOCAL_RANK'] = env.get('SLURM_LOCALID', '0')
    elif launcher == 'mpi':
        env.setdefault('MASTER_PORT', '29500')
        env['WORLD_SIZE'], env['RANK'] = env['OMPI_COMM_WORLD_SIZE'], env['OMPI_COMM_WORLD_RANK']
        env['LOCAL_RANK'] = env.get('OMPI_COMM_WORLD_LOCAL_RANK', '0')
    dist.init_process_group(backend='gloo')


class UsageError(Exception):
    """A problem the user can fix (bad path, bad config); shown as one line, exit code 2."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (KeyError's repr quotes removed)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return ' '.join(str(text).split()) or type(err).__name__


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """Read a config file and apply ``--cfg-options``."""
    if not os.path.isfile(path):
        raise UsageError(f'config file not found: {path}')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def build_runner(cfg: Config, *, config_path: str, launcher: str, check: Tuple[str, ...]):
    """Make the config's synthetic data if it has some, check the data, then build its Runner.

    Raises:
        DataNotFoundError: Data the ``check`` dataloaders need is missing or broken.
        UsageError: The config does not build (unknown arch, misspelt argument, ...).
    """
    from mmengine.registry import RUNNERS, init_default_scope
    from mmengine.runner import Runner
    make_synthetic_data(cfg)
    check_data(cfg, check, config_path)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    init_cpu_distributed(launcher)
    try:
        runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    except (ValueError, TypeError, KeyError) as err:
        raise UsageError(f'{config_path}: {one_line(err)}') from None
    print_log(f'mlla-mm: glibc malloc {malloc_state()} (MLLA_MM_MALLOC=default leaves it alone; '
              'see mlla_mm/utils/malloc.py)', logger='current')
    return runner


def run_main(main: Any) -> int:
    """Run a tool's ``main()``; problems the user can fix become one ``error:`` line on stderr.

    First tunes glibc malloc for large CPU tensors (:mod:`mlla_mm.utils.malloc`).

    Exit codes: 0 done, 2 bad input (paths, config, data, checkpoint), 1 training
    stopped on a non-finite loss.
    """
    import sys

    from ..checkpoint import CheckpointError
    from .hooks import NonFiniteLossError
    try:
        tune_cpu_malloc()  # large CPU tensors off fresh mmap pages; MLLA_MM_MALLOC=default to skip
    except ValueError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    try:
        return main()
    except DataNotFoundError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    except (UsageError, CheckpointError, FileNotFoundError) as err:
        print(f'error: {one_line(err)}', file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f'error: {one_line(err)}', file=sys.stderr)
        return 1
