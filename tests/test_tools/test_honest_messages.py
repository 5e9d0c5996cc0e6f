"""Messages that do not mislead (issue 30, item 5): no "RANDOMLY initialised" backbone right before load_from
gives the whole model its weights; an export without weights says they are random."""
import pytest

from tests.helpers import ROOT, load_tool, run_tool, write_tiny_config

#: The tiny config's backbone with a pretrained file that is not there (as a fresh clone without MLLA_T.pth).
MISSING_PRETRAINED = '''
model['backbone']['init_cfg'] = dict(type='Pretrained', checkpoint={path!r}, if_missing='warn')
'''


def test_load_from_drops_a_missing_pretrained_init_cfg():
    from mlla_mm.cli import load_config
    from mlla_mm.engine.launch import skip_unneeded_pretrained
    cfg = load_config(str(ROOT / 'configs' / 'detection' / 'mask_rcnn_mlla_t.py'))
    cfg.model.backbone.init_cfg.checkpoint = '/nonexistent/MLLA_T.pth'
    assert skip_unneeded_pretrained(cfg) is None  # no load_from: the backbone's own message stays right
    assert cfg.model.backbone.init_cfg is not None
    cfg.load_from = 'work_dirs/x/epoch_12.pth'
    note = skip_unneeded_pretrained(cfg)
    assert cfg.model.backbone.init_cfg is None
    assert note == ('model.backbone.init_cfg.checkpoint /nonexistent/MLLA_T.pth is not there and not needed: the '
                    'weights come from work_dirs/x/epoch_12.pth')


@pytest.mark.slow
def test_fine_tuning_with_load_from_does_not_say_the_backbone_is_random(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data, epochs=1,
                               extra=MISSING_PRETRAINED.format(path=str(tmp_path / 'absent' / 'MLLA_T.pth')))
    first = run_tool('tools/train.py', config, '--work-dir', tmp_path / 'a', timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert 'RANDOMLY' in first.stdout + first.stderr  # true here: nothing else gives the backbone weights
    ckpt = tmp_path / 'a' / 'epoch_1.pth'
    second = run_tool('tools/train.py', config, '--work-dir', tmp_path / 'b', '--cfg-options', f'load_from={ckpt}',
                      timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert 'RANDOMLY' not in log, log[-3000:]
    assert f'is not there and not needed: the weights come from {ckpt}' in log
    assert f'Load checkpoint from {ckpt}' in log


def test_export_without_weights_says_the_weights_are_random(tmp_path, capsys):
    from tests.helpers import write_tiny_upernet
    export_tool = load_tool('export_onnx')
    cfg = write_tiny_upernet(tmp_path)
    out = tmp_path / 'random.onnx'
    assert export_tool.main([str(cfg), '--backbone-only', '--out', str(out), '--shape', '32', '32']) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if 'warning' in ln.lower()]
    assert lines == [f'warning: no WEIGHTS given: the exported model has RANDOM weights (give a checkpoint after '
                     f'{cfg} to export trained ones)']
