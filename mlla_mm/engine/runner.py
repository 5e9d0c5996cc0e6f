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
- in a distributed run, ends the process group at exit unless the run
  failed (:func:`end_distributed`): torch leaves it to the program, and a
  gloo group torn down with the interpreter can abort the process (SIGABRT,
  "terminate called without an active exception") after training is done;
- runs the reliability hooks of :data:`REQUIRED_HOOKS` (adding any that
  ``custom_hooks`` lacks), so also the exact-resume loops that
  :class:`~mlla_mm.engine.hooks.RandomStateHook` switches to.

Checkpoints are written through :class:`AtomicLocalBackend`
(:func:`mlla_mm.utils.io.atomic_write`: temporary file, fsync, rename), and
auto-resume (``resume=True`` without ``load_from``) removes temporary files a
killed run left and skips a damaged or dangling ``last_checkpoint`` marker.
"""
from __future__ import annotations

import atexit
import copy
import glob
import inspect
import os
import os.path as osp
import re
import subprocess
import zipfile
from typing import Any, Dict, Optional, Union

import torch
from mmengine.config import ConfigDict
from mmengine.dist import barrier, is_main_process, master_only
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper, revert_sync_batchnorm
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from ..utils.io import TMP_TAG, atomic_write

#: The file backend name for atomic local writes (``backend_args=dict(backend=ATOMIC_BACKEND)``).
ATOMIC_BACKEND = 'mlla_atomic_local'
#: Hooks SafeRunner always runs (``custom_hooks`` of the runtime base lists them).
REQUIRED_HOOKS = ('RandomStateHook', 'PreemptionHook', 'ValidationResumeHook', 'FiniteLossHook',
                  'CheckpointGuardHook')
_CKPT_NAME = re.compile(r'^(epoch|iter)_(\d+)\.pth$')


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend, writing every file with :func:`~mlla_mm.utils.io.atomic_write`.

    A kill or a full disk while a checkpoint is written leaves the previous
    file intact; a failed write raises :class:`~mlla_mm.utils.io.AtomicWriteError`
    naming the file.
    """

    def put(self, obj: bytes, filepath: Union[str, os.PathLike]) -> None:
        with atomic_write(str(filepath), 'wb') as f:
            f.write(obj)

    def put_text(self, obj: str, filepath: Union[str, os.PathLike], encoding: str = 'utf-8') -> None:
        with atomic_write(str(filepath), 'wb') as f:
            f.write(obj.encode(encoding))


register_backend(ATOMIC_BACKEND, AtomicLocalBackend)


def make_synthetic_data(cfg: Any) -> None:
    """Create the synthetic data set a demo config names in ``synthetic_data`` (reused when complete)."""
    spec = cfg.get('synthetic_data') if cfg is not None else None
    if not spec:
        return
    from ..datasets import make_ade_shapes, make_coco_shapes
    spec = dict(spec)
    kind = spec.pop('kind', None)
    makers = {'coco-shapes': make_coco_shapes, 'ade-shapes': make_ade_shapes}
    if kind not in makers:
        raise ValueError(f'synthetic_data.kind must be one of {sorted(makers)}, got {kind!r}')
    makers[kind](**spec)


#: What each launcher needs in the environment on a CPU-only machine (torchrun, srun and mpirun set them).
LAUNCHER_ENV = {
    'pytorch': ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'),
    'slurm': ('SLURM_NTASKS', 'SLURM_PROCID'),
    'mpi': ('OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_RANK', 'MASTER_ADDR'),
}
_STARTED_BY = {'pytorch': 'torchrun (or tools/dist_train.sh)', 'slurm': 'srun', 'mpi': 'mpirun'}


def first_slurm_node(nodelist: str) -> str:
    """The first host of a Slurm node list (``node[01-04]`` -> ``node01``), through ``scontrol``.

    Raises:
        UsageError: ``scontrol`` is missing or fails; the message says to set ``MASTER_ADDR`` instead.
    """
    from .launch import UsageError
    try:
        res = subprocess.run(['scontrol', 'show', 'hostnames', nodelist], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        raise UsageError(f'--launcher slurm: cannot run scontrol to find the first node of SLURM_NODELIST='
                         f'{nodelist!r} ({err}); set MASTER_ADDR to that node\'s address') from None
    hosts = res.stdout.split()
    if res.returncode != 0 or not hosts:
        why = ' '.join(res.stderr.split()) or f'exit code {res.returncode}, no host printed'
        raise UsageError(f'--launcher slurm: scontrol show hostnames {nodelist!r} failed ({why}); set MASTER_ADDR '
                         'to the first node\'s address')
    return hosts[0]


def distributed_env(launcher: str, env: Dict[str, str]) -> Dict[str, str]:
    """The variables torch.distributed's ``env://`` start needs, from ``launcher``'s own (added to a copy of ``env``).

    Raises:
        UsageError: a variable the launcher sets is missing (the process was not started by it), or
            Slurm's first node cannot be found. The message names the variables.
    """
    from .launch import UsageError
    if launcher not in LAUNCHER_ENV:
        raise UsageError(f'unknown launcher {launcher!r}; choose one of none, {", ".join(LAUNCHER_ENV)}')
    missing = [k for k in LAUNCHER_ENV[launcher] if not env.get(k)]
    if launcher == 'slurm' and not env.get('MASTER_ADDR') and not env.get('SLURM_NODELIST'):
        missing.append('SLURM_NODELIST (or MASTER_ADDR)')
    if missing:
        raise UsageError(f'--launcher {launcher} needs {", ".join(missing)} in the environment, which '
                         f'{_STARTED_BY[launcher]} sets; start the processes with it, or use --launcher none '
                         'for one process')
    out = dict(env)
    if launcher == 'slurm':
        out.setdefault('MASTER_PORT', '29500')
        if not out.get('MASTER_ADDR'):
            out['MASTER_ADDR'] = first_slurm_node(env['SLURM_NODELIST'])
        out['WORLD_SIZE'], out['RANK'] = env['SLURM_NTASKS'], env['SLURM_PROCID']
        out['LOCAL_RANK'] = env.get('SLURM_LOCALID', '0')
    elif launcher == 'mpi':
        out.setdefault('MASTER_PORT', '29500')
        out['WORLD_SIZE'], out['RANK'] = env['OMPI_COMM_WORLD_SIZE'], env['OMPI_COMM_WORLD_RANK']
        out['LOCAL_RANK'] = env.get('OMPI_COMM_WORLD_LOCAL_RANK', '0')
    for key in ('WORLD_SIZE', 'RANK', 'MASTER_PORT'):
        if not out[key].isdigit():
            raise UsageError(f'--launcher {launcher}: {key}={out[key]!r} is not a non-negative whole number')
    if int(out['RANK']) >= int(out['WORLD_SIZE']):
        raise UsageError(f'--launcher {launcher}: RANK {out["RANK"]} is not below WORLD_SIZE {out["WORLD_SIZE"]}')
    return out


def init_cpu_distributed(launcher: str) -> None:
    """Start torch.distributed with gloo when there is no CUDA.

    mmengine's launchers call ``torch.cuda.set_device`` unconditionally; on a
    CPU-only machine the process group is started here instead, from the same
    environment variables (torchrun's, Slurm's or Open MPI's, see
    :func:`distributed_env`), and mmengine then finds it already initialised.
    """
    import torch.distributed as dist
    if launcher == 'none' or torch.cuda.is_available() or (dist.is_available() and dist.is_initialized()):
        return
    os.environ.update(distributed_env(launcher, dict(os.environ)))
    dist.init_process_group(backend='gloo')
    print_log(f'No CUDA: torch.distributed started with gloo (rank {dist.get_rank()} of {dist.get_world_size()}).',
              logger='current')


#: Whether the last SafeRunner train/val/test of this process raised (other than a signal stop that every
#: rank makes at the same iteration): a collective may still be pending, and destroying the group would wait.
_RUN_FAILED = False


def end_distributed() -> None:
    """Destroy torch.distributed's default process group, if one is running and no run failed.

    Called at the end of the tools' ``main()`` and, for scripts that build a
    :class:`SafeRunner` themselves, at interpreter exit (registered by the
    runner). Without it the gloo worker threads still hold the last
    collectives' tensors while Python shuts down, and releasing them then can
    abort the process (seen as a rank ending with SIGABRT after its last
    iteration; torch's own advice is to call ``destroy_process_group``).
    After a failed run it does nothing: gloo's destroy waits for pending
    collectives, which a peer that stopped elsewhere never joins; the process
    exits as it would without it and the launcher stops the others.
    """
    import torch.distributed as dist
    if not _RUN_FAILED and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def cpu_ddp_wrapper_cfg(model_wrapper_cfg: Optional[dict], find_unused_parameters: bool) -> ConfigDict:
    """The DDP wrapper config for CPU modules: mmengine's defaults with ``device_ids=None``."""
    wrapper = ConfigDict(copy.deepcopy(model_wrapper_cfg) if model_wrapper_cfg else dict(
        type='MMDistributedDataParallel', broadcast_buffers=False, find_unused_parameters=find_unused_parameters))
    wrapper['device_ids'] = None  # mmengine passes [LOCAL_RANK], which DDP refuses for CPU modules
    return wrapper


def cpu_amp_wrapper_cfg(optim_wrapper: dict, logger: Any = None) -> dict:
    """An ``AmpOptimWrapper`` config (it needs CUDA) as a bf16 ``CPUAutocastOptimWrapper``; others unchanged."""
    kind = optim_wrapper.get('type')
    if kind not in ('AmpOptimWrapper', 'mmengine.AmpOptimWrapper') and getattr(kind, '__name__', '') != 'AmpOptimWrapper':
        return optim_wrapper
    cpu = copy.copy(optim_wrapper)
    for key in ('loss_scale', 'use_fsdp'):
        cpu.pop(key, None)
    cpu.update(type='CPUAutocastOptimWrapper', dtype='bfloat16')
    if logger is not None:
        logger.warning('No CUDA: the config\'s AmpOptimWrapper (fp16) runs as CPUAutocastOptimWrapper (bf16 autocast '
                       'of the backbone and neck).')
    return cpu


# --------------------------------------------------------------------------
# Auto-resume.
# --------------------------------------------------------------------------
def remove_stale_temp_files(folder: str) -> None:
    """Delete temporary checkpoint files that a killed run left behind."""
    for path in glob.glob(osp.join(glob.escape(folder), f'.*.pth{TMP_TAG}*')):
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
    ``work_dir`` (newest by modification time, then by N).
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
            candidates.append((os.stat(path).st_mtime_ns, int(m.group(2)), path))
    for _, _, path in sorted(candidates, reverse=True):
        if _is_readable_checkpoint(path):
            if logger is not None and osp.isfile(marker):
                logger.warning(f'{marker} names {named!r}, which is missing or unreadable; '
                               f'resuming from {path} instead.')
            return path
    return None


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
        #: the checkpoint being read by :meth:`load_checkpoint` (for the hooks' messages)
        self.checkpoint_being_loaded: Optional[str] = None
        super().__init__(**params)
        if self.distributed:
            atexit.unregister(end_distributed)  # once, however many runners a script builds
            atexit.register(end_distributed)
        if self.cfg.get('synthetic_data'):
            if is_main_process():
                make_synthetic_data(self.cfg)
            barrier()

    def train(self) -> Any:
        """mmengine's; a failure is recorded for :func:`end_distributed`."""
        return self._noting_failure(super().train)

    def val(self) -> Any:
        """mmengine's; a failure is recorded for :func:`end_distributed`."""
        return self._noting_failure(super().val)

    def test(self) -> Any:
        """mmengine's; a failure is recorded for :func:`end_distributed`."""
        return self._noting_failure(super().test)

    @staticmethod
    def _noting_failure(run: Any) -> Any:
        global _RUN_FAILED
        from .hooks import TrainingInterrupted
        _RUN_FAILED = False  # only the last run can have left a collective pending
        try:
            return run()
        except TrainingInterrupted:
            raise  # a signal stop: every rank stopped after the same iteration, nothing is pending
        except BaseException:
            _RUN_FAILED = True
            raise

    def wrap_model(self, model_wrapper_cfg: Optional[Dict], model: torch.nn.Module) -> Any:
        """mmengine's wrapping; a distributed run without CUDA gets BN and a CPU DDP wrapper."""
        if self.distributed and not torch.cuda.is_available() and not is_model_wrapper(model):
            model = revert_sync_batchnorm(model)  # SyncBN needs CUDA
            model_wrapper_cfg = cpu_ddp_wrapper_cfg(model_wrapper_cfg, self.cfg.get('find_unused_parameters', False))
        return super().wrap_model(model_wrapper_cfg, model)

    def build_optim_wrapper(self, optim_wrapper: Any) -> Any:
        """mmengine's; without CUDA an ``AmpOptimWrapper`` becomes bf16 ``CPUAutocastOptimWrapper``."""
        if isinstance(optim_wrapper, dict) and not torch.cuda.is_available():
            optim_wrapper = cpu_amp_wrapper_cfg(optim_wrapper, self.logger)
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

    def load_or_resume(self) -> None:
        """mmengine's, with an auto-resume that survives a killed checkpoint write."""
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


def checkpoint_name(runner: Runner) -> str:
    """The file :meth:`SafeRunner.load_checkpoint` is reading (best guess for another Runner)."""
    return getattr(runner, 'checkpoint_being_loaded', None) or runner._load_from or 'the checkpoint'


__all__ = ['SafeRunner', 'AtomicLocalBackend', 'ATOMIC_BACKEND', 'LAUNCHER_ENV', 'REQUIRED_HOOKS', 'make_synthetic_data',
           'init_cpu_distributed', 'distributed_env', 'first_slurm_node', 'find_resumable_checkpoint',
           'remove_stale_temp_files', 'checkpoint_name', 'with_required_hooks', 'cpu_ddp_wrapper_cfg',
           'cpu_amp_wrapper_cfg']
