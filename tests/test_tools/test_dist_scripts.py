"""tools/dist_train.sh and dist_test.sh on GPU and CPU machines (issue 29), with a stand-in Python."""
import os
import subprocess

import pytest

from tests.helpers import ROOT

FAKE = '''#!/usr/bin/env bash
# torch's answer (the device count) comes from GPUS_SEEN; anything else: record the command line
if [[ "$1" == "-c" ]]; then echo "${GPUS_SEEN:-0}"; exit 0; fi
echo "$*" > "$(dirname "$0")/launched.txt"
'''


@pytest.fixture
def fake_python(tmp_path):
    py = tmp_path / 'python'
    py.write_text(FAKE)
    py.chmod(0o755)
    return py


def _run(script, fake_python, gpus_seen, *args):
    env = dict(os.environ, PYTHON=str(fake_python), GPUS_SEEN=str(gpus_seen))
    return subprocess.run(['bash', str(ROOT / 'tools' / script), *args], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize('script, args', [('dist_train.sh', ['c.py']), ('dist_test.sh', ['c.py', 'w.pth'])])
def test_one_process_per_gpu_with_nccl_and_cpu_processes_with_gloo(fake_python, script, args):
    res = _run(script, fake_python, 2, *args, '2')
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == f'{script}: 2 process(es) on 2 of 2 GPU(s), NCCL'
    launched = (fake_python.parent / 'launched.txt').read_text()
    assert '--nproc_per_node=2' in launched and '--launcher pytorch' in launched
    res = _run(script, fake_python, 0, *args, '2')
    assert res.returncode == 0 and res.stderr.strip() == f'{script}: no CUDA: 2 CPU process(es), gloo'


@pytest.mark.parametrize('script, args', [('dist_train.sh', ['c.py']), ('dist_test.sh', ['c.py', 'w.pth'])])
def test_more_processes_than_gpus_or_a_bad_count_is_one_error_line(fake_python, script, args):
    res = _run(script, fake_python, 1, *args, '2')
    assert res.returncode == 2
    assert res.stderr.strip() == f'error: {script}: 2 processes but this machine has 1 GPU(s) (one process per GPU)'
    assert not (fake_python.parent / 'launched.txt').exists()
    res = _run(script, fake_python, 1, *args, 'two')
    assert res.returncode == 2 and res.stderr.startswith(f'error: {script}: GPUS must be a positive integer')
