"""Issue 26, round 3: training runs never lose checkpoints (items 3, 4, 7 and 16).

Auto-resume finds checkpoints where the config writes them and never starts over silently; one run per
work dir; a full disk is one line; a resume with another learning rate or schedule says so.
"""
import errno
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mlla_mm.checkpoint import load_file
from mlla_mm.errors import UsageError
from mlla_mm.engine.work_dir import LOCK_NAME, WorkDirLock, find_resumable_checkpoint, remove_stale_temp_files

from tests.helpers import assert_one_error_line, exit_code, load_tool, run_tool, write_tiny_config

ONE_ITER = ['train_dataloader.batch_size=4']  # the 4 tiny images in one iteration per epoch
OUT_DIR_HOOKS = '''
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=3, out_dir={out!r}))
'''


def _ckpt(path, step):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'meta': {'epoch': step}, 'state_dict': {'w': torch.full((2, ), float(step))}}, path)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------
# Item 3: checkpoints in default_hooks.checkpoint.out_dir, an empty or unreadable last_checkpoint.
# --------------------------------------------------------------------------
@pytest.mark.parametrize('marker', [b'', b'\xff\xfe\x00garbage', None])
def test_auto_resume_looks_in_the_checkpoint_out_dir(tmp_path, marker):
    work, out = tmp_path / 'work', tmp_path / 'ckpts' / 'work'
    work.mkdir()
    for step in (1, 2):
        _ckpt(out / f'epoch_{step}.pth', step)
    if marker is not None:
        (work / 'last_checkpoint').write_bytes(marker)
    assert find_resumable_checkpoint(str(work)) is None  # the work dir alone has none
    assert find_resumable_checkpoint(str(work), folders=[str(out)]) == str(out / 'epoch_2.pth')


@pytest.fixture(scope='module')
def trained_with_out_dir(tmp_path_factory, tiny_data):
    """One epoch of the tiny config with ``default_hooks.checkpoint.out_dir`` (checkpoints in out_dir/work)."""
    tmp = tmp_path_factory.mktemp('round3_out_dir')
    cfg = write_tiny_config(tmp, tiny_data, epochs=1, extra=OUT_DIR_HOOKS.format(out=str(tmp / 'ckpts')))
    res = run_tool('tools/train.py', cfg, '--work-dir', tmp / 'work', '--cfg-options', *ONE_ITER)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp / 'ckpts' / 'work' / 'epoch_1.pth').is_file() and not (tmp / 'work' / 'epoch_1.pth').exists()
    return tmp, cfg


def _copy_run(trained, tmp_path):
    src, cfg = trained
    shutil.copytree(src / 'work', tmp_path / 'work')
    shutil.copytree(src / 'ckpts', tmp_path / 'ckpts')
    text = cfg.read_text().replace(str(src / 'ckpts'), str(tmp_path / 'ckpts'))
    (tmp_path / 'tiny_det.py').write_text(text)
    return tmp_path / 'tiny_det.py', tmp_path / 'work', tmp_path / 'ckpts' / 'work'


@pytest.mark.slow  # two training processes
def test_resume_with_checkpoints_in_out_dir_and_an_empty_marker_continues(trained_with_out_dir, tmp_path):
    cfg, work, out = _copy_run(trained_with_out_dir, tmp_path)
    (work / 'last_checkpoint').write_text('')  # what a full disk left
    first = (out / 'epoch_1.pth').read_bytes()
    res = run_tool('tools/train.py', cfg, '--work-dir', work, '--resume', '--cfg-options', *ONE_ITER,
                   'train_cfg.max_epochs=2')
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert 'starting from scratch' not in log
    assert f'resuming from {out / "epoch_1.pth"} instead' in log  # the empty marker was said, and passed over
    assert (out / 'epoch_1.pth').read_bytes() == first  # not overwritten by a run that started over
    assert load_file(out / 'epoch_2.pth')['meta']['epoch'] == 2
    assert (work / 'last_checkpoint').read_text() == str(out / 'epoch_2.pth')


def test_unreadable_checkpoints_stop_the_resume_instead_of_starting_over(tmp_path, capsys, tiny_data):
    cfg = write_tiny_config(tmp_path, tiny_data, epochs=1)
    work = tmp_path / 'work'
    work.mkdir()
    (work / 'epoch_1.pth').write_bytes(b'PK\x03\x04 half a checkpoint')
    code = exit_code(load_tool('train').main, [cfg, '--work-dir', work, '--resume', '--cfg-options', *ONE_ITER])
    assert_one_error_line(capsys, '--resume', work / 'epoch_1.pth', 'can be read')
    assert code == 2 and (work / 'epoch_1.pth').read_bytes() == b'PK\x03\x04 half a checkpoint'


def test_a_marker_naming_a_lost_checkpoint_stops_the_resume(tmp_path, capsys, tiny_data):
    cfg = write_tiny_config(tmp_path, tiny_data, epochs=1)
    work = tmp_path / 'work'
    work.mkdir()
    (work / 'last_checkpoint').write_text(str(work / 'epoch_9.pth'))  # names a checkpoint that is gone
    code = exit_code(load_tool('train').main, [cfg, '--work-dir', work, '--resume', '--cfg-options', *ONE_ITER])
    assert_one_error_line(capsys, work / 'last_checkpoint', 'epoch_9.pth')
    assert code == 2 and not list(work.glob('*.pth'))


# --------------------------------------------------------------------------
# Item 4: one run per work dir; a live run's temporary files are never removed.
# --------------------------------------------------------------------------
#: What a running training does to its work dir (WorkDirLock's protocol: flock held, pid and host inside), in a
#: process that starts in a moment (no torch import).
HOLD_LOCK = '''
import fcntl, json, os, socket, sys, time
fd = os.open(os.path.join(sys.argv[1], sys.argv[2]), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps(dict(pid=os.getpid(), host=socket.gethostname())).encode())
print('locked', flush=True)
time.sleep(120)
'''


@pytest.fixture
def lock_holder(tmp_path):
    """Another process holding the lock of tmp_path/work, as a running training would."""
    work = tmp_path / 'work'
    work.mkdir()
    proc = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(work), LOCK_NAME], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'locked'
        yield work, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_temporary_file_of_a_live_writer_is_never_removed(tmp_path):
    live = tmp_path / f'.epoch_2.pth.tmp-{os.getpid()}'
    dead = tmp_path / f'.epoch_3.pth.tmp-{_dead_pid()}'
    for f in (live, dead):
        f.write_bytes(b'half')
    remove_stale_temp_files(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == [live.name]


def test_the_lock_refuses_a_second_run_and_takes_over_a_dead_ones(lock_holder):
    work, proc = lock_holder
    with pytest.raises(UsageError, match=f'in use by another training run \\(pid {proc.pid} on host'):
        WorkDirLock(str(work)).acquire()
    proc.kill()
    proc.wait()

    class Log:
        def __init__(self):
            self.lines = []

        def warning(self, msg):
            self.lines.append(msg)

    lock, log = WorkDirLock(str(work)), Log()
    lock.acquire(log)  # the dead run's lock is taken over, with a warning naming it
    assert len(log.lines) == 1 and f'pid {proc.pid}' in log.lines[0] and 'no longer running' in log.lines[0]
    assert f'"pid": {os.getpid()}' in (work / LOCK_NAME).read_text()
    lock.release()
    assert not (work / LOCK_NAME).exists()


def test_a_lock_file_nobody_holds_is_taken_over(tmp_path):
    """A lock file left by a run that died (here or, on a shared file system, on another host) is stale."""
    import json
    import socket
    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(pid=_dead_pid(), host=socket.gethostname())))
    lock = WorkDirLock(str(tmp_path))
    lock.acquire()
    lock.release()
    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(pid=os.getpid() + 1, host='another-host')))
    lock = WorkDirLock(str(tmp_path))
    lock.acquire()  # flock says nobody holds it: the lock file of a run that ended is taken over
    lock.release()


def test_a_second_training_run_in_the_same_work_dir_is_refused(lock_holder, capsys, tiny_data):
    work, proc = lock_holder
    temp = work / f'.epoch_2.pth.tmp-{proc.pid}'  # the first run is writing its checkpoint
    temp.write_bytes(b'in progress')
    cfg = write_tiny_config(work.parent, tiny_data, epochs=1)
    code = exit_code(load_tool('train').main, [cfg, '--work-dir', work, '--resume', '--cfg-options', *ONE_ITER])
    assert_one_error_line(capsys, f'work dir {work} is in use by another training run', f'pid {proc.pid}')
    assert code == 2 and temp.read_bytes() == b'in progress'
    assert proc.poll() is None


# --------------------------------------------------------------------------
# Item 16: a full disk at the start or for last_checkpoint is one line; last_checkpoint written atomically.
# --------------------------------------------------------------------------
def test_full_disk_at_the_start_is_one_line(tmp_path, capsys, tiny_data, monkeypatch):
    from mmengine.model import BaseModule

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(BaseModule, '_dump_init_info', full)  # mmengine writes the init info to the log file
    cfg = write_tiny_config(tmp_path, tiny_data, epochs=1)
    code = exit_code(load_tool('train').main, [cfg, '--work-dir', tmp_path / 'w', '--cfg-options', *ONE_ITER])
    assert_one_error_line(capsys, f'work dir {tmp_path / "w"}', 'no space left')
    assert code == 2
    assert not (tmp_path / 'w' / LOCK_NAME).exists()  # the lock was released


def test_last_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    """The marker write mmengine's CheckpointHook does (a plain ``open(..., 'w')``) goes through the atomic writer."""
    from mlla_mm.engine.work_dir import with_atomic_marker
    from mlla_mm.utils.io import AtomicWriteError

    from tests.helpers import fill_disk_on_rename
    marker = tmp_path / 'last_checkpoint'

    def save_like_mmengine(text):
        with open(marker, 'w') as f:  # this module's open: what the wrapper redirects while it runs
            f.write(text)

    atomic = with_atomic_marker(save_like_mmengine)
    atomic('epoch_1.pth')
    assert marker.read_text() == 'epoch_1.pth'
    fill_disk_on_rename(monkeypatch, 'last_checkpoint')
    with pytest.raises(AtomicWriteError, match='last_checkpoint'):
        atomic('epoch_2.pth')
    assert marker.read_text() == 'epoch_1.pth' and sorted(p.name for p in tmp_path.iterdir()) == ['last_checkpoint']
    assert 'open' not in globals()  # the redirection ends with the call


@pytest.mark.slow  # trains an epoch in the test process
def test_full_disk_while_last_checkpoint_is_written_keeps_the_old_marker(tmp_path, capsys, tiny_data, monkeypatch):
    from tests.helpers import fill_disk_on_rename
    cfg = write_tiny_config(tmp_path, tiny_data, epochs=1)
    work = tmp_path / 'w'
    work.mkdir()
    (work / 'last_checkpoint').write_text('the previous marker')
    fill_disk_on_rename(monkeypatch, 'last_checkpoint')
    code = exit_code(load_tool('train').main, [cfg, '--work-dir', work, '--cfg-options', *ONE_ITER])
    assert_one_error_line(capsys, f'cannot write {work / "last_checkpoint"}', 'No space left on device')
    assert code == 2
    assert (work / 'last_checkpoint').read_text() == 'the previous marker'  # plain open() had emptied it
    assert not list(work.glob('.last_checkpoint*'))
    assert load_file(work / 'epoch_1.pth')['meta']['epoch'] == 1


# --------------------------------------------------------------------------
# Item 7: --resume with another learning rate or schedule in the config.
# --------------------------------------------------------------------------
@pytest.mark.slow  # a training process
def test_resume_with_a_changed_learning_rate_and_schedule_warns(trained_with_out_dir, tmp_path):
    cfg, work, out = _copy_run(trained_with_out_dir, tmp_path)
    saved = load_file(out / 'epoch_1.pth')
    old_lr = saved['optimizer']['param_groups'][0]['initial_lr']
    old_end = saved['param_schedulers'][0]['end']
    res = run_tool('tools/train.py', cfg, '--work-dir', work, '--resume', '--cfg-options', *ONE_ITER,
                   'train_cfg.max_epochs=2', f'optim_wrapper.optimizer.lr={old_lr * 3}',
                   f'param_scheduler.0.end={old_end + 5}')
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    resume_lines = [ln for ln in log.splitlines() if 'WARNING' in ln and '--resume from' in ln]
    lr_lines = [ln for ln in resume_lines if 'learning rate' in ln]
    assert len(lr_lines) == 1, log[-3000:]
    assert f'{old_lr * 3:g}' in lr_lines[0] and f'{old_lr:g}' in lr_lines[0]
    sched_lines = [ln for ln in resume_lines if 'param_scheduler[0]' in ln]
    assert len(sched_lines) == 1, sched_lines
    assert f'end={old_end + 5}' in sched_lines[0] and f'is {old_end}' in sched_lines[0]
    assert len(resume_lines) == 2, resume_lines  # nothing else differs


def test_resume_with_the_same_settings_does_not_warn():
    from mlla_mm.engine.runner import resume_setting_changes
    same = [{'end': 4, 'start_factor': 0.1}]
    assert resume_setting_changes([0.01, 0.001], [0.01, 0.001], same, same, ['LinearLR']) == []
    lines = resume_setting_changes([0.02, 0.002], [0.01, 0.001], same, [{'end': 8, 'start_factor': 0.1}],
                                   ['LinearLR'])
    assert len(lines) == 2 and '0.02' in lines[0] and '0.01' in lines[0] and '2 of 2 groups' in lines[0]
    assert lines[1] == "the config's param_scheduler[0] (LinearLR) end=4 but the checkpoint's is 8"
