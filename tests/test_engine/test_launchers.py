"""torch.distributed's environment from each launcher's own variables (torchrun, Slurm, Open MPI) on the CPU.

Slurm is not installed here: a stand-in ``scontrol`` on PATH plays its part.
"""
import os
import stat

import pytest

from mlla_mm.errors import UsageError
from mlla_mm.engine.distributed import distributed_env, first_slurm_node


def fake_scontrol(folder, body):
    """An executable ``scontrol`` in ``folder`` running ``body`` (a shell script); returns a PATH with it first."""
    path = folder / 'scontrol'
    path.write_text('#!/bin/sh\n' + body + '\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return f'{folder}{os.pathsep}{os.environ.get("PATH", "")}'


SLURM = dict(SLURM_NTASKS='4', SLURM_PROCID='3', SLURM_LOCALID='1', SLURM_NODELIST='node[07-08]')


def test_slurm_variables_become_torch_distributed_ones(tmp_path, monkeypatch):
    # scontrol is asked for the node list's hosts; the first is the master.
    monkeypatch.setenv('PATH', fake_scontrol(tmp_path, '[ "$1 $2" = "show hostnames" ] || exit 3\n'
                                                       'echo "$3" > "$(dirname "$0")/asked"\n'
                                                       'printf "node07\\nnode08\\n"'))
    out = distributed_env('slurm', dict(SLURM))
    assert {k: out[k] for k in ('MASTER_ADDR', 'MASTER_PORT', 'WORLD_SIZE', 'RANK', 'LOCAL_RANK')} == dict(
        MASTER_ADDR='node07', MASTER_PORT='29500', WORLD_SIZE='4', RANK='3', LOCAL_RANK='1')
    assert (tmp_path / 'asked').read_text().strip() == 'node[07-08]'
    # A MASTER_ADDR / MASTER_PORT set by the user wins, and scontrol is not run at all.
    monkeypatch.setenv('PATH', fake_scontrol(tmp_path, 'exit 1'))
    out = distributed_env('slurm', dict(SLURM, MASTER_ADDR='10.0.0.5', MASTER_PORT='4242'))
    assert (out['MASTER_ADDR'], out['MASTER_PORT']) == ('10.0.0.5', '4242')
    # LOCAL_RANK defaults to 0 when srun does not set SLURM_LOCALID.
    assert distributed_env('slurm', dict(SLURM_NTASKS='1', SLURM_PROCID='0', MASTER_ADDR='h'))['LOCAL_RANK'] == '0'


def test_slurm_without_srun_names_the_missing_variables():
    with pytest.raises(UsageError) as err:
        distributed_env('slurm', {'SLURM_NTASKS': '2'})
    msg = str(err.value)
    assert 'SLURM_PROCID' in msg and 'SLURM_NODELIST (or MASTER_ADDR)' in msg and 'srun' in msg
    assert 'SLURM_NTASKS' not in msg.split('needs')[1].split('in the environment')[0]


def test_scontrol_missing_or_failing_is_a_clear_error(tmp_path, monkeypatch):
    empty = tmp_path / 'empty'
    empty.mkdir()
    monkeypatch.setenv('PATH', str(empty))
    with pytest.raises(UsageError, match=r"cannot run scontrol .*SLURM_NODELIST='node\[07-08\]'.*set MASTER_ADDR"):
        distributed_env('slurm', dict(SLURM))
    monkeypatch.setenv('PATH', fake_scontrol(tmp_path, 'echo "scontrol: error: Invalid hostlist" >&2; exit 1'))
    with pytest.raises(UsageError, match=r'failed \(scontrol: error: Invalid hostlist\); set MASTER_ADDR'):
        first_slurm_node('node[07-08]')
    monkeypatch.setenv('PATH', fake_scontrol(tmp_path, 'exit 0'))  # succeeds but prints no host
    with pytest.raises(UsageError, match='no host printed'):
        first_slurm_node('node[07-08]')


def test_torchrun_and_mpi_variables(monkeypatch):
    run = dict(RANK='1', WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT='29501', LOCAL_RANK='1')
    assert distributed_env('pytorch', run) == run
    with pytest.raises(UsageError, match=r'--launcher pytorch needs RANK, MASTER_PORT .*torchrun'):
        distributed_env('pytorch', dict(WORLD_SIZE='2', MASTER_ADDR='127.0.0.1'))
    mpi = distributed_env('mpi', dict(OMPI_COMM_WORLD_SIZE='3', OMPI_COMM_WORLD_RANK='2',
                                      OMPI_COMM_WORLD_LOCAL_RANK='0', MASTER_ADDR='h0'))
    assert (mpi['WORLD_SIZE'], mpi['RANK'], mpi['LOCAL_RANK'], mpi['MASTER_PORT']) == ('3', '2', '0', '29500')
    with pytest.raises(UsageError, match=r'--launcher mpi needs MASTER_ADDR .*mpirun'):
        distributed_env('mpi', dict(OMPI_COMM_WORLD_SIZE='3', OMPI_COMM_WORLD_RANK='2'))


@pytest.mark.parametrize('bad, match', [
    (dict(RANK='2'), 'RANK 2 is not below WORLD_SIZE 2'),
    (dict(RANK='-1'), "RANK='-1' is not a non-negative whole number"),
    (dict(WORLD_SIZE='two'), "WORLD_SIZE='two' is not"),
    (dict(MASTER_PORT='http'), "MASTER_PORT='http' is not"),
])
def test_inconsistent_ranks_are_refused(bad, match):
    run = dict(RANK='1', WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT='29501')
    with pytest.raises(UsageError, match=match):
        distributed_env('pytorch', dict(run, **bad))


def test_unknown_launcher():
    with pytest.raises(UsageError, match="unknown launcher 'k8s'"):
        distributed_env('k8s', {})
