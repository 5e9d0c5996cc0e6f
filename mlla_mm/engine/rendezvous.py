"""Starting torch.distributed on CPUs (gloo) with a bounded rendezvous.

torch's ``env://`` rendezvous waits up to 30 minutes, silently, for the
processes that the environment announces (``WORLD_SIZE``, Slurm's
``SLURM_NTASKS``, Open MPI's ``OMPI_COMM_WORLD_SIZE``); a job with
``SLURM_NTASKS=2`` of which only one process was started printed nothing and
never ended in practice. :func:`init_gloo_group` waits at most
``MLLA_MM_RENDEZVOUS_TIMEOUT`` seconds (default
:data:`DEFAULT_RENDEZVOUS_TIMEOUT`) for all processes to join and then stops
with one line naming the variables; the collectives of the run keep torch's
default timeout.

While the store connects, c10d's C++ code logs each failed try with its stack
frames on stderr (16-32 lines before our one line). ``TORCH_CPP_LOG_LEVEL`` is
read once when torch loads, too early to change for the rendezvous alone, so
file descriptor 2 goes to a temporary file for the rendezvous only
(:func:`_holding_stderr`): everything is written back when it succeeds, and all
but c10d's log records when it fails.
"""
from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from datetime import timedelta
from typing import Callable, Dict, TypeVar

from ..errors import UsageError

#: Environment variable: seconds the rendezvous waits for every process.
RENDEZVOUS_ENV = 'MLLA_MM_RENDEZVOUS_TIMEOUT'
DEFAULT_RENDEZVOUS_TIMEOUT = 300.0

#: The variables each launcher sets for the world size and the rank (named in the messages).
_WORLD_VARS: Dict[str, str] = {'slurm': 'SLURM_NTASKS={world}, SLURM_PROCID={rank}',
                               'mpi': 'OMPI_COMM_WORLD_SIZE={world}, OMPI_COMM_WORLD_RANK={rank}',
                               'pytorch': 'WORLD_SIZE={world}, RANK={rank}'}
_STARTER = {'slurm': 'srun starts SLURM_NTASKS processes', 'mpi': 'mpirun -n N starts them',
            'pytorch': 'torchrun --nproc-per-node N (or tools/dist_train.sh) starts them'}

#: The first line of a c10d log record (``[E1207 03:36:35.344934820 socket.cpp:1028] [c10d] ...``) and the lines
#: that follow it in the same record (the C++ stack of the exception it reports).
_C10D_RECORD = re.compile(r'\[[IWEF]\d{4} [\d:.]+ [^\]\s]+\] \[c10d\]')
_C10D_FOLLOWING = re.compile(r'(Exception raised from |frame #\d+: |<omitting python frames>|\s*$)')

_T = TypeVar('_T')


def _without_c10d_log(text: str) -> str:
    """``text`` less c10d's log records (their first line and the stack lines after it); other lines kept."""
    kept, in_record = [], False
    for line in text.splitlines(keepends=True):
        if _C10D_RECORD.match(line):
            in_record = True
        elif not (in_record and _C10D_FOLLOWING.match(line)):
            in_record = False
            kept.append(line)
    return ''.join(kept)


def _write_fd2(data: bytes) -> None:
    """All of ``data`` to file descriptor 2 (nothing if it is closed)."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(2, view):]
    except OSError:
        pass


def _holding_stderr(call: Callable[[], _T]) -> _T:
    """``call()`` with file descriptor 2 (C++ and Python alike) going to a temporary file, written back after it.

    Everything is written back when ``call`` returns; when it raises, all but c10d's log records (a failed
    rendezvous is reported by the caller in one line). Without a descriptor 2 to save, ``call()`` as it is.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    try:
        saved = os.dup(2)
    except OSError:
        return call()
    succeeded = False
    with tempfile.TemporaryFile() as held:
        try:
            os.dup2(held.fileno(), 2)
            result = call()
            succeeded = True
            return result
        finally:
            try:
                sys.stderr.flush()
            except (AttributeError, OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            data = held.read()
            if not succeeded:
                data = _without_c10d_log(data.decode('utf-8', 'surrogateescape')).encode('utf-8', 'surrogateescape')
            _write_fd2(data)


def rendezvous_timeout() -> float:
    """Seconds to wait for every process (``MLLA_MM_RENDEZVOUS_TIMEOUT``, default 300).

    Raises:
        UsageError: The variable is set but not a number of seconds > 0.
    """
    text = os.environ.get(RENDEZVOUS_ENV, '').strip()
    if not text:
        return DEFAULT_RENDEZVOUS_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f'{RENDEZVOUS_ENV}={text!r}: expected a number of seconds > 0 '
                         f'(default {DEFAULT_RENDEZVOUS_TIMEOUT:g})')
    return value


def init_gloo_group(launcher: str) -> None:
    """``torch.distributed.init_process_group('gloo')`` from ``RANK``/``WORLD_SIZE``/``MASTER_*``, bounded in time.

    The environment is the one :func:`~mlla_mm.engine.distributed.distributed_env`
    made. Rank 0 serves the rendezvous store and waits for the others; each
    other rank connects to it; both wait at most :func:`rendezvous_timeout`.
    Under torchrun (its agent did the rendezvous) torch's own start is used.

    Raises:
        UsageError: Not every process joined in time, or the address cannot be used; one line naming the
            launcher's variables, the address and ``MLLA_MM_RENDEZVOUS_TIMEOUT``.
    """
    import torch.distributed as dist

    timeout = rendezvous_timeout()
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':  # torchrun's agent holds the store
        dist.init_process_group(backend='gloo')
        return
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    addr, port = os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT'])
    names = _WORLD_VARS.get(launcher, _WORLD_VARS['pytorch']).format(world=world, rank=rank)
    where = f'MASTER_ADDR={addr}, MASTER_PORT={port}'

    def start() -> 'dist.TCPStore':
        store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timedelta(seconds=timeout),
                              wait_for_workers=True, multi_tenant=True)
        dist.init_process_group(backend='gloo', store=store, rank=rank, world_size=world)
        return store

    try:
        store = _holding_stderr(start)  # c10d's log of each failed try is not shown when the start fails
    except (RuntimeError, OSError, ValueError) as err:  # DistStoreError / DistNetworkError are RuntimeErrors
        text = ' '.join(str(err).split())
        joined = re.search(r'(\d+)/(\d+) clients joined', text)
        if joined:
            what = (f'only {joined.group(1)} of {joined.group(2)} processes joined the rendezvous within '
                    f'{timeout:g} s')
        elif 'timed out' in text.lower() or 'timeout' in text.lower():
            what = f'could not reach the rendezvous of rank 0 within {timeout:g} s'
        else:
            what = f'the rendezvous failed: {text[:200]}'
        raise UsageError(f'--launcher {launcher}: {what} ({names}, {where}); start all {world} processes '
                         f'({_STARTER.get(launcher, _STARTER["pytorch"])}) or fix these variables; '
                         f'{RENDEZVOUS_ENV} sets the wait in seconds') from None
    from torch.distributed.constants import default_pg_timeout
    store.set_timeout(default_pg_timeout)  # only the start is bounded this tightly


__all__ = ['init_gloo_group', 'rendezvous_timeout', 'RENDEZVOUS_ENV', 'DEFAULT_RENDEZVOUS_TIMEOUT']
