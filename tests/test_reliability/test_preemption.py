"""SIGTERM in the middle of an epoch and SIGINT during validation: a resumable checkpoint, one log line,
exit 143 / 130, and a resumed run that ends with the weights of an uninterrupted one."""
import glob
import os
import signal

import pytest

from mlla_mm.checkpoint import load_file

from tests.helpers import assert_same_weights, copy_work_dir, finish, reference_run, start, wait_for

EPOCHS = 3  # 2 iterations per epoch; iteration 3 is the first batch of epoch 2


def _no_traceback(log_text):
    assert 'Traceback' not in log_text, log_text[-3000:]


@pytest.fixture(scope='module')
def reference(tmp_path_factory, tiny_data):
    """The config (validation after every epoch) and the work dir of its uninterrupted run, made once for the
    tests that compare their resumed runs' weights with it."""
    config, ref, _ = reference_run(tmp_path_factory.mktemp('preemption'), tiny_data, EPOCHS)
    return config, ref


@pytest.fixture(scope='module')
def sigterm_before_iteration_3(reference, tmp_path_factory):
    """The config run until iteration 3 (epoch 2, batch 1 of 2) is about to run, then SIGTERM: (work dir, exit
    status, log text). Tests continue it in copies of the work dir (:func:`tests.helpers.copy_work_dir`)."""
    config, _ = reference
    folder = tmp_path_factory.mktemp('sigterm')
    work, log = folder / 'work', folder / 'run.log'
    proc = start(config, work, log, MLLA_MM_TEST_PAUSE='train:3')
    wait_for('paused before iteration 3', log, proc)
    os.kill(proc.pid, signal.SIGTERM)
    return work, finish(proc), log.read_text()


@pytest.mark.slow
def test_sigterm_mid_epoch_and_sigint_in_validation_then_resume_exactly(reference, sigterm_before_iteration_3,
                                                                        tmp_path):
    config, ref = reference
    logs = [tmp_path / f'run{i}.log' for i in range(4)]

    # 1. SIGTERM while iteration 3 (epoch 2, batch 1 of 2) is about to run: it completes, then
    #    iter_3.pth is written and the run exits with 128 + 15.
    stopped, rc, log1 = sigterm_before_iteration_3
    assert rc == 143, log1[-3000:]
    _no_traceback(log1)
    lines = [line for line in log1.splitlines() if 'SIGTERM received' in line]
    assert len(lines) == 1, log1[-3000:]
    assert 'after iteration 3 (epoch 2, batch 1 of 2)' in lines[0] and str(stopped / 'iter_3.pth') in lines[0]
    assert (stopped / 'last_checkpoint').read_text().strip() == str(stopped / 'iter_3.pth')
    ckpt = load_file(stopped / 'iter_3.pth')
    assert (ckpt['meta']['epoch'], ckpt['meta']['iter']) == (1, 3) and 'rng_state' in ckpt
    assert not (stopped / 'epoch_2.pth').exists() and not glob.glob(str(stopped / '.*.tmp-*'))
    work = copy_work_dir(stopped, tmp_path / 'work')

    # 2. Resumed: skips the trained batch of epoch 2; SIGINT during the validation after epoch 2
    #    (epoch_2.pth was written just before it): no new checkpoint, exit 128 + 2.
    proc = start(config, work, logs[2], '--resume', MLLA_MM_TEST_PAUSE='val:2')
    wait_for('paused in the validation after epoch 2', logs[2], proc)
    epoch2 = (work / 'epoch_2.pth').stat().st_mtime_ns
    os.kill(proc.pid, signal.SIGINT)
    assert finish(proc) == 130
    log2 = logs[2].read_text()
    _no_traceback(log2)
    assert 'skipped its first 1 batches' in log2
    lines = [line for line in log2.splitlines() if 'SIGINT received' in line]
    assert len(lines) == 1 and 'during the validation after iteration 4 (end of epoch 2)' in lines[0], log2[-3000:]
    assert str(work / 'epoch_2.pth') in lines[0]
    assert (work / 'epoch_2.pth').stat().st_mtime_ns == epoch2, 'the checkpoint of that position is not rewritten'

    # 3. Resumed: the interrupted validation runs again, then training to the end.
    proc = start(config, work, logs[3], '--resume')
    assert finish(proc) == 0, logs[3].read_text()[-3000:]
    log3 = logs[3].read_text()
    assert 'validation after epoch 2 did not complete' in log3
    assert_same_weights(ref / f'epoch_{EPOCHS}.pth', work / f'epoch_{EPOCHS}.pth')


@pytest.mark.slow
def test_mid_epoch_checkpoint_resumed_with_another_batch_size_restarts_the_epoch(reference, sigterm_before_iteration_3,
                                                                                 tmp_path):
    """A preemption checkpoint from batch 1 of 2 resumed with batch size 1 (4 batches per epoch): the position
    cannot be mapped, so the run says so in one warning and trains that epoch from its first batch."""
    config, _ = reference
    stopped, rc, log0 = sigterm_before_iteration_3
    assert rc == 143, log0[-3000:]
    work = copy_work_dir(stopped, tmp_path / 'work')
    logs = [tmp_path / f'run{i}.log' for i in range(2)]
    proc = start(config, work, logs[1], '--resume', '--cfg-options', 'train_dataloader.batch_size=1')
    assert finish(proc) == 0, logs[1].read_text()[-3000:]
    log = logs[1].read_text()
    _no_traceback(log)
    warnings = [line for line in log.splitlines() if 'does not fit' in line]
    assert len(warnings) == 1 and 'written after batch 1 of epoch 2' in warnings[0], log[-3000:]
    assert 'its iteration count (3) does not fit 4 batches per epoch' in warnings[0]
    assert 'skipped its first' not in log
    assert 'Epoch(train) [2][4/4]' in log and 'Epoch(train) [3][4/4]' in log  # epoch 2 ran whole, then 3
    ckpt = load_file(work / f'epoch_{EPOCHS}.pth')
    assert (ckpt['meta']['epoch'], ckpt['meta']['iter']) == (EPOCHS, 3 + 4 + 4)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['SIGINT', 'SIGTERM'])
def test_second_signal_while_the_checkpoint_is_written_stops_at_once_and_loses_nothing(reference, tmp_path, name):
    """The first signal asks for a checkpoint after iteration 3; a second one while it is half written stops the
    run at once. Ctrl-C twice: the half-written file is discarded, one line says where --resume continues,
    exit 130. SIGTERM twice: the process ends by the signal; the next start removes the temporary file.
    Either way the marker still names epoch_1.pth and the resumed run ends with the uninterrupted run's weights."""
    sig = getattr(signal, name)
    config, ref = reference
    work = tmp_path / 'work'
    logs = [tmp_path / f'run{i}.log' for i in range(3)]

    proc = start(config, work, logs[1], MLLA_MM_TEST_PAUSE='train:3', MLLA_MM_TEST_SAVE_PAUSE='iter_3.pth:120')
    wait_for('paused before iteration 3', logs[1], proc)
    os.kill(proc.pid, sig)
    wait_for('half written; pausing', logs[1], proc)
    os.kill(proc.pid, sig)
    rc = finish(proc, timeout=60)  # not the 120 s of the paused write
    log1 = logs[1].read_text()
    temporaries = glob.glob(str(work / '.iter_3.pth.tmp-*'))
    if name == 'SIGINT':
        assert rc == 130, log1[-3000:]
        _no_traceback(log1)
        assert log1.strip().splitlines()[-1] == (
            f'error: SIGINT received again: stopped at once, without the checkpoint of the first one; '
            f'--resume continues from {work / "epoch_1.pth"}.')
        assert temporaries == []
    else:
        assert rc == -signal.SIGTERM, log1[-3000:]
        assert len(temporaries) == 1  # killed mid-write: the next start removes it
    assert not (work / 'iter_3.pth').exists()
    assert (work / 'last_checkpoint').read_text().strip() == str(work / 'epoch_1.pth')

    proc = start(config, work, logs[2], '--resume')
    assert finish(proc) == 0, logs[2].read_text()[-3000:]
    assert not glob.glob(str(work / '.*.tmp-*'))
    assert_same_weights(ref / f'epoch_{EPOCHS}.pth', work / f'epoch_{EPOCHS}.pth')
