"""The model check: MLLA out_indices against the neck's / decode heads' in_channels."""
import pytest
import torch
from mmengine.config import Config

from mlla_mm.datasets.checks import backbone_channels, check_model_config
from mlla_mm.errors import UsageError
from tests.helpers import ROOT, TINY_ARCH

CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / 'configs').rglob('*.py') if '_base_' not in p.parts)


@pytest.mark.parametrize('path', CONFIGS)
def test_every_project_config_passes(path):
    check_model_config(Config.fromfile(ROOT / path), path)


@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (1, 2, 3), (3, ), (0, 2), [2, 0], 1])
def test_channels_are_those_the_built_backbone_returns(out_indices):
    from mlla_mm.models import MLLA

    def returned(arch):
        with torch.no_grad():
            return [o.shape[1] for o in MLLA(arch, out_indices=out_indices).eval()(torch.zeros(1, 3, 32, 32))]

    channels, _ = backbone_channels(dict(type='MLLA', arch=TINY_ARCH, out_indices=out_indices))
    assert channels == returned(TINY_ARCH)
    # A named arch: the same channels as a one-block model of MLLA-B's widths.
    channels, _ = backbone_channels(dict(type='mlla_mm.MLLA', arch='base', out_indices=out_indices))
    assert channels == returned(dict(embed_dims=96, depths=[1, 1, 1, 1], num_heads=[3, 6, 12, 24]))


def det_cfg(**backbone):
    backbone = dict(dict(type='MLLA', arch='tiny'), **backbone)
    return Config(dict(model=dict(type='MaskRCNN', backbone=backbone,
                                  neck=dict(type='FPN', in_channels=[64, 128, 256, 512], out_channels=256))))


def test_fpn_in_channels_against_out_indices():
    check_model_config(det_cfg(), 'det.py')
    with pytest.raises(UsageError) as err:
        check_model_config(det_cfg(out_indices=(1, 2, 3)), 'det.py')
    assert str(err.value) == ('det.py: model.neck.in_channels is [64, 128, 256, 512] but the backbone (MLLA, '
                              'out_indices=(1, 2, 3)) returns 3 maps with channels [128, 256, 512]; make them match')
    cfg = det_cfg(arch='base')
    with pytest.raises(UsageError, match=r'\[96, 192, 384, 768\]'):
        check_model_config(cfg, 'det.py')


def test_tta_wrapper_is_looked_into():
    cfg = det_cfg(out_indices=(2, 3))
    cfg.model = dict(type='DetTTAModel', module=cfg.model)
    with pytest.raises(UsageError, match='model.neck.in_channels'):
        check_model_config(cfg, 'det.py')


def test_bad_out_indices_value():
    with pytest.raises(UsageError, match=r'out_indices must be stage indices in 0\.\.3, got \(1, 4\)'):
        check_model_config(det_cfg(out_indices=(1, 4)), 'det.py')


def seg_cfg(out_indices=(0, 1, 2, 3), in_index=(0, 1, 2, 3), in_channels=(64, 128, 256, 512), aux=None):
    aux = aux or dict(type='FCNHead', in_channels=256, in_index=2)
    return Config(dict(model=dict(type='EncoderDecoder',
                                  backbone=dict(type='MLLA', arch='tiny', out_indices=out_indices),
                                  decode_head=dict(type='UPerHead', in_channels=list(in_channels),
                                                   in_index=list(in_index)),
                                  auxiliary_head=aux)))


def test_decode_head_in_index_and_in_channels():
    check_model_config(seg_cfg(), 'seg.py')
    with pytest.raises(UsageError) as err:
        check_model_config(seg_cfg(out_indices=(1, 2, 3)), 'seg.py')
    assert 'model.decode_head.in_index is [0, 1, 2, 3] but the backbone' in str(err.value)
    assert 'returns 3 maps with channels [128, 256, 512]' in str(err.value)
    # Three maps picked by index 0..2 are fine when the head expects those channels.
    check_model_config(seg_cfg(out_indices=(1, 2, 3), in_index=(0, 1, 2), in_channels=(128, 256, 512),
                               aux=dict(type='FCNHead', in_channels=256, in_index=1)), 'seg.py')
    with pytest.raises(UsageError, match=r'model.auxiliary_head.in_channels is 256 but in_index=2 picks maps '
                                         r'with channels 512'):
        check_model_config(seg_cfg(out_indices=(1, 2, 3), in_index=(0, 1, 2), in_channels=(128, 256, 512)),
                           'seg.py')
    with pytest.raises(UsageError, match=r'model.auxiliary_head\[1\].in_channels is 100'):
        check_model_config(seg_cfg(aux=[dict(type='FCNHead', in_channels=256, in_index=2),
                                        dict(type='FCNHead', in_channels=100, in_index=-1)]), 'seg.py')


def test_other_backbones_and_bad_arch_are_left_to_the_model():
    check_model_config(Config(dict(model=dict(backbone=dict(type='ResNet', depth=50, out_indices=(1, 2, 3)),
                                              neck=dict(type='FPN', in_channels=[1, 2, 3, 4])))))
    check_model_config(det_cfg(arch='tinyy', out_indices=(1, 2, 3)))
