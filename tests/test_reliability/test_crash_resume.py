"""Kill training at several points (one during a checkpoint write), resume, compare with an uninterrupted run."""
import glob
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mlla_mm.checkpoint import load_file

from tests.helpers import PY, ROOT, run_tool, tool_env, write_tiny_config

EPOCHS = 6  # 2 iterations per epoch, a checkpoint after each epoch


def start(config, work_dir, log, *extra, **env):
    return subprocess.Popen([PY, 'tools/train.py', str(config), '--work-dir', str(work_dir), *extra], cwd=ROOT,
                            env=tool_env(**env), stdout=open(log, 'w'), stderr=subprocess.STDOUT)


def wait_for(cond, proc, what, timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f'training ended (rc={proc.returncode}) before {what}')
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f'timed out waiting for {what}')


def kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def weights(path):
    return load_file(path)['state_dict']


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_the_same_weights(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data, epochs=EPOCHS)
    ref, crash = tmp_path / 'ref', tmp_path / 'crash'

    # 1. The uninterrupted run.
    done = run_tool('tools/train.py', config, '--work-dir', ref, env=tool_env())
    assert done.returncode == 0, done.stderr[-3000:]
    final = f'epoch_{EPOCHS}.pth'
    assert (ref / final).is_file()

    # 2. Killed in the middle of writing epoch_2.pth: the temp file is half written.
    proc = start(config, crash, tmp_path / 'run1.log', MLLA_MM_DEBUG_SAVE_PAUSE='epoch_2.pth:60')
    wait_for(lambda: 'half written' in (tmp_path / 'run1.log').read_text(), proc, 'the epoch_2 write')
    kill(proc)
    assert glob.glob(str(crash / '.epoch_2.pth.tmp-*')), 'the half-written temp file should be there'
    assert not (crash / 'epoch_2.pth').exists()
    assert (crash / 'last_checkpoint').read_text().strip().endswith('epoch_1.pth')
    assert weights(crash / 'epoch_1.pth')  # the previous checkpoint is intact
    # A kill while mmengine rewrites the last_checkpoint marker leaves it empty: resume must cope.
    (crash / 'last_checkpoint').write_text('')

    # 3. Resume (auto), killed between iterations in epoch 5.
    proc = start(config, crash, tmp_path / 'run2.log', '--resume')
    wait_for(lambda: 'Epoch(train) [5][1/2]' in (tmp_path / 'run2.log').read_text(), proc, 'epoch 5')
    kill(proc)
    log2 = (tmp_path / 'run2.log').read_text()
    assert 'resuming from' in log2 and 'epoch_1.pth' in log2
    assert not glob.glob(str(crash / '.epoch_2.pth.tmp-*')), 'stale temp files are cleaned up on resume'

    # 4. Resume from an explicit file (the newest one), to the end.
    newest = max(crash.glob('epoch_*.pth'), key=lambda p: int(p.stem.split('_')[1]))
    done = run_tool('tools/train.py', config, '--work-dir', crash, '--resume', newest, env=tool_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert not glob.glob(str(crash / '.*.tmp-*'))

    # Deterministic CPU mode: the same weights as the uninterrupted run, bit for bit.
    a, b = weights(ref / final), weights(crash / final)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:3]}'
    # The resumed checkpoint is a real mmengine resume checkpoint (HistoryBuffer, numpy scalars...)
    ckpt = load_file(crash / final)
    assert {'meta', 'state_dict', 'message_hub', 'optimizer', 'param_schedulers', 'rng_state'} <= set(ckpt)


@pytest.mark.slow
def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_checkpoint(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data, epochs=3,
                               extra="custom_hooks = [dict(type='InjectNaNHook', at_iter=4)]\n")
    work = tmp_path / 'work'
    done = run_tool('tools/train.py', config, '--work-dir', work, env=tool_env())
    assert done.returncode == 1, done.stderr[-3000:]
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith('error: ') and 'iteration 4' in last_line and 'nan' in last_line.lower()
    assert 'epoch_1.pth' in last_line and 'Traceback' not in done.stderr
    assert not (work / 'epoch_2.pth').exists()
    assert (work / 'last_checkpoint').read_text().strip().endswith('epoch_1.pth')
    sd = weights(work / 'epoch_1.pth')
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
