"""torch.distributed on any machine: the launchers' environment, gloo without CUDA, the end of the group.

mmengine's launchers need CUDA; :class:`~mlla_mm.engine.runner.SafeRunner`
starts a CPU-only distributed run here (:func:`init_cpu_distributed`), wraps
the model with :func:`cpu_ddp_wrapper_cfg`, and at exit lets the ranks meet and
ends the process group unless the run failed (:func:`end_distributed`).
"""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any, Callable, Dict, Optional

import torch
from mmengine.config import ConfigDict
from mmengine.logging import print_log

from ..errors import TrainingInterrupted, UsageError
from .rendezvous import DEFAULT_RENDEZVOUS_TIMEOUT, RENDEZVOUS_ENV, init_gloo_group, rendezvous_timeout

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


def end_distributed(meet: bool = True) -> None:
    """Wait for every rank, then destroy torch.distributed's default process group (if one runs and no run failed).

    Called at the end of the tools' ``main()`` and, for scripts that build a
    :class:`SafeRunner` themselves, at interpreter exit
    (:func:`end_distributed_at_exit`, registered by the runner). A gloo worker
    thread releases a finished collective's tensors after the caller has
    moved on, and that takes the GIL: a rank that ends straight after its
    last collective (rank 1 while rank 0 writes the last checkpoint) can
    begin interpreter shutdown first, and the thread then aborts the process
    (SIGABRT, ``terminate called without an active exception``; how often:
    ``dev/ddp_end_stress.py``, docs/reliability.md). So with ``meet`` the
    ranks first meet at a barrier, waited for here without the GIL and at
    most the rendezvous timeout (``MLLA_MM_RENDEZVOUS_TIMEOUT``); if it times
    out (a peer stopped elsewhere) the group is left as it is, with one
    warning. Then the group is destroyed, as torch advises.

    Args:
        meet: wait for the other ranks first; false when this process stops on
            an error (its peers may be anywhere, and the launcher stops them).

    After a failed run it does nothing: gloo's destroy waits for pending
    collectives, which a peer that stopped elsewhere never joins; the process
    exits as it would without it and the launcher stops the others.
    """
    import torch.distributed as dist
    if _RUN_FAILED or not (dist.is_available() and dist.is_initialized()):
        return
    if meet and dist.get_world_size() > 1:
        try:
            wait_s = rendezvous_timeout()
        except UsageError as err:  # unchecked until now when the group was not started here (CUDA, a script)
            wait_s = DEFAULT_RENDEZVOUS_TIMEOUT
            print(f'warning: {err}; the end of the run waits at most {wait_s:g} s', file=sys.stderr, flush=True)
        start = time.monotonic()
        try:
            dist.barrier(async_op=True).wait(timedelta(seconds=wait_s))
        except RuntimeError as err:
            if time.monotonic() - start >= 0.99 * wait_s:
                why = f'waited {wait_s:g} s; {RENDEZVOUS_ENV} sets the wait'
            else:  # gloo's own words, less its source location: '[.../pair.cc:545] Read error ...: Connection reset'
                why = re.sub(r'^\[[^\]]*\]\s*', '', ' '.join(str(err).split())).split('. ')[0][:160]
            # on stderr: mmengine's console shows only rank 0's records, and this can happen on any rank
            print(f'warning: rank {dist.get_rank()}: the other processes did not reach the end of the run ({why}); '
                  'the process group is left to the launcher', file=sys.stderr, flush=True)
            return
    dist.destroy_process_group()


def end_distributed_at_exit() -> None:
    """:func:`end_distributed` at interpreter exit: the ranks meet unless the script died of an exception."""
    end_distributed(meet=getattr(sys, 'last_value', None) is None)


def run_noting_failure(run: Callable[[], Any]) -> Any:
    """``run()``, recording for :func:`end_distributed` whether it failed (a signal stop is not a failure)."""
    global _RUN_FAILED
    _RUN_FAILED = False  # only the last run can have left a collective pending
    try:
        return run()
    except TrainingInterrupted:
        raise  # a signal stop: every rank stopped after the same iteration, nothing is pending
    except BaseException:
        _RUN_FAILED = True
        raise


def cpu_ddp_wrapper_cfg(model_wrapper_cfg: Optional[dict], find_unused_parameters: bool) -> ConfigDict:
    """The DDP wrapper config for CPU modules: mmengine's defaults with ``device_ids=None``."""
    wrapper = ConfigDict(copy.deepcopy(model_wrapper_cfg) if model_wrapper_cfg else dict(
        type='MMDistributedDataParallel', broadcast_buffers=False, find_unused_parameters=find_unused_parameters))
    wrapper['device_ids'] = None  # mmengine passes [LOCAL_RANK], which DDP refuses for CPU modules
    return wrapper


__all__ = ['LAUNCHER_ENV', 'first_slurm_node', 'distributed_env', 'init_cpu_distributed', 'end_distributed',
           'end_distributed_at_exit', 'run_noting_failure', 'cpu_ddp_wrapper_cfg']
