"""Unit tests of the reliability pieces in mlla_mm.engine.hooks (fast, no training)."""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mmengine.config import Config

from mlla_mm.checkpoint import load_file
from mlla_mm.engine import FiniteLossHook, NonFiniteLossError, find_resumable_checkpoint, prepare_config
from mlla_mm.engine.hooks import get_random_state, remove_stale_temp_files, set_random_state


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
    if marker is not None:
        text = {'': '', 'garbage': 'not/a/file', 'missing': str(tmp_path / 'epoch_11.pth')}[marker]
        (tmp_path / 'last_checkpoint').write_text(text)
    assert find_resumable_checkpoint(str(tmp_path)) == str(tmp_path / 'epoch_2.pth')


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


def test_prepare_config_selects_the_safe_runner_once():
    cfg = Config(dict(model=dict(type='X'), custom_hooks=[dict(type='EMAHook')]))
    for _ in range(2):
        prepare_config(cfg, work_dir='w')
    assert cfg.runner_type == 'SafeRunner'
    assert [h['type'] for h in cfg.custom_hooks] == ['EMAHook', 'RandomStateHook', 'FiniteLossHook']
    custom = Config(dict(model=dict(type='X'), runner_type='MyRunner'))
    assert prepare_config(custom, work_dir='w').runner_type == 'MyRunner'
