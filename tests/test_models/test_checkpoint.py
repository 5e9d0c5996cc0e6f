"""Loading published and toolkit checkpoints into MLLA, safely."""
import os
import pickle
from collections import OrderedDict

import pytest
import torch
from mmengine.logging.history_buffer import HistoryBuffer

from mlla_mm.checkpoint import (CheckpointError, check_checkpoint_fits, compare_state_dicts, convert_checkpoint,
                                 load_backbone_weights, load_file, save_atomic)
from mlla_mm.models import MLLA
from mlla_mm.utils.io import AtomicWriteError

from tests.test_reliability.evil_pickles import CfgNode, YacsPickle


class Evil:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def golden_model(golden_arch, path=None, **cfg):
    init_cfg = dict(type='Pretrained', checkpoint=str(path), **cfg) if path else None
    return MLLA(golden_arch, init_cfg=init_cfg)


def outputs(model, golden):
    case = next(iter(golden['cases'].values()))
    model.eval()
    with torch.no_grad():
        return model(case['x']), case['ys']


def assert_golden(model, golden, norms=True):
    if not norms:
        model.load_state_dict(golden['norms'], strict=False)
    ys, ref = outputs(model, golden)
    for y, r in zip(ys, ref):
        torch.testing.assert_close(y, r, atol=1e-4, rtol=0)


@pytest.fixture(scope='module')
def det_sd(golden_dir):
    ckpt = torch.load(golden_dir / 'mlla_small_official_det.pth', weights_only=True)
    return {k[len('backbone.'):]: v for k, v in ckpt['state_dict'].items()}


@pytest.fixture(scope='module')
def cls_ckpt(golden_dir):
    return torch.load(golden_dir / 'mlla_small_official_cls.pth', weights_only=True)


def test_plain_state_dict(tmp_path, det_sd, golden_arch, golden):
    torch.save(det_sd, tmp_path / 'plain.pth')
    model = golden_model(golden_arch, tmp_path / 'plain.pth')
    model.init_weights()
    assert_golden(model, golden)


def test_mmengine_checkpoint_with_history_buffer(tmp_path, det_sd, golden_arch, golden):
    hb = HistoryBuffer()
    hb.update(1.5)
    ckpt = {'meta': {'epoch': 3, 'iter': 30}, 'message_hub': {'log_scalars': {'loss': hb}},
            'state_dict': {'backbone.' + k: v for k, v in det_sd.items()} | {'neck.w': torch.ones(2)},
            'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1, 'betas': (0.9, 0.999)}]}}
    torch.save(ckpt, tmp_path / 'epoch_3.pth')
    with pytest.raises(pickle.UnpicklingError):  # what torch >= 2.6 does on its own
        torch.load(tmp_path / 'epoch_3.pth', weights_only=True)
    loaded = load_file(tmp_path / 'epoch_3.pth')
    buf = loaded['message_hub']['log_scalars']['loss']
    assert isinstance(buf, HistoryBuffer) and buf.current() == 1.5 and buf.statistics('mean') == 1.5
    model = golden_model(golden_arch, tmp_path / 'epoch_3.pth')
    model.init_weights()
    assert_golden(model, golden)


def test_published_training_checkpoint_with_foreign_config(tmp_path, cls_ckpt, golden_arch, golden):
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in cls_ckpt['model'].items()}
    cfg = CfgNode(MODEL=CfgNode(TYPE='mlla'), TRAIN={'EPOCHS': 300})
    ckpt = {'model': cls_ckpt['model'], 'state_dict_ema': ema, 'config': cfg, 'epoch': 299,
            'max_accuracy': 83.5, 'max_accuracy_e': 290, 'optimizer': {'state': {}, 'param_groups': []},
            'lr_scheduler': {'last_epoch': 299}}
    torch.save(ckpt, tmp_path / 'ckpt_epoch_299.pth', pickle_module=YacsPickle)  # names yacs.config.CfgNode
    assert b'yacs.config\nCfgNode' in (tmp_path / 'ckpt_epoch_299.pth').read_bytes()
    loaded = load_file(tmp_path / 'ckpt_epoch_299.pth')
    # The config came back as a plain OrderedDict (yacs is never imported).
    assert type(loaded['config']) is OrderedDict and type(loaded['config']['MODEL']) is OrderedDict
    assert loaded['config']['MODEL']['TYPE'] == 'mlla'
    model = golden_model(golden_arch, tmp_path / 'ckpt_epoch_299.pth')
    model.init_weights()
    assert_golden(model, golden, norms=False)
    ema_model = golden_model(golden_arch, tmp_path / 'ckpt_epoch_299.pth', use_ema=True)
    ema_model.init_weights()
    key = 'layers.0.blocks.0.in_proj.weight'
    torch.testing.assert_close(ema_model.state_dict()[key], ema[key])


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, det_sd):
    marker = tmp_path / 'marker'
    torch.save({'state_dict': det_sd, 'payload': Evil(marker)}, tmp_path / 'evil.pth')
    with pytest.raises(CheckpointError) as err:
        load_file(tmp_path / 'evil.pth')
    assert 'evil.pth' in str(err.value) and 'trusted=True' in str(err.value)
    assert 'MLLA_MM_TRUST_CHECKPOINTS' in str(err.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        MLLA('tiny', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'evil.pth'))).init_weights()
    assert not marker.exists()
    # Opting in for a trusted file runs it (which is why it is opt-in).
    load_file(tmp_path / 'evil.pth', trusted=True)
    assert marker.exists()


@pytest.mark.parametrize('damage', ['truncated', 'empty', 'garbage'])
def test_damaged_file_is_named(tmp_path, det_sd, golden_arch, damage):
    path = tmp_path / f'{damage}.pth'
    torch.save(det_sd, path)
    data = path.read_bytes()
    path.write_bytes({'truncated': data[:len(data) // 2], 'empty': b'', 'garbage': b'not a checkpoint' * 9}[damage])
    with pytest.raises(CheckpointError, match=f'{damage}.pth'):
        load_file(path)
    with pytest.raises(CheckpointError, match=f'{damage}.pth'):
        golden_model(golden_arch, path).init_weights()


def test_missing_file_is_named(tmp_path, golden_arch):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        golden_model(golden_arch, tmp_path / 'nope.pth').init_weights()


def test_if_missing_warn_keeps_random_init(tmp_path, golden_arch, monkeypatch):
    import mlla_mm.models.backbone as backbone_module
    msgs = []
    monkeypatch.setattr(backbone_module, 'print_log', lambda msg, **kw: msgs.append((msg, kw.get('level'))))
    model = golden_model(golden_arch, tmp_path / 'MLLA_T.pth', if_missing='warn')
    before = model.state_dict()['layers.0.blocks.0.in_proj.weight'].clone()
    model.init_weights()
    assert torch.equal(before, model.state_dict()['layers.0.blocks.0.in_proj.weight'])
    assert len(msgs) == 1 and 'RANDOMLY' in msgs[0][0] and 'MLLA_T.pth' in msgs[0][0]
    assert msgs[0][1] == 30  # logging.WARNING


def test_wrong_size_is_an_error(tmp_path, golden_dir):
    path = golden_dir / 'mlla_small_official_det.pth'
    with pytest.raises(CheckpointError, match='wrong shape') as err:
        MLLA('tiny', init_cfg=dict(type='Pretrained', checkpoint=str(path))).init_weights()
    assert str(path) in str(err.value)


def test_other_model_is_an_error(tmp_path):
    import torchvision
    torch.save({'state_dict': torchvision.models.resnet18().state_dict()}, tmp_path / 'r18.pth')
    with pytest.raises(CheckpointError, match='missing') as err:
        MLLA('tiny', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'r18.pth'))).init_weights()
    assert 'r18.pth' in str(err.value)


def test_non_strict_loads_what_fits(tmp_path, det_sd, golden_arch):
    partial = {k: v for k, v in det_sd.items() if not k.startswith('layers.3')}
    partial['extra.weight'] = torch.ones(1)
    torch.save(partial, tmp_path / 'partial.pth')
    with pytest.raises(CheckpointError, match='missing'):
        golden_model(golden_arch, tmp_path / 'partial.pth').init_weights()
    model = MLLA(golden_arch)
    msgs = []
    report = load_backbone_weights(model, tmp_path / 'partial.pth', strict=False, log=msgs.append)
    assert any(k.startswith('layers.3') for k in report['missing'])
    assert [k for k in report['unexpected'] if 'rope' not in k] == ['extra.weight']
    assert len(msgs) == 1 and 'extra.weight' in msgs[0] and 'missing' in msgs[0]
    torch.testing.assert_close(model.state_dict()['layers.0.blocks.0.attn.qk.weight'],
                               det_sd['layers.0.blocks.0.attn.qk.weight'])


def test_summary_line(golden_dir, golden_arch):
    msgs = []
    report = load_backbone_weights(MLLA(golden_arch), golden_dir / 'mlla_small_official_cls.pth',
                                   optional=lambda k: k.startswith('norm'), log=msgs.append)
    assert len(msgs) == 1
    assert sorted(report['missing']) == sorted(f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias'))
    assert {'head.weight', 'head.bias', 'norm.weight', 'norm.bias'} <= set(report['unexpected'])
    assert 'rope.rotations' in msgs[0] and 'head.weight' in msgs[0]


def test_convert_is_idempotent(cls_ckpt):
    once = convert_checkpoint(cls_ckpt)
    twice = convert_checkpoint(once)
    assert once['meta'] == twice['meta']
    assert list(once['state_dict']) == list(twice['state_dict'])
    assert not any('rope' in k or k.startswith('head.') for k in once['state_dict'])
    assert once['meta']['source_layout'] == 'imagenet'


def test_legacy_format_is_refused_unless_trusted(tmp_path, det_sd):
    path = tmp_path / 'old.pth'
    torch.save(det_sd, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match='legacy') as err:
        load_file(path)
    assert str(path) in str(err.value) and 'trusted=True' in str(err.value)
    assert set(load_file(path, trusted=True)) == set(det_sd)


def test_foreign_class_is_refused_even_when_harmless(tmp_path):
    torch.save({'w': torch.ones(2), 'extra': Harmless()}, tmp_path / 'foreign.pth')
    with pytest.raises(CheckpointError, match='Harmless.*not on the allow-list'):
        load_file(tmp_path / 'foreign.pth')


class Harmless:
    pass


def test_check_checkpoint_fits_shares_the_shape_check(golden_arch, golden_dir):
    from mmengine.model import BaseModule

    class Detector(BaseModule):
        def __init__(self):
            super().__init__()
            self.backbone = MLLA(golden_arch)
            self.neck = torch.nn.Linear(2, 3)

    model = Detector()
    good = {'backbone.' + k: v for k, v in model.backbone.state_dict().items()}
    check_checkpoint_fits(model, {'module.' + k: v for k, v in good.items()}, 'good.pth')
    # A head of another size is left to mmengine (fine-tuning).
    check_checkpoint_fits(model, dict(good, **{'neck.weight': torch.ones(5, 2)}), 'head.pth')
    key = 'backbone.layers.0.blocks.0.in_proj.weight'
    with pytest.raises(CheckpointError, match=r'wrong.pth: 1 backbone tensor\(s\) have the wrong shape'):
        check_checkpoint_fits(model, dict(good, **{key: torch.ones(1, 1)}), 'wrong.pth')
    with pytest.raises(CheckpointError, match='none of its 2 tensors belong to this model.*backbone-only'):
        check_checkpoint_fits(model, {'layers.0.x': torch.ones(1), 'patch_embed.y': torch.ones(1)}, 'bb.pth')
    fit = compare_state_dicts(model.state_dict(), {'neck.weight': torch.ones(5, 2), 'extra': torch.ones(1)})
    assert fit.common == ['neck.weight'] and fit.unexpected == ['extra']
    assert fit.wrong == [('neck.weight', 'neck.weight: file (5, 2) vs model (3, 2)')]
    assert 'neck.bias' in fit.missing and key in fit.missing


def test_save_atomic_failure_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / 'out.pth'
    save_atomic({'w': torch.ones(3)}, path)
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise RuntimeError('[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing '
                           'file data/0: file write failed')

    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(AtomicWriteError) as err:
        save_atomic({'w': torch.zeros(3)}, path)
    assert str(path) in str(err.value) and 'file write failed' in str(err.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ['out.pth']


@pytest.mark.parametrize('content, message', [
    ([torch.ones(2)], 'expected a dict of weights, got list'),
    ({'epoch': 3, 'optimizer': {'state': {}}, 'note': 'no weights'},
     'no weights found; expected a state dict under "state_dict" (mmdet/mmseg/mmengine), "model" (published '
     'ImageNet) or a plain dict of tensors, got keys: epoch, optimizer, note'),
    ({'state_dict': {}}, 'no weights found'),  # an empty state dict is no weights either
])
def test_a_file_without_weights_is_named_and_explained(tmp_path, golden_arch, content, message):
    path = tmp_path / 'not_weights.pth'
    torch.save(content, path)
    with pytest.raises(CheckpointError) as err:
        golden_model(golden_arch, path).init_weights()
    assert message in str(err.value) and str(path) in str(err.value)


def test_ddp_prefixed_weights_load_as_the_plain_ones(tmp_path, det_sd, golden_arch, golden):
    """A state dict saved from a DistributedDataParallel module has 'module.' before every key."""
    ddp = {'state_dict': {f'module.backbone.{k}': v for k, v in det_sd.items()}}
    converted = convert_checkpoint(ddp)
    assert list(converted['state_dict']) == [f'backbone.{k}' for k in det_sd if 'rope' not in k]
    assert converted['meta']['mlla_mm_layout'] == 'detector/segmentor'
    path = tmp_path / 'ddp.pth'
    torch.save(ddp, path)
    model = golden_model(golden_arch, path)
    model.init_weights()
    assert_golden(model, golden)


def test_atomic_write_interrupted_inside_the_block_leaves_the_old_file_and_no_temporary(tmp_path):
    from mlla_mm.utils.io import atomic_write
    path = tmp_path / 'results.json'
    path.write_text('{"old": true}')
    for stop in (RuntimeError('serialisation failed'), KeyboardInterrupt()):
        with pytest.raises(type(stop)):
            with atomic_write(path, 'w') as f:
                f.write('{"new": ')
                raise stop
        assert path.read_text() == '{"old": true}' and [p.name for p in tmp_path.iterdir()] == ['results.json']
    fresh = tmp_path / 'fresh.json'
    with pytest.raises(RuntimeError):
        with atomic_write(fresh, 'w') as f:
            f.write('half')
            raise RuntimeError('stop')
    assert not fresh.exists() and [p.name for p in tmp_path.iterdir()] == ['results.json']
