"""Detection through the real tools: train + val, resume, load_from, DDP, AMP, missing data."""
import pickle
import re
import sys

import cv2
import pytest
import torch

from mlla_mm.checkpoint import load_file
from tests.helpers import (ROOT, exit_code, free_port, load_tool, missing_data_error, run_tool, tool_env,
                           write_tiny_config)

WITH_VAL = '''
val_dataloader = test_dataloader
val_evaluator = test_evaluator
val_cfg = dict(type='ValLoop')
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
'''


def losses(log_text):
    return [float(v) for v in re.findall(r'\bloss: ([-+\w.]+)', log_text)]


@pytest.mark.slow
def test_train_val_then_resume(tmp_path, tiny_data, capsys):
    cfg = write_tiny_config(tmp_path, tiny_data, epochs=1, extra=WITH_VAL)
    work = tmp_path / 'work'
    res = run_tool('tools/train.py', cfg, '--work-dir', work)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert re.search(r'coco/bbox_mAP: [0-9.]+', out), 'no validation metrics in the log'
    if sys.platform.startswith('linux'):
        assert 'mlla-mm: glibc malloc tuned' in out  # the process-wide setting is stated in the log
    first = load_file(work / 'epoch_1.pth')
    assert first['meta']['iter'] == 2 and first['meta']['epoch'] == 1
    step1 = first['optimizer']['state'][0]['step'].item()
    assert step1 == 2

    # One test.py run with both outputs:
    # --show-dir: DIR/<image stem>.png for every test image (ground truth | predictions, each panel at the image's
    # own 64x64 size; mlla_mm.visualization.ShowDirHook);
    # --out: the raw predictions of every test image in one pickle (mmengine's DumpResults).
    pics, out_file = tmp_path / 'pics', tmp_path / 'results.pkl'
    res = run_tool('tools/test.py', cfg, work / 'epoch_1.pth', '--work-dir', tmp_path / 'test', '--show-dir', pics,
                   '--out', out_file)
    assert res.returncode == 0, res.stderr[-3000:]
    drawn = sorted(pics.rglob('*.png'))
    assert [p.name for p in drawn] == ['val_00000.png', 'val_00001.png']
    assert [p.parent for p in drawn] == [pics, pics]
    assert all(cv2.imread(str(p)).shape == (64, 128, 3) for p in drawn)
    with open(out_file, 'rb') as f:
        dumped = pickle.load(f)  # written by this test's own run
    assert len(dumped) == 2 and all('pred_instances' in d and 'bboxes' in d['pred_instances'] for d in dumped)
    # A checkpoint that is not there: one line, exit 2 (the tool run in this process: no interpreter start-up).
    code = exit_code(load_tool('test').main, [cfg, work / 'epoch_9.pth', '--work-dir', tmp_path / 'test3'])
    err = capsys.readouterr().err
    assert code == 2 and 'Traceback' not in err
    assert err.strip().splitlines()[-1] == f"error: checkpoint not found: {work / 'epoch_9.pth'}"

    res = run_tool('tools/train.py', cfg, '--work-dir', work, '--resume', '--cfg-options', 'train_cfg.max_epochs=2')
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert 'resumed' in out.lower() and 'epoch_1.pth' in out
    second = load_file(work / 'epoch_2.pth')
    assert second['meta']['iter'] == 4 and second['meta']['epoch'] == 2
    # The optimizer state continued (AdamW's step count) rather than restarting.
    assert second['optimizer']['state'][0]['step'].item() == 4
    # An explicit checkpoint works too.
    res = run_tool('tools/train.py', cfg, '--work-dir', tmp_path / 'w2', '--resume', work / 'epoch_1.pth',
                   '--cfg-options', 'train_cfg.max_epochs=2')
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_file(tmp_path / 'w2' / 'epoch_2.pth')['meta']['iter'] == 4


def test_published_mmdet2_checkpoint_loads_through_load_from(tmp_path, tiny_data):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    from mlla_mm.engine.launch import prepare_config
    cfg_path = write_tiny_config(tmp_path, tiny_data, epochs=1)
    cfg = prepare_config(Config.fromfile(str(cfg_path)), work_dir=str(tmp_path / 'w'))
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    torch.manual_seed(3)
    donor = MODELS.build(cfg.model)
    sd = {k: v.clone() for k, v in donor.state_dict().items()}
    # The published layout: mmdet 2.25 meta, fixed RoPE tables under the backbone.
    for i in range(4):
        sd[f'backbone.layers.{i}.blocks.0.attn.rope.rotations'] = torch.randn(4, 4, 8)
    torch.save({'meta': {'mmdet_version': '2.25.0', 'CLASSES': ('circle', 'triangle', 'rectangle'),
                         'epoch': 12, 'iter': 87960}, 'state_dict': sd}, tmp_path / 'published.pth')
    cfg.load_from = str(tmp_path / 'published.pth')
    cfg.model.backbone.init_cfg = None
    runner = Runner.from_cfg(cfg)
    runner.load_or_resume()
    got = runner.model.state_dict()
    for key in ['backbone.layers.0.blocks.0.attn.qk.weight', 'backbone.norm3.weight', 'neck.fpn_convs.0.conv.weight',
                'roi_head.mask_head.conv_logits.weight', 'rpn_head.rpn_cls.bias']:
        torch.testing.assert_close(got[key], sd[key])
    # And the test tool evaluates it.
    res = run_tool('tools/test.py', cfg_path, tmp_path / 'published.pth', '--work-dir', tmp_path / 't')
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'metrics: coco/bbox_mAP=' in res.stdout


@pytest.mark.parametrize('tool', ['train', 'test'])
def test_missing_coco_is_a_clear_error(tmp_path, monkeypatch, capsys, tool):
    err = missing_data_error(ROOT / 'configs' / 'detection' / 'mask_rcnn_mlla_t.py', tool, tmp_path, monkeypatch,
                             capsys)
    assert 'data/coco' in err and 'instances_train2017.json' in err
    assert 'make demo' in err


@pytest.mark.slow
@pytest.mark.parametrize('with_cp', [False, True])
def test_two_process_ddp_on_cpu(tmp_path, tiny_data, with_cp):
    cfg = write_tiny_config(tmp_path, tiny_data, epochs=1)
    work = tmp_path / 'work'
    env = tool_env(PORT=str(free_port()))
    import subprocess
    res = subprocess.run(['bash', str(ROOT / 'tools' / 'dist_train.sh'), str(cfg), '2', '--work-dir', str(work),
                          '--cfg-options', f'model.backbone.with_cp={with_cp}'],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert 'gloo' in out
    assert re.search(r'world_size: 2|Distributed training: True', out), out[-2000:]
    ckpt = load_file(work / 'epoch_1.pth')
    # 4 images, 2 per process per step, 2 processes: one iteration per epoch.
    assert ckpt['meta']['iter'] == 1
    assert any(k.startswith('backbone.layers.0') for k in ckpt['state_dict'])
    assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())


@pytest.mark.slow
def test_amp_bf16_on_cpu(tmp_path, tiny_data):
    cfg = write_tiny_config(tmp_path, tiny_data, epochs=2)
    res = run_tool('tools/train.py', cfg, '--work-dir', tmp_path / 'work', '--amp')
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert 'CPUAutocastOptimWrapper' in out
    values = losses(out)
    assert len(values) >= 4 and all(v == v and abs(v) != float('inf') for v in values)
