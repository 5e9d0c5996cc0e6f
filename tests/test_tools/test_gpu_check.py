"""tools/gpu_check.py (issue 29): its CPU-runnable parts, on the CPU with tiny sizes."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, TINY_ARCH, load_tool

gc = load_tool('gpu_check')



@pytest.fixture
def ctx(tmp_path):
    return gc.Ctx(device='cpu', work_dir=tmp_path, arch=TINY_ARCH, size=(64, 96), infer_size=(64, 64),
                  train_size=(64, 64), train_batch=1, repeats=1, warmup=0, seg_size=(64, 64), seg_arch=TINY_ARCH,
                  speed_arch=TINY_ARCH, swin_kwargs=dict(embed_dims=24, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4]))


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / 'gpu_check.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'gpu_check.py'), '--out', str(out)], cwd=ROOT,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert proc.stdout.strip().splitlines() == [
        'gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to check']
    assert not out.exists()


# ---------------------------------------------------------------- numbers and logs
def test_max_rel_diff_is_relative_to_the_largest_reference_value():
    ref = [torch.tensor([1.0, -4.0]), torch.tensor([[10.0]])]
    assert gc.max_rel_diff([torch.tensor([1.0, -4.0]), torch.tensor([[10.0]])], ref) == 0.0
    assert gc.max_rel_diff([torch.tensor([1.2, -4.0]), torch.tensor([[10.0]])], ref) == pytest.approx(0.05)
    assert gc.max_rel_diff([torch.tensor([1.0, -4.0]), torch.tensor([[9.0]])], ref) == pytest.approx(0.1)
    assert gc.max_rel_diff([torch.tensor([math.nan, 0.0]), torch.tensor([[10.0]])], ref) == math.inf
    with pytest.raises(ValueError, match='shape'):
        gc.max_rel_diff([torch.zeros(3), torch.zeros(1, 1)], ref)
    assert gc.verdict(1e-5, 1e-4) == 'PASS' and gc.verdict(2e-4, 1e-4) == 'FAIL' and gc.verdict(math.nan, 1) == 'FAIL'


LOG = '\n'.join([
    '12/07 01:00:00 - mmengine - INFO - Checkpoints will be saved to /w.',
    '12/07 01:00:02 - mmengine - INFO - Epoch(train) [1][ 1/30]  lr: 4.0000e-05  eta: 0:00:58  time: 2.0'
    '  loss: 5.2500  loss_rpn_cls: 0.6931  loss_mask: 0.7',
    '12/07 01:00:03 - mmengine - INFO - Epoch(train) [1][ 2/30]  lr: 7.6000e-05  eta: 0:00:30  time: 1.0'
    '  loss: nan  loss_rpn_cls: 0.6',
    '12/07 01:00:04 - mmengine - INFO - Iter(train) [ 3/30]  lr: 1e-4  loss: 4.0  loss_cls: 1.0',
    '12/07 01:00:05 - mmengine - INFO - Epoch(val) [1][ 1/4]  loss: 9.0',
]) + '\n'


def test_train_losses_are_read_from_the_mmengine_log():
    losses = gc.parse_train_losses(LOG)
    assert losses[0] == 5.25 and math.isnan(losses[1]) and losses[2] == 4.0 and len(losses) == 3


def test_loss_trend_wants_finite_and_decreasing_losses():
    assert gc.loss_trend([5, 4, 4, 3, 3, 2, 2, 2, 1, 1], window=3)[0] is True
    assert gc.loss_trend([1, 1, 1, 2, 2, 3, 3, 3, 4, 4], window=3)[0] is False
    ok, why = gc.loss_trend([5, 4, math.inf, 3, 3, 2, 2, 2, 1, 1], window=3)
    assert not ok and 'iteration 3' in why
    assert gc.loss_trend([5, 4], window=3) == (False, '2 logged losses, expected at least 6')


def test_state_dicts_compare_bit_for_bit():
    a = {'w': torch.tensor([1.0, 2.0]), 'n': torch.tensor(3)}
    assert gc.compare_state_dicts(a, {k: v.clone() for k, v in a.items()}) == (True, 0.0)
    same, worst = gc.compare_state_dicts(a, {'w': torch.tensor([1.0, 2.5]), 'n': torch.tensor(3)})
    assert not same and worst == pytest.approx(0.5)
    assert gc.compare_state_dicts(a, {'w': a['w']}) == (False, math.inf)


def test_wait_for_iterations_reads_the_newest_log_and_notices_an_ended_run(tmp_path):
    (tmp_path / '20261207_010000').mkdir()
    (tmp_path / '20261207_010000' / '20261207_010000.log').write_text(LOG)
    running = subprocess.Popen(['sleep', '10'])
    try:
        assert gc.wait_for_iterations(tmp_path, 3, running, timeout=5) is True
        start = time.monotonic()
        assert gc.wait_for_iterations(tmp_path, 4, running, timeout=0.3) is False
        assert time.monotonic() - start < 5
    finally:
        running.kill()
        running.wait()
    ended = subprocess.Popen(['true'])
    ended.wait()
    assert gc.wait_for_iterations(tmp_path, 4, ended, timeout=5) is False


def test_the_detector_config_is_the_demo_on_its_own_data(tmp_path):
    from mmengine.config import Config
    path = gc.write_det_config(tmp_path / 'run', num_train=60, epochs=1, deterministic=True)
    cfg = Config.fromfile(str(path))
    assert cfg.synthetic_data.num_train == 60 and cfg.synthetic_data.root == str(tmp_path / 'run' / 'data') + '/'
    assert cfg.train_dataloader.dataset.data_root == cfg.synthetic_data.root
    assert cfg.train_cfg.max_epochs == 1 and cfg.val_dataloader is None
    assert cfg.default_hooks.logger.interval == 1 and cfg.randomness.deterministic is True
    assert cfg.model.backbone.type == 'MLLA' and cfg.model.backbone.arch == 'tiny'
    assert cfg.model.roi_head.bbox_roi_extractor.type == 'SparseRoIExtractor'  # mmcv's kernel on CUDA tensors


# ---------------------------------------------------------------- the table and the JSON file
def test_table_and_json_report(tmp_path):
    results = [gc.Result('golden', 'PASS', 'max |diff| 1.0e-06', '0.0001', 1.25),
               gc.Result('resume', 'FAIL', 'weights differ', 'bit-identical', 30.0, detail='max 1e-3'),
               gc.Result('ddp', 'SKIP', detail='1 GPU(s)')]
    table = gc.format_table(results).splitlines()
    assert table[0].split() == ['check', 'status', 'value', 'limit', 'time']
    assert set(table[1].replace(' ', '')) == {'-'}
    assert table[3].split()[:2] == ['resume', 'FAIL'] and '(max 1e-3)' in table[3] and table[3].endswith('30.0 s')
    out = tmp_path / 'sub' / 'gpu_check.json'
    gc.write_report(out, {'device': 'cpu'}, results)
    data = json.loads(out.read_text())
    assert data['failed'] == ['resume'] and [r['name'] for r in data['results']] == ['golden', 'resume', 'ddp']
    assert list(out.parent.iterdir()) == [out]  # no temporary file left


def test_a_check_that_raises_is_a_fail_row_and_the_others_still_run(ctx, monkeypatch):
    def broken(c):
        raise RuntimeError('CUDA error: an illegal memory access')
    monkeypatch.setitem(gc.CHECKS, 'broken', broken)
    monkeypatch.setitem(gc.CHECKS, 'fine', lambda c: [gc.Result('a', 'PASS'), gc.Result('b', 'INFO')])
    lines = []
    results = gc.run_checks(ctx, ['broken', 'fine'], echo=lines.append)
    assert [(r.name, r.status) for r in results] == [('broken', 'FAIL'), ('a', 'PASS'), ('b', 'INFO')]
    assert 'illegal memory access' in results[0].detail and 'test_gpu_check.py' in results[0].detail
    assert lines[0].startswith('gpu-check: broken: FAIL')


# ---------------------------------------------------------------- the checks themselves, on the CPU
def test_mmcv_ops_check_runs_on_the_device(ctx):
    result = gc.check_mmcv_ops(ctx)
    assert result.status == 'PASS', result
    assert result.data['nms_same'] is True and result.data['roi_align_max_abs_diff'] == 0.0


def test_backbone_checks_against_the_float64_reference(ctx):
    fp32 = gc.check_backbone_fp32(ctx)
    assert fp32.status == 'PASS' and 0 < fp32.data['max_rel_diff'] <= 1e-4, fp32
    rows = gc.check_autocast(ctx)
    assert [r.name for r in rows] == ['autocast_bf16']
    diff = rows[0].data['max_rel_diff']
    assert 1e-4 < diff < 1  # bf16 really ran, and still computes the same function
    assert rows[0].status == gc.verdict(diff, gc.AUTOCAST_LIMIT)


def test_a_wrong_device_result_fails_the_fp32_check(ctx, monkeypatch):
    """The comparison can fail: a model whose outputs are off by 1e-3 on the device."""
    real = gc.build_mlla

    class Off(torch.nn.Module):  # float32 outputs 1e-3 too large; the float64 reference unchanged
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return [y * (1 + 1e-3) if y.dtype == torch.float32 else y for y in self.model(x)]
    monkeypatch.setattr(gc, 'build_mlla', lambda arch, seed=0, **kw: Off(real(arch, seed, **kw)))
    result = gc.check_backbone_fp32(ctx)
    assert result.status == 'FAIL' and result.data['max_rel_diff'] == pytest.approx(1e-3, rel=0.05)


def test_golden_outputs_on_the_device(ctx):
    result = gc.check_golden(ctx)
    assert result.status == 'PASS', result
    assert result.data['max_abs_diff'] <= 1e-4


def test_upernet_step_on_the_device(ctx):
    result = gc.check_upernet_step(ctx)
    assert result.status == 'PASS', result
    assert math.isfinite(result.data['loss'])


def test_speed_rows_compare_mlla_with_swin(ctx):
    infer, train = gc.check_speed(ctx)
    assert infer.status == train.status == 'INFO'
    times = {k: v for k, v in infer.data.items() if k != 'fast_vs_plain_max_rel_diff'}
    assert set(times) == {'mlla_t', 'swin_t', 'mlla_t_fast', 'mlla_t_plain'} and all(v > 0 for v in times.values())
    assert infer.data['fast_vs_plain_max_rel_diff'] <= 1e-4  # the fast path's numbers are the autograd code's
    assert 'fast path / plain' in infer.detail
    assert set(train.data) == {'mlla_t', 'mlla_t_cp', 'swin_t', 'swin_t_cp'}
    assert all(v['seconds'] > 0 and v['peak_mib'] is None for v in train.data.values())  # no GPU memory on the CPU
    assert 'MLLA-T / Swin-T' in infer.detail and '1x64x64' in train.value


def test_ddp_needs_two_gpus(ctx):
    result = gc.check_ddp(ctx)
    assert result.status == 'SKIP' and 'needs two' in result.detail
