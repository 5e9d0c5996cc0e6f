"""Segmentation through the real tools: train + val, slide, --tta, --show-dir, missing data, published checkpoints.

The runs use a tiny variant of the demo config (tiny MLLA, narrow heads, a
handful of 64x64 images made under tmp_path), so they do not race with the
demo's data or work dirs.
"""
import re
import subprocess
from functools import partial

import pytest
import torch

from mlla_mm.checkpoint import load_file
from tests.helpers import (PY, ROOT, copy_work_dir, exit_code, load_tool, missing_data_error, run_tool, tool_env,
                           write_tiny_seg_run)

# The published variant in shared/golden (embed_dims 24, depths 1, 2, 1, 1).
GOLDEN_ARCH = dict(embed_dims=24, depths=[1, 2, 1, 1], num_heads=[1, 2, 3, 6])
run_tool = partial(run_tool, timeout=600)


def metrics(stdout):
    lines = [ln for ln in stdout.splitlines() if ln.startswith('metrics: ')]
    assert lines, 'no metrics line'
    return {k: float(v) for k, v in re.findall(r'(\w+)=([-0-9.]+)', lines[-1])}


#: The options of the runs of :func:`test_iteration_based_resume_is_exact` besides their length: validation and a
#: checkpoint every 2 iterations, a schedule for 4 iterations whatever the run's length, and drop path (random
#: numbers drawn in every iteration).
RESUME_OPTIONS = ['train_cfg.val_interval=2', 'default_hooks.checkpoint.interval=2', 'param_scheduler.0.end=4',
                  'model.backbone.drop_path_rate=0.2']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Two training iterations and a validation of the tiny config through tools/train.py, with the options of
    the resume test (which continues this run): also the other tests' trained checkpoint."""
    tmp = tmp_path_factory.mktemp('seg')
    cfg = write_tiny_seg_run(tmp, tmp / 'shapes_ade')
    work = tmp / 'work'
    res = run_tool('tools/train.py', cfg, '--work-dir', work, '--cfg-options', 'train_cfg.max_iters=2', *RESUME_OPTIONS)
    return dict(cfg=cfg, work=work, res=res, tmp=tmp)


@pytest.mark.slow
def test_train_val_cycle_gives_miou(trained):
    res = trained['res']
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    # The synthetic data was made where the config says, not in the repository.
    assert len(list((trained['tmp'] / 'shapes_ade' / 'images' / 'training').glob('*.jpg'))) == 4
    m = re.search(r'Iter\(val\) \[2/2\]\s+aAcc: ([0-9.]+)\s+mIoU: ([0-9.]+)\s+mAcc: ([0-9.]+)', out)
    assert m, out[-3000:]
    assert all(0 <= float(v) <= 100 for v in m.groups())
    for cls in ['background', 'circle', 'triangle', 'rectangle']:
        assert re.search(rf'\|\s+{cls}\s+\|', out), cls
    ckpt = load_file(trained['work'] / 'iter_2.pth')
    assert ckpt['meta']['iter'] == 2
    assert ckpt['state_dict']['decode_head.conv_seg.weight'].shape[0] == 4
    # Plain BN in the heads (one process, CPU or not).
    assert 'decode_head.fpn_bottleneck.bn.running_mean' in ckpt['state_dict']


def _need(trained):
    if trained['res'].returncode != 0:
        pytest.fail('the training run of the fixture failed: ' + trained['res'].stderr[-2000:])
    return trained['cfg'], trained['work'] / 'iter_2.pth'


@pytest.mark.slow
def test_slide_inference_and_show_dir(trained, tmp_path):
    cfg, ckpt = _need(trained)
    show = tmp_path / 'vis'
    res = run_tool('tools/test.py', cfg, ckpt, '--work-dir', tmp_path / 'w', '--show-dir', show,
                   '--cfg-options', 'model.test_cfg.mode=slide', 'model.test_cfg.crop_size=(48,48)',
                   'model.test_cfg.stride=(32,32)')
    assert res.returncode == 0, res.stderr[-3000:]
    got = metrics(res.stdout)
    assert {'aAcc', 'mIoU', 'mAcc'} <= set(got)
    dumped = next((tmp_path / 'w').glob('*.py')).read_text()
    assert "mode='slide'" in dumped
    pngs = sorted(show.rglob('*.png'))
    assert len(pngs) == 2, pngs
    assert all(p.parent == show and p.stem.startswith('validation_') for p in pngs), pngs  # DIR/<stem>.png
    import cv2
    img = cv2.imread(str(pngs[0]))
    assert img is not None and img.shape == (64, 128, 3)  # ground truth | predictions, at the image's size


def test_slide_and_whole_inference_in_process(tmp_path):
    """Slide inference really slides (several windows) and gives full-size logits."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mlla_mm.engine.launch import prepare_config
    cfg = prepare_config(Config.fromfile(str(write_tiny_seg_run(tmp_path, tmp_path / 'data'))),
                         work_dir=str(tmp_path / 'w'))
    init_default_scope('mmseg')
    from mmseg.registry import MODELS
    model = MODELS.build(cfg.model).eval()
    calls = []
    encode = model.encode_decode
    model.encode_decode = lambda x, metas: calls.append(tuple(x.shape[-2:])) or encode(x, metas)
    x = torch.randn(1, 3, 64, 80)
    metas = [dict(img_shape=(64, 80), ori_shape=(64, 80), pad_shape=(64, 80))]
    with torch.no_grad():
        whole = model.inference(x, metas)
        assert whole.shape == (1, 4, 64, 80) and calls == [(64, 80)]
        calls.clear()
        from mmengine.config import ConfigDict
        model.test_cfg = ConfigDict(mode='slide', crop_size=(48, 48), stride=(32, 32))
        slide = model.inference(x, metas)
    assert slide.shape == (1, 4, 64, 80)
    assert calls == [(48, 48)] * 4  # 2 x 2 windows


@pytest.mark.slow
def test_multi_scale_flip_tta(trained, tmp_path, capsys):
    cfg, ckpt = _need(trained)
    res = run_tool('tools/test.py', cfg, ckpt, '--work-dir', tmp_path / 'w', '--tta')
    assert res.returncode == 0, res.stderr[-3000:]
    assert {'aAcc', 'mIoU', 'mAcc'} <= set(metrics(res.stdout))
    dumped = next((tmp_path / 'w').glob('*.py')).read_text()
    assert 'SegTTAModel' in dumped and 'TestTimeAug' in dumped
    # A checkpoint without the decode head is refused with --tta too, before the runner (no work dir); the tool
    # runs in this process (no interpreter start-up for an error line).
    sd = {k: v for k, v in load_file(ckpt)['state_dict'].items() if not k.startswith('decode_head.')}
    torch.save({'state_dict': sd}, tmp_path / 'partial.pth')
    code = exit_code(load_tool('test').main, [cfg, tmp_path / 'partial.pth', '--work-dir', tmp_path / 'w2', '--tta'])
    err = capsys.readouterr().err
    assert code == 2 and 'are not in it' in err and 'decode_head' in err and 'Traceback' not in err, err[-2000:]
    assert not (tmp_path / 'w2').exists()


@pytest.mark.parametrize('tool', ['train', 'test'])
def test_missing_ade20k_is_a_clear_error(tmp_path, monkeypatch, capsys, tool):
    err = missing_data_error(ROOT / 'configs' / 'segmentation' / 'upernet_mlla_t.py', tool, tmp_path, monkeypatch,
                             capsys)
    assert 'data/ade/ADEChallengeData2016' in err
    assert 'images/training' in err and 'annotations/validation' in err
    assert 'make demo-seg' in err


# The mmseg 0.x (0.28) names of UPerHead and FCNHead parameters and buffers,
# written out from that version's code: ConvModule(conv, bn), PPM as
# Sequential(AdaptiveAvgPool2d, ConvModule), conv_seg from BaseDecodeHead.
def _conv_module(prefix):
    return [f'{prefix}.conv.weight'] + [f'{prefix}.bn.{n}' for n in
                                        ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')]


MMSEG0_HEAD_KEYS = sorted(
    ['decode_head.conv_seg.weight', 'decode_head.conv_seg.bias']
    + [k for i in range(4) for k in _conv_module(f'decode_head.psp_modules.{i}.1')]
    + _conv_module('decode_head.bottleneck')
    + [k for i in range(3) for k in _conv_module(f'decode_head.lateral_convs.{i}')]
    + [k for i in range(3) for k in _conv_module(f'decode_head.fpn_convs.{i}')]
    + _conv_module('decode_head.fpn_bottleneck')
    + ['auxiliary_head.conv_seg.weight', 'auxiliary_head.conv_seg.bias']
    + _conv_module('auxiliary_head.convs.0'))


def _published_segmentor_checkpoint(tmp_path, golden_dir):
    """An mmseg 0.28 UperNet checkpoint: the published backbone (with its RoPE tables) plus heads."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mlla_mm.engine.launch import prepare_config
    cfg_path = write_tiny_seg_run(tmp_path, tmp_path / 'data', arch=GOLDEN_ARCH)
    cfg = prepare_config(Config.fromfile(str(cfg_path)), work_dir=str(tmp_path / 'w'))
    init_default_scope('mmseg')
    from mmseg.registry import MODELS
    torch.manual_seed(3)
    donor = MODELS.build(cfg.model)
    own = donor.state_dict()
    heads = sorted(k for k in own if k.startswith(('decode_head.', 'auxiliary_head.')))
    assert heads == MMSEG0_HEAD_KEYS  # mmseg 1.x kept mmseg 0.x's names
    published = torch.load(golden_dir / 'mlla_small_official_det.pth', weights_only=True)['state_dict']
    rope = [k for k in published if k.endswith('attn.rope.rotations')]
    assert rope and all(k.startswith('backbone.') for k in published)
    sd = dict(published)
    for k in MMSEG0_HEAD_KEYS:
        v = own[k]
        sd[k] = v.clone() if not v.is_floating_point() else torch.randn_like(v) * 0.05 + (1.0 if k.endswith(
            ('bn.weight', 'running_var')) else 0.0)
    meta = {'mmseg_version': '0.28.0+', 'config': 'norm_cfg = dict(type="SyncBN", requires_grad=True)\n...',
            'CLASSES': ('background', 'circle', 'triangle', 'rectangle'),
            'PALETTE': [[0, 0, 0], [220, 20, 60], [0, 160, 80], [30, 80, 220]], 'iter': 160000}
    path = tmp_path / 'upernet_published.pth'
    torch.save({'meta': meta, 'state_dict': sd}, path)
    return cfg_path, cfg, path, sd, rope


def _load_through_runner(cfg, path, work):
    from mmengine.runner import Runner
    cfg = cfg.copy()
    cfg.work_dir = str(work)
    cfg.load_from = str(path)
    cfg.model.backbone.init_cfg = None
    runner = Runner.from_cfg(cfg)
    runner.load_or_resume()
    return runner.model.state_dict()


def test_published_mmseg0_checkpoint_loads_through_load_from(tmp_path, golden_dir):
    cfg_path, cfg, path, sd, rope = _published_segmentor_checkpoint(tmp_path, golden_dir)
    got = _load_through_runner(cfg, path, tmp_path / 'r1')
    assert not any('rope' in k for k in got)
    compared = 0
    for key, value in sd.items():
        if key in rope:
            continue
        torch.testing.assert_close(got[key], value, msg=key)
        compared += 1
    assert compared == len(got)  # every tensor of the model came from the file

    # The converter's output loads the same way.
    conv = tmp_path / 'converted.pth'
    res = run_tool('tools/convert_checkpoint.py', path, conv)
    assert res.returncode == 0, res.stderr
    converted = load_file(conv)
    assert not any('rope' in k for k in converted['state_dict'])
    got2 = _load_through_runner(cfg, conv, tmp_path / 'r2')
    for key in ['backbone.layers.1.blocks.1.attn.qk.weight', 'backbone.norm2.bias',
                'decode_head.fpn_bottleneck.conv.weight', 'decode_head.psp_modules.3.1.bn.running_var',
                'auxiliary_head.convs.0.conv.weight', 'auxiliary_head.conv_seg.bias']:
        torch.testing.assert_close(got2[key], sd[key], msg=key)


@pytest.mark.slow
def test_published_mmseg0_checkpoint_through_test_tool(tmp_path, golden_dir):
    cfg_path, _, path, _, _ = _published_segmentor_checkpoint(tmp_path, golden_dir)
    res = run_tool('tools/test.py', cfg_path, path, '--work-dir', tmp_path / 't')
    assert res.returncode == 0, res.stderr[-3000:]
    assert {'aAcc', 'mIoU', 'mAcc'} <= set(metrics(res.stdout))
    log = res.stdout + res.stderr
    # the published per-block RoPE tables are derived data the model drops on load: no "unexpected key" noise
    assert 'rope.rotations' not in log and 'unexpected key' not in log


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    """DDP over gloo on the CPU: SyncBN in the heads became BN, both processes train and validate."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    cfg = write_tiny_seg_run(tmp_path, tmp_path / 'shapes_ade')
    work = tmp_path / 'work'
    e = tool_env()
    e['PORT'] = str(port)
    res = subprocess.run(['bash', str(ROOT / 'tools' / 'dist_train.sh'), str(cfg), '2', '--work-dir', str(work)],
                         cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert 'Traceback' not in out
    assert re.search(r'world_size: 2|Distributed training: True', out), out[-2000:]
    if not torch.cuda.is_available():
        assert 'gloo' in out
    assert re.search(r'Iter\(val\) \[1/1\]\s+aAcc: [0-9.]+\s+mIoU: [0-9.]+', out), out[-3000:]
    ckpt = load_file(work / 'iter_2.pth')
    assert ckpt['meta']['iter'] == 2
    assert 'decode_head.fpn_bottleneck.bn.running_mean' in ckpt['state_dict']
    assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason='with CUDA mmengine starts Slurm jobs itself (nccl)')
def test_two_slurm_tasks_on_cpu(tmp_path):
    """Two processes started the way srun starts them (SLURM_* variables, scontrol on PATH): gloo, one run."""
    import os
    import socket
    import stat
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    scontrol = bin_dir / 'scontrol'  # Slurm is not installed here: the node list resolves to this machine
    scontrol.write_text('#!/bin/sh\nprintf "127.0.0.1\\n127.0.0.2\\n"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IXUSR)
    cfg = write_tiny_seg_run(tmp_path, tmp_path / 'shapes_ade')
    work = tmp_path / 'work'
    procs = []
    for rank in range(2):
        e = tool_env()
        e.pop('MASTER_ADDR', None)
        e.update(SLURM_NTASKS='2', SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODELIST='cpu[1-2]',
                 MASTER_PORT=str(port), PATH=f'{bin_dir}{os.pathsep}{e.get("PATH", "")}')
        procs.append(subprocess.Popen([PY, 'tools/train.py', str(cfg), '--launcher', 'slurm', '--work-dir', str(work)],
                                      cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f'rank {rank}:\n' + out[-4000:]
        assert 'Traceback' not in out
    assert 'torch.distributed started with gloo (rank 0 of 2)' in outs[0]
    assert re.search(r'Iter\(val\) \[1/1\]\s+aAcc: [0-9.]+\s+mIoU: [0-9.]+', outs[0]), outs[0][-3000:]
    ckpt = load_file(work / 'iter_2.pth')
    assert ckpt['meta']['iter'] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason='with CUDA mmengine starts Slurm jobs itself')
def test_slurm_launcher_outside_srun_is_one_clear_error(tmp_path):
    cfg = write_tiny_seg_run(tmp_path, tmp_path / 'shapes_ade')
    e = tool_env()
    for key in [k for k in e if k.startswith('SLURM_')] + ['MASTER_ADDR']:
        e.pop(key, None)
    res = subprocess.run([PY, 'tools/train.py', str(cfg), '--launcher', 'slurm', '--work-dir', str(tmp_path / 'w')],
                         cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert 'Traceback' not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        'error: --launcher slurm needs SLURM_NTASKS, SLURM_PROCID, SLURM_NODELIST (or MASTER_ADDR) in the '
        'environment, which srun sets; start the processes with it, or use --launcher none for one process')


@pytest.mark.slow
def test_iteration_based_resume_is_exact(trained, tmp_path):
    """UperNet trains by iterations: 4 iterations in one run equal 2, a stop, and a resume to 4.

    The resumed run skips the 2 batches already trained without drawing from the
    restored random state (ExactIterBasedTrainLoop), so augmentation, sampling and
    dropout continue exactly; validation at iteration 2 and 4 runs in both. The
    run stopped after 2 iterations is the ``trained`` fixture's (continued in a copy).
    """
    cfg, _ = _need(trained)
    opts = ['--cfg-options', 'train_cfg.max_iters=4', *RESUME_OPTIONS]
    straight = tmp_path / 'straight'
    res = run_tool('tools/train.py', cfg, '--work-dir', straight, *opts)
    assert res.returncode == 0, res.stderr[-3000:]
    stopped = copy_work_dir(trained['work'], tmp_path / 'stopped')
    two = load_file(stopped / 'iter_2.pth')['state_dict']  # (the checkpoint hook keeps only the latest)
    res = run_tool('tools/train.py', cfg, '--work-dir', stopped, '--resume', stopped / 'iter_2.pth', *opts)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert 'Iter(train) [3/4]' in log and 'Iter(train) [1/4]' not in log  # it resumed, it did not start over
    a, b = load_file(straight / 'iter_4.pth'), load_file(stopped / 'iter_4.pth')
    assert a['meta']['iter'] == b['meta']['iter'] == 4
    assert list(a['state_dict']) == list(b['state_dict'])
    for key, value in a['state_dict'].items():
        assert torch.equal(value, b['state_dict'][key]), key
    assert any(not torch.equal(two[k], v) for k, v in a['state_dict'].items())  # iterations 3-4 did train
