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
so is mmengine's ``last_checkpoint`` marker. Auto-resume (``resume=True``
without ``load_from``) looks wherever the config writes checkpoints (the work
dir and ``default_hooks.checkpoint.out_dir``/<work dir name>), removes
temporary files that dead runs left, skips an empty, damaged or dangling
``last_checkpoint`` marker and never starts over silently: checkpoints that
exist but none of which can be read stop the run with one line. A training
run holds the work dir (:class:`WorkDirLock`): a second run there is refused
while the first lives. A full disk is one line naming the work dir, not an
``OSError`` traceback. A resumed run warns when the config's learning rate
or parameter schedule differs from the checkpoint's (the checkpoint's is used).
"""
from __future__ import annotations

import atexit
import copy
import errno
import glob
import inspect
import json
import os
import os.path as osp
import re
import socket
import subprocess
import time
import zipfile
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.config import ConfigDict
from mmengine.dist import barrier, is_main_process, master_only
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper, revert_sync_batchnorm
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from ..datasets.checks import check_data
from ..datasets.synthetic import make_synthetic_data
from ..errors import TrainingInterrupted, UsageError
from ..utils.io import TMP_TAG, AtomicWriteError, atomic_write
from ..utils.malloc import malloc_state
from .config_cache import text_once
from .console import keep_parameter_reports_off_console
from .rendezvous import init_gloo_group
from .run_checks import amp_optim_wrapper_cfg, check_run, loaders_of_run, skip_unneeded_pretrained

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
    init_gloo_group(launcher)  # waits at most MLLA_MM_RENDEZVOUS_TIMEOUT s for every process, then one line
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


def cpu_ddp_wrapper_cfg(model_wrapper_cfg: Optional[dict], find_unused_parameters: bool) -> ConfigDict:
    """The DDP wrapper config for CPU modules: mmengine's defaults with ``device_ids=None``."""
    wrapper = ConfigDict(copy.deepcopy(model_wrapper_cfg) if model_wrapper_cfg else dict(
        type='MMDistributedDataParallel', broadcast_buffers=False, find_unused_parameters=find_unused_parameters))
    wrapper['device_ids'] = None  # mmengine passes [LOCAL_RANK], which DDP refuses for CPU modules
    return wrapper


# --------------------------------------------------------------------------
# Auto-resume.
# --------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one we may not signal counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder: str) -> None:
    """Delete temporary checkpoint files that dead runs left behind.

    A temporary file's name ends with its writer's pid (:func:`mlla_mm.utils.io.temp_name`);
    one whose writer still runs on this host is never removed.
    """
    for path in glob.glob(osp.join(glob.escape(folder), f'.*.pth{TMP_TAG}*')):
        pid = path.rpartition(TMP_TAG)[2]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
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


def _read_marker(marker: str) -> str:
    """The path a ``last_checkpoint`` file names (``''`` when it is missing, empty or unreadable)."""
    try:
        with open(marker, 'rb') as f:
            return f.read(4096).decode('utf-8').strip()
    except (OSError, UnicodeDecodeError):
        return ''


def checkpoint_candidates(folders: Sequence[str]) -> List[str]:
    """Every ``epoch_N.pth`` / ``iter_N.pth`` in ``folders``, newest first (by modification time, then N)."""
    found = []
    seen = set()
    for folder in folders:
        if not folder or not osp.isdir(folder) or osp.realpath(folder) in seen:
            continue
        seen.add(osp.realpath(folder))
        for name in os.listdir(folder):
            m = _CKPT_NAME.match(name)
            if m:
                path = osp.join(folder, name)
                try:
                    found.append((os.stat(path).st_mtime_ns, int(m.group(2)), path))
                except OSError:
                    pass
    return [path for _, _, path in sorted(found, reverse=True)]


def find_resumable_checkpoint(work_dir: str, logger: Any = None, folders: Sequence[str] = ()) -> Optional[str]:
    """The checkpoint to auto-resume from, or ``None``.

    ``work_dir/last_checkpoint`` is used when it names a readable checkpoint;
    otherwise (missing, empty, unreadable or dangling) the newest readable
    ``epoch_N.pth`` / ``iter_N.pth`` in ``work_dir`` and ``folders`` (where the
    config's checkpoint hook writes, see :func:`checkpoint_folders`), newest
    by modification time, then by N.
    """
    marker = osp.join(work_dir, 'last_checkpoint')
    named = _read_marker(marker)
    if _is_readable_checkpoint(named):
        return named
    for path in checkpoint_candidates([work_dir, *folders]):
        if _is_readable_checkpoint(path):
            if logger is not None and osp.isfile(marker):
                logger.warning(f'{marker} names {named!r}, which is missing or unreadable; '
                               f'resuming from {path} instead.')
            return path
    return None


def checkpoint_folders(runner: Runner) -> List[str]:
    """The local folders the runner's ``CheckpointHook`` writes to besides the work dir.

    mmengine writes to ``out_dir/<work dir's name>`` when the hook has an ``out_dir``.
    """
    from mmengine.hooks import CheckpointHook
    folders = []
    work_dir = osp.abspath(runner.work_dir)
    for hook in getattr(runner, '_hooks', []):
        out_dir = getattr(hook, 'out_dir', None) if isinstance(hook, CheckpointHook) else None
        if not isinstance(out_dir, str) or '://' in out_dir:
            continue
        name = osp.basename(work_dir.rstrip(osp.sep))
        folders.append(osp.join(out_dir, name))
        if osp.basename(out_dir.rstrip(osp.sep)) == name:  # before_train already added the name
            folders.append(out_dir)
    return folders


# --------------------------------------------------------------------------
# One run per work dir.
# --------------------------------------------------------------------------
#: The lock file a training run holds in its work dir.
LOCK_NAME = '.mlla-mm-run.lock'


class WorkDirLock:
    """An advisory lock on a work dir: a file with the owner's pid and host, held with ``flock``.

    :meth:`acquire` refuses (:class:`~mlla_mm.engine.launch.UsageError`, one
    line naming the owner) while another live run holds it; a lock left by a
    run that died (its pid gone on this host, or its ``flock`` released) is
    taken over with a warning. A lock of another host whose ``flock`` cannot
    be seen is refused too (its liveness cannot be checked from here); the
    message says to delete the file when that run is over.
    """

    def __init__(self, work_dir: str) -> None:
        self.path = osp.join(work_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    @staticmethod
    def _owner_text(owner: Dict[str, Any]) -> str:
        return f'pid {owner.get("pid")} on host {owner.get("host")}' + \
            (f', started {owner["started"]}' if owner.get('started') else '')

    def _read_owner(self, fd: int) -> Dict[str, Any]:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            owner = json.loads(os.read(fd, 4096).decode('utf-8') or '{}')
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def acquire(self, logger: Any = None) -> None:
        """Take the lock (see the class); raises ``UsageError`` when another live run holds it."""
        import fcntl

        os.makedirs(osp.dirname(self.path), exist_ok=True)
        host = socket.gethostname()
        for _ in range(5):  # the file may be replaced between open and flock by an owner that ends
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                owner = self._read_owner(fd)
                os.close(fd)
                raise UsageError(f'work dir {osp.dirname(self.path)} is in use by another training run '
                                 f'({self._owner_text(owner) if owner else "owner unknown"}, lock {self.path}); '
                                 'wait for it to end or choose another --work-dir') from None
            except OSError:  # a file system without flock: the pid decides
                flocked = False
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except OSError:
                same_file = False
            if not same_file:
                os.close(fd)
                continue
            break
        else:
            raise UsageError(f'cannot take the lock {self.path}: it keeps being replaced by another run')
        owner = self._read_owner(fd)
        pid = owner.get('pid')
        if owner and pid != os.getpid():
            alive = isinstance(pid, int) and _pid_alive(pid)
            if owner.get('host') != host and not flocked:
                os.close(fd)
                raise UsageError(f'work dir {osp.dirname(self.path)} is locked by a run on another host '
                                 f'({self._owner_text(owner)}, lock {self.path}); if that run is over, delete the '
                                 'lock file and start again')
            if owner.get('host') == host and alive and not flocked:
                os.close(fd)
                raise UsageError(f'work dir {osp.dirname(self.path)} is in use by another training run '
                                 f'({self._owner_text(owner)}, lock {self.path}); wait for it to end or choose '
                                 'another --work-dir')
            if logger is not None:
                logger.warning(f'{self.path}: took over the lock of a run that is no longer running '
                               f'({self._owner_text(owner)}).')
        text = json.dumps(dict(pid=os.getpid(), host=host, started=time.strftime('%Y-%m-%d %H:%M:%S')))
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, text.encode('utf-8'))
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            raise _disk_error(err, osp.dirname(self.path), f'writing the lock {self.path}') from None
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file (if still ours) and drop the lock."""
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None


# --------------------------------------------------------------------------
# A full disk: one line, not a traceback.
# --------------------------------------------------------------------------
_DISK_FULL = (errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC))


def _disk_error(err: OSError, work_dir: str, doing: str) -> AtomicWriteError:
    """``err`` (disk full, quota, read-only file system, ...) as one line naming the work dir."""
    reason = 'no space left on the device' if err.errno in _DISK_FULL else (err.strerror or str(err))
    return AtomicWriteError(err.errno, f'cannot write in the work dir {work_dir} ({doing}): {reason}; free some '
                            'space (or choose another --work-dir) and run again, with --resume to continue')


@contextmanager
def _disk_full_is_one_line(work_dir: Any, doing: str) -> Iterator[None]:
    """Turn a disk-full ``OSError`` raised inside the block into an :class:`AtomicWriteError` naming ``work_dir``."""
    try:
        yield
    except AtomicWriteError:
        raise  # already names its file
    except OSError as err:
        if err.errno not in _DISK_FULL and err.errno != errno.EROFS:
            raise
        raise _disk_error(err, str(work_dir), doing) from None


# --------------------------------------------------------------------------
# mmengine's last_checkpoint marker, written atomically.
# --------------------------------------------------------------------------
def _with_atomic_marker(save: Any) -> Any:
    """``CheckpointHook._save_checkpoint_with_step`` writing ``last_checkpoint`` through :func:`atomic_write`.

    mmengine writes the marker with a plain ``open(..., 'w')``: a full disk
    or a kill leaves it empty. While ``save`` runs, the ``open`` its module
    sees sends a write of a file named ``last_checkpoint`` to the atomic
    writer and everything else to the built-in.
    """
    import builtins
    import functools
    import sys

    def marker_open(file: Any, mode: str = 'r', *a: Any, **kw: Any) -> Any:
        if osp.basename(str(file)) == 'last_checkpoint' and mode in ('w', 'wt'):
            return atomic_write(str(file), 'w')
        return builtins.open(file, mode, *a, **kw)

    @functools.wraps(save)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        names = dict.fromkeys([save.__module__, 'mmengine.hooks.checkpoint_hook'])  # a subclass's and mmengine's
        modules = [sys.modules[n] for n in names if n in sys.modules]
        previous = [vars(m).get('open') for m in modules]
        for module in modules:
            module.open = marker_open
        try:
            return save(*args, **kwargs)
        finally:
            for module, prev in zip(modules, previous):
                if prev is None:
                    del module.open
                else:
                    module.open = prev
    return wrapper


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
        with _disk_full_is_one_line(params.get('work_dir', '.'), 'starting the run'):
            super().__init__(**params)
        keep_parameter_reports_off_console(self.logger)  # per-parameter reports: log file only
        from mmengine.hooks import CheckpointHook
        for hook in self._hooks:  # mmengine writes last_checkpoint with a plain open(): atomically instead
            save = getattr(hook, '_save_checkpoint_with_step', None)
            if isinstance(hook, CheckpointHook) and save is not None and not hasattr(save, '__wrapped__'):
                hook._save_checkpoint_with_step = _with_atomic_marker(save)
        if self.distributed:
            atexit.unregister(end_distributed)  # once, however many runners a script builds
            atexit.register(end_distributed)
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

        A failure is recorded for :func:`end_distributed`.
        """
        check_model_step(self, 'train_step', self.config_name)

        def run() -> Any:
            if is_main_process():
                self._work_dir_lock = WorkDirLock(self.work_dir)
                self._work_dir_lock.acquire(self.logger)
            try:
                with _disk_full_is_one_line(self.work_dir, 'training'):
                    return super(SafeRunner, self).train()
            finally:
                if self._work_dir_lock is not None:
                    self._work_dir_lock.release()
                    self._work_dir_lock = None
        return self._noting_failure(run)

    def val(self) -> Any:
        """mmengine's, its data checked first; a failure is recorded for :func:`end_distributed`."""
        self._check_loaders(('val_dataloader', ))
        return self._noting_failure(super().val)

    def test(self) -> Any:
        """mmengine's, its data checked first; a failure is recorded for :func:`end_distributed`."""
        self._check_loaders(('test_dataloader', ))
        check_model_step(self, 'test_step', self.config_name)
        return self._noting_failure(super().test)

    @staticmethod
    def _noting_failure(run: Any) -> Any:
        global _RUN_FAILED
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
                if _read_marker(marker):
                    raise UsageError(f'--resume: {marker} names {_read_marker(marker)}, which is gone, and no other '
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


def checkpoint_name(runner: Runner) -> str:
    """The file :meth:`SafeRunner.load_checkpoint` is reading (best guess for another Runner)."""
    return getattr(runner, 'checkpoint_being_loaded', None) or runner._load_from or 'the checkpoint'


__all__ = ['SafeRunner', 'AtomicLocalBackend', 'WorkDirLock', 'LOCK_NAME', 'checkpoint_folders',
           'checkpoint_candidates', 'resume_setting_changes', 'ATOMIC_BACKEND', 'LAUNCHER_ENV', 'REQUIRED_HOOKS',
           'make_synthetic_data',
           'init_cpu_distributed', 'distributed_env', 'first_slurm_node', 'find_resumable_checkpoint',
           'remove_stale_temp_files', 'checkpoint_name', 'with_required_hooks', 'cpu_ddp_wrapper_cfg',
           'guard_wants_whole_model', 'check_model_step']
