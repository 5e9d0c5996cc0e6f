"""Unit tests of the reliability pieces in mlla_mm.engine.hooks (fast, no training)."""
import os
import random
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mmengine.runner import EpochBasedTrainLoop

from mlla_mm.checkpoint import load_file
from mlla_mm.engine import (FiniteLossHook, NonFiniteLossError, PreemptionHook, RandomStateHook,
                            find_resumable_checkpoint)
from mlla_mm.engine.hooks import get_random_state, set_random_state
from mlla_mm.engine.work_dir import remove_stale_temp_files


def _ckpt(path, step):
    torch.save({'meta': {'epoch': step}, 'state_dict': {'w': torch.full((2, ), float(step))}}, path)


def test_resume_uses_the_marker_when_it_is_good(tmp_path):
    for s in (1, 2):
        _ckpt(tmp_path / f'epoch_{s}.pth', s)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_1.pth'))
    assert find_resumable_checkpoint(str(tmp_path)) == str(tmp_path / 'epoch_1.pth')


@pytest.mark.parametrize('marker', ['', 'garbage', 'missing', None])
def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, marker):
    for s in (1, 2, 10):
        _ckpt(tmp_path / f'epoch_{s}.pth', s)
    data = (tmp_path / 'epoch_10.pth').read_bytes()
    (tmp_path / 'epoch_10.pth').write_bytes(data[:len(data) // 2])  # as a non-atomic writer would leave it
    text = None
    if marker is not None:
        text = {'': '', 'garbage': 'not/a/file', 'missing': str(tmp_path / 'epoch_11.pth')}[marker]
        (tmp_path / 'last_checkpoint').write_text(text)
    assert find_resumable_checkpoint(str(tmp_path)) == str(tmp_path / 'epoch_2.pth')

    class Log:
        def __init__(self):
            self.lines = []

        def warning(self, msg):
            self.lines.append(msg)

    log = Log()
    assert find_resumable_checkpoint(str(tmp_path), log) == str(tmp_path / 'epoch_2.pth')
    if marker is None:  # no marker: nothing to warn about
        assert log.lines == []
    else:  # the marker named something unusable: said once, with both names
        assert log.lines == [f"{tmp_path / 'last_checkpoint'} names {text!r}, which is missing or unreadable; "
                             f"resuming from {tmp_path / 'epoch_2.pth'} instead."]


def test_nothing_to_resume(tmp_path):
    assert find_resumable_checkpoint(str(tmp_path)) is None
    assert find_resumable_checkpoint(str(tmp_path / 'absent')) is None


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / '.epoch_3.pth.tmp-123').write_bytes(b'half')
    (tmp_path / 'epoch_2.pth').write_bytes(b'keep')
    remove_stale_temp_files(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ['epoch_2.pth']


def test_random_state_survives_a_safe_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save({'rng_state': get_random_state(seed=7)}, tmp_path / 'c.pth')
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    state = load_file(tmp_path / 'c.pth')['rng_state']  # the allow-listed loader reads it
    assert state['seed'] == 7
    set_random_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def _runner(last_ckpt=None):
    hub = SimpleNamespace(get_info=lambda key: last_ckpt)
    return SimpleNamespace(iter=41, epoch=2, message_hub=hub, logger=SimpleNamespace(error=lambda m: None))


def test_finite_loss_passes():
    FiniteLossHook().after_train_iter(_runner(), 3, outputs={'loss': torch.tensor(1.0), 'acc': float('nan')})


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_non_finite_loss_names_the_iteration(bad):
    outputs = {'loss': torch.tensor(bad), 'loss_cls': torch.tensor(bad), 'loss_bbox': torch.tensor(0.5)}
    with pytest.raises(NonFiniteLossError) as err:
        FiniteLossHook().after_train_iter(_runner('work/epoch_2.pth'), 5, outputs=outputs)
    msg = str(err.value)
    assert 'iteration 42' in msg and 'epoch 3' in msg and 'loss_cls' in msg and 'loss_bbox' not in msg
    assert 'work/epoch_2.pth' in msg


def test_non_finite_weights_are_not_saved():
    ckpt = {'state_dict': {'a': torch.ones(2), 'b': torch.tensor([1.0, float('nan')]), 'n': torch.tensor(3)}}
    with pytest.raises(NonFiniteLossError, match='weight b'):
        FiniteLossHook().before_save_checkpoint(_runner(), ckpt)


def _training_runner(**kw):
    """A stand-in runner in the middle of training (its train loop is built)."""
    loop = object.__new__(EpochBasedTrainLoop)
    logs = []
    return SimpleNamespace(_train_loop=loop, seed=5, logger=SimpleNamespace(warning=logs.append, info=logs.append),
                           logs=logs, **kw)


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_validation_leaves_the_random_state_unchanged():
    hook, runner = RandomStateHook(), _training_runner()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = _draws()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    hook.before_val(runner)
    _draws(), _draws()  # what validation draws (dataloader seeds, ...)
    ckpt = {}
    hook.before_save_checkpoint(runner, ckpt)  # e.g. a best checkpoint written during validation
    hook.after_val(runner)
    assert _draws() == expected
    set_random_state(ckpt['rng_state'])  # the checkpoint holds the state training continues with
    assert _draws() == expected and ckpt['rng_state']['seed'] == 5


def test_validation_outside_training_is_left_alone():
    hook = RandomStateHook()
    runner = SimpleNamespace(_train_loop=None, seed=1)
    hook.before_val(runner)
    torch.rand(1)
    state = torch.get_rng_state()
    hook.after_val(runner)
    assert torch.equal(torch.get_rng_state(), state)


def test_preemption_hook_turns_the_first_signal_into_a_request():
    hook, runner = PreemptionHook(), _training_runner()
    before = signal.getsignal(signal.SIGTERM)
    hook.before_run(runner)
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # would end the test process without the hook
        assert hook.received == signal.SIGTERM
        assert hook._requested() == signal.SIGTERM
    finally:
        hook.after_run(runner)
    assert signal.getsignal(signal.SIGTERM) is before


def test_preemption_hook_does_nothing_outside_training():
    hook = PreemptionHook()
    before = signal.getsignal(signal.SIGINT)
    hook.before_run(SimpleNamespace(_train_loop=dict(type='EpochBasedTrainLoop')))  # test() / val()
    assert signal.getsignal(signal.SIGINT) is before
    hook.after_val_iter(SimpleNamespace(_train_loop=None), 0)  # no request, no stop


def test_preemption_hook_rejects_unknown_signals():
    with pytest.raises(ValueError, match='SIGTERMM'):
        PreemptionHook(signals=['SIGTERMM'])


def test_run_main_turns_ctrl_c_into_one_line_and_exit_130(capsys):
    from mlla_mm.engine.hooks import TrainingAborted, TrainingInterrupted
    from mlla_mm.cli import run_main

    def raising(exc):
        def main():
            raise exc
        return main

    assert run_main(raising(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == 'error: interrupted (Ctrl-C)\n'
    aborted = TrainingAborted('SIGINT received again: stopped at once, ...; --resume continues from x.pth.', 130)
    assert run_main(raising(aborted)) == 130
    assert capsys.readouterr().err == f'error: {aborted}\n'
    assert run_main(raising(TrainingInterrupted(143))) == 143  # the hook has logged its line: nothing more
    assert capsys.readouterr().err == ''
    assert run_main(lambda: 0) == 0
