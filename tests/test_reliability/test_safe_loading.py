"""Every tool that reads a checkpoint refuses a file whose unpickling would run code.

Each crafted file would create a marker file when unpickled; the tools run as
subprocesses (the real path), and the marker must not appear.
"""
import os

import pytest
import torch

from tests.helpers import run_tool, tool_env, write_tiny_config


class Evil:
    """Unpickling this creates ``marker`` (stands in for any code a pickle can run)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_data):
    """A real resume checkpoint written by tools/train.py (1 epoch of the tiny config)."""
    folder = tmp_path_factory.mktemp('trained')
    config = write_tiny_config(folder, tiny_data, epochs=1)
    done = run_tool('tools/train.py', config, '--work-dir', folder / 'work')
    assert done.returncode == 0, done.stderr[-3000:]
    return config, folder / 'work' / 'epoch_1.pth'


@pytest.fixture
def evil(tmp_path, trained):
    marker = tmp_path / 'marker'
    ckpt = torch.load(trained[1], weights_only=False)  # our own file, from the fixture
    ckpt['payload'] = Evil(marker)
    path = tmp_path / 'evil.pth'
    torch.save(ckpt, path)
    return path, marker


def assert_refused(done, path, marker):
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert not marker.exists(), 'code from the checkpoint ran'
    err = done.stderr
    assert 'Traceback' not in err, err[-3000:]
    assert str(path) in err and 'MLLA_MM_TRUST_CHECKPOINTS' in err and 'trusted' in err


@pytest.mark.slow
def test_real_resume_checkpoint_loads_in_a_fresh_process(trained):
    """torch 2.14 + mmengine's own resume checkpoint (HistoryBuffer, numpy scalars) via load_file."""
    code = ('import sys; from mlla_mm.checkpoint import load_file; c = load_file(sys.argv[1]); '
            'print(sorted(c), type(c["message_hub"]["log_scalars"]["train/loss"]).__name__)')
    done = run_tool('-c', code, trained[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'HistoryBuffer' in done.stdout and 'rng_state' in done.stdout


@pytest.mark.slow
def test_tools_test_reads_a_real_checkpoint(trained, tmp_path):
    done = run_tool('tools/test.py', trained[0], trained[1], '--work-dir', tmp_path / 'test')
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'metrics:' in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize('path', ['load_from', 'resume', 'test', 'convert'])
def test_malicious_checkpoint_is_refused_by_every_tool(path, trained, evil, tmp_path):
    config = trained[0]
    ckpt, marker = evil
    work = tmp_path / 'work'
    if path == 'load_from':
        done = run_tool('tools/train.py', config, '--work-dir', work, '--cfg-options', f'load_from={ckpt}')
    elif path == 'resume':
        done = run_tool('tools/train.py', config, '--work-dir', work, '--resume', ckpt)
    elif path == 'test':
        done = run_tool('tools/test.py', config, ckpt, '--work-dir', work)
    else:
        out = tmp_path / 'converted.pth'
        done = run_tool('tools/convert_checkpoint.py', ckpt, out)
        assert not out.exists() and not list(tmp_path.glob('.converted.pth*'))
    assert_refused(done, ckpt, marker)
    # Nothing was written as a checkpoint.
    assert not list(work.glob('*.pth')) if work.exists() else True
    # The opt-in for trusted files (what runs the marker) exists, and is off by default.
    assert 'MLLA_MM_TRUST_CHECKPOINTS' not in tool_env()
