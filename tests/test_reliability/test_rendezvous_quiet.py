"""A rank whose rendezvous times out prints one ``error:`` line, not c10d's C++ log (round 3, row 21).

c10d logs each failed try to reach the store with its C++ stack on stderr (16-32 lines before our one line);
:func:`mlla_mm.engine.rendezvous.init_gloo_group` holds file descriptor 2 during the rendezvous and writes back
everything when it succeeds, and all but c10d's log records when it fails.
"""
import os
import subprocess

import pytest

from tests.helpers import PY, ROOT, free_port, tool_env

#: A lone rank through the tools' error handling (``run_main``), as ``tools/train.py --launcher slurm`` starts it.
LONE_RANK = '''
import sys
from mlla_mm.cli import run_main
from mlla_mm.engine.distributed import init_cpu_distributed
sys.exit(run_main(lambda: init_cpu_distributed('slurm') or 0))
'''

#: One rank of a real 2-rank gloo start; the store's start writes to fd 2 (as C++ does) and warns (as Python does).
ONE_OF_TWO = '''
import os, sys, warnings
import torch
import torch.distributed as dist
from mlla_mm.engine.distributed import init_cpu_distributed
real_store, rank = dist.TCPStore, os.environ['SLURM_PROCID']
def noisy_store(*args, **kwargs):
    os.write(2, f'fd2 note of rank {rank}\\n'.encode())
    warnings.warn(f'python warning of rank {rank}')
    return real_store(*args, **kwargs)
dist.TCPStore = noisy_store
init_cpu_distributed('slurm')
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
print('joined', dist.get_rank(), dist.get_world_size(), int(total.item()), flush=True)
dist.destroy_process_group()
'''


def _slurm_env(rank: int, port: int, timeout: str) -> dict:
    env = tool_env(SLURM_NTASKS='2', SLURM_PROCID=str(rank), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
                   MLLA_MM_RENDEZVOUS_TIMEOUT=timeout, PYTHONWARNINGS='default')
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'TORCHELASTIC_USE_AGENT_STORE', 'TORCH_CPP_LOG_LEVEL'):
        env.pop(key, None)
    return env


@pytest.mark.parametrize('timeout', ['1', pytest.param('1e-9', marks=pytest.mark.slow)])
def test_a_lone_rank_1_of_2_prints_only_the_error_line(timeout):
    res = subprocess.run([PY, '-c', LONE_RANK], cwd=ROOT, env=_slurm_env(1, free_port(), timeout),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith('error: --launcher slurm: could not reach the rendezvous of rank 0'), lines[0]
    assert 'SLURM_PROCID=1' in lines[0] and 'MLLA_MM_RENDEZVOUS_TIMEOUT' in lines[0]


def _lone_rank_env(monkeypatch, rank: int) -> None:
    for key in ('SLURM_NTASKS', 'SLURM_PROCID', 'TORCHELASTIC_USE_AGENT_STORE', 'LOCAL_RANK'):
        monkeypatch.delenv(key, raising=False)
    for key, value in dict(RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()),
                           MLLA_MM_RENDEZVOUS_TIMEOUT='1').items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize('rank', [0, 1])
def test_a_failed_rendezvous_writes_nothing_to_fd_2(monkeypatch, capfd, rank):
    from mlla_mm.engine.rendezvous import init_gloo_group
    from mlla_mm.errors import UsageError
    import torch.distributed as dist
    _lone_rank_env(monkeypatch, rank)
    with pytest.raises(UsageError, match='rendezvous'):
        init_gloo_group('pytorch')
    assert not dist.is_initialized()
    assert capfd.readouterr().err == ''


def test_a_failed_rendezvous_keeps_what_is_not_c10d_log(monkeypatch, capfd):
    from mlla_mm.engine.rendezvous import init_gloo_group
    from mlla_mm.errors import UsageError
    import torch.distributed as dist
    real_store = dist.TCPStore

    def store_with_a_note(*args, **kwargs):
        os.write(2, b'a note from another library\n')
        return real_store(*args, **kwargs)

    monkeypatch.setattr(dist, 'TCPStore', store_with_a_note)
    _lone_rank_env(monkeypatch, 1)
    with pytest.raises(UsageError, match='could not reach the rendezvous'):
        init_gloo_group('pytorch')
    err = capfd.readouterr().err
    assert err == 'a note from another library\n', err


def test_a_rendezvous_that_succeeds_writes_back_all_of_stderr(monkeypatch, capfd):
    """c10d's log too: a start that works keeps every line written to fd 2 during it, in order."""
    from mlla_mm.engine.rendezvous import init_gloo_group
    import torch.distributed as dist
    c10d_line = b'[W1207 03:36:35.365757136 TCPStore.cpp:340] [c10d] TCP client failed - retrying\n'
    calls = []

    class Store:
        def __init__(self, *args, **kwargs):
            os.write(2, c10d_line + b'frame #0: c10::Error::Error\n')

        def set_timeout(self, value):
            calls.append(value)

    def init_process_group(**kwargs):
        os.write(2, b'a line while the group starts\n')
        calls.append(kwargs['rank'])

    monkeypatch.setattr(dist, 'TCPStore', Store)
    monkeypatch.setattr(dist, 'init_process_group', init_process_group)
    _lone_rank_env(monkeypatch, 1)
    init_gloo_group('pytorch')
    assert calls[0] == 1 and len(calls) == 2
    err = capfd.readouterr().err
    assert err == c10d_line.decode() + 'frame #0: c10::Error::Error\na line while the group starts\n', err


@pytest.mark.slow
def test_two_ranks_start_gloo_and_keep_their_stderr():
    port = free_port()
    procs = [subprocess.Popen([PY, '-c', ONE_OF_TWO], cwd=ROOT, env=_slurm_env(rank, port, '120'),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (1, 0)]
    try:
        outs = [proc.communicate(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, proc, (out, err) in zip((1, 0), procs, outs):
        assert proc.returncode == 0, err[-3000:]
        assert f'joined {rank} 2 3' in out.splitlines(), out
        assert f'fd2 note of rank {rank}\n' in err, err
        assert f'UserWarning: python warning of rank {rank}' in err, err
        assert 'error:' not in err, err
