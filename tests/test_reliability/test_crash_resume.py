"""Kill training at several points (during a checkpoint write, during validation, between iterations),
resume, and compare with an uninterrupted run that validates after every epoch."""
import glob
import json

import pytest
import torch

from mlla_mm.checkpoint import load_file

from tests.helpers import (assert_same_weights, finish, kill, reference_run, run_tool, start, tool_env, val_metrics,
                           wait_for, weights, write_tiny_config)

EPOCHS = 6  # 2 iterations per epoch, a checkpoint and a validation after each epoch


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_the_same_weights_and_validations(tmp_path, tiny_data):
    # 0. The uninterrupted run.
    config, ref, ref_log = reference_run(tmp_path, tiny_data, EPOCHS)
    crash = tmp_path / 'crash'
    logs = [tmp_path / f'run{i}.log' for i in range(6)]
    final = f'epoch_{EPOCHS}.pth'
    assert all(f'Epoch(val) [{e}]' in ref_log for e in range(1, EPOCHS + 1))

    # 1. Killed in the middle of writing epoch_2.pth: the temp file is half written.
    proc = start(config, crash, logs[1], MLLA_MM_TEST_SAVE_PAUSE='epoch_2.pth:60')
    wait_for('half written', logs[1], proc)
    kill(proc)
    assert glob.glob(str(crash / '.epoch_2.pth.tmp-*')), 'the half-written temp file should be there'
    assert not (crash / 'epoch_2.pth').exists()
    assert (crash / 'last_checkpoint').read_text().strip().endswith('epoch_1.pth')
    assert weights(crash / 'epoch_1.pth')  # the previous checkpoint is intact
    # A kill while mmengine rewrites the last_checkpoint marker leaves it empty: resume must cope.
    (crash / 'last_checkpoint').write_text('')

    # 2. Auto-resume (from epoch_1: its validation had completed, so it is not repeated);
    #    killed inside the validation after epoch 3.
    proc = start(config, crash, logs[2], '--resume', MLLA_MM_TEST_PAUSE='val:3')
    wait_for('paused in the validation after epoch 3', logs[2], proc)
    kill(proc)
    log2 = logs[2].read_text()
    assert 'resuming from' in log2 and 'epoch_1.pth' in log2
    assert 'did not complete' not in log2 and 'Epoch(val) [1]' not in log2
    assert not glob.glob(str(crash / '.epoch_2.pth.tmp-*')), 'stale temp files are cleaned up on resume'
    assert json.loads((crash / 'last_validation.json').read_text())['epoch'] == 2

    # 3. Auto-resume from epoch_3.pth: validation 3 runs first, then training; killed in epoch 5.
    proc = start(config, crash, logs[3], '--resume')
    wait_for('Epoch(train) [5][1/2]', logs[3], proc)
    kill(proc)
    log3 = logs[3].read_text()
    assert 'validation after epoch 3 did not complete' in log3
    assert log3.index('Epoch(val) [3]') < log3.index('Epoch(train) [4]')
    assert val_metrics(log3, 3) == val_metrics(ref_log, 3)

    # 4. Resume from an explicit file (the newest one); killed inside the final validation.
    newest = max(crash.glob('epoch_*.pth'), key=lambda p: int(p.stem.split('_')[1]))
    assert newest.name == 'epoch_4.pth'
    proc = start(config, crash, logs[4], '--resume', newest, MLLA_MM_TEST_PAUSE=f'val:{EPOCHS}')
    wait_for(f'paused in the validation after epoch {EPOCHS}', logs[4], proc)
    kill(proc)
    assert (crash / final).is_file()

    # 5. Auto-resume after the last epoch: only the missed final validation runs; exit 0 with its metrics.
    proc = start(config, crash, logs[5], '--resume')
    assert finish(proc) == 0, logs[5].read_text()[-3000:]
    log5 = logs[5].read_text()
    assert f'validation after epoch {EPOCHS} did not complete' in log5 and 'Epoch(train)' not in log5
    assert val_metrics(log5, EPOCHS) == val_metrics(ref_log, EPOCHS)
    assert not glob.glob(str(crash / '.*.tmp-*'))

    # Deterministic CPU mode: the same weights as the uninterrupted run, bit for bit.
    assert_same_weights(ref / final, crash / final)
    # The resumed checkpoint is a real mmengine resume checkpoint (HistoryBuffer, numpy scalars...)
    ckpt = load_file(crash / final)
    assert {'meta', 'state_dict', 'message_hub', 'optimizer', 'param_schedulers', 'rng_state'} <= set(ckpt)


@pytest.mark.slow
def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_checkpoint(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data, epochs=3, extra=(
        "custom_imports = dict(imports=['mlla_mm', 'tests.test_reliability.support'], allow_failed_imports=False)\n"
        "custom_hooks = [dict(type='InjectNaNHook', at_iter=4)]\n"))
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
