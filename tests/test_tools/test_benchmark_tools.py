"""tools/benchmark.py (--quick) and tools/get_flops.py on small inputs."""
import json
import re
import sys

import pytest

from tests.helpers import ROOT, assert_one_error_line, exit_code, load_tool, run_tool

benchmark = load_tool('benchmark')
get_flops = load_tool('get_flops')


def run_ok(*args, timeout=240):
    """Run a tool, require success, return its stdout."""
    res = run_tool(*args, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_benchmark_quick_writes_json_and_png(tmp_path):
    out_json, out_png = tmp_path / 'b.json', tmp_path / 'b.png'
    stdout = run_ok(ROOT / 'tools' / 'benchmark.py', '--quick', '--threads', '1', '--no-train',
                      '--sizes', '64x96', '256x256', '--json', out_json, '--plot', out_png, '--train-repeats', '2')
    data = json.loads(out_json.read_text())
    assert out_png.stat().st_size > 1000 and out_png.read_bytes()[:4] == b'\x89PNG'
    assert set(data['latency']) == {'mlla_t', 'mlla_t_ref'}
    for name, rows in data['latency'].items():
        assert set(rows) == {'64x96', '256x256'}
        for r in rows.values():
            assert 0 < r['min'] <= r['median'] <= r['max']
            assert r['images_per_s'] == pytest.approx(1 / r['median'])
            assert r['pixels'] == r['height'] * r['width']
        if sys.platform.startswith('linux'):  # inference peak memory grows with the input
            assert rows['256x256']['peak_mib'] > max(1.0, rows['64x96']['peak_mib'])
    t = data['targets']
    assert t['mlla_t_flops_size'] == '256x256'
    assert t['mlla_t_gflops_per_s'] > 0 and t['matmul_gflops_per_s'] > 0
    assert t['flops_fraction_of_matmul'] == pytest.approx(t['mlla_t_gflops_per_s'] / t['matmul_gflops_per_s'])
    mem = data['memory']
    assert mem['no_cp'] > 0 and mem['with_cp'] > 0
    assert t['with_cp_memory_ratio'] == pytest.approx(mem['with_cp'] / mem['no_cp'])
    for label in ('MLLA-T FLOP/s / matmul FLOP/s', 'MLLA-T fwd+bwd peak memory with_cp / without'):
        assert label in stdout
    # toy sizes: the ratios alone, no verdict against the project's targets (issue 30, item 5)
    assert 'verdicts' not in t and 'PASS' not in stdout and 'FAIL' not in stdout and 'Targets:' not in stdout
    assert 'not comparable with the targets' in stdout
    assert re.search(r'^# estimated run time: about (<1|\d+) min', stdout, re.M), stdout[:2000]
    # The whole-detector check (on by default; 96x128 with --quick): both detectors, their parts, the ratio.
    det = data['detector_inference']
    assert det['size'] == '96x128'
    for kind in ('mlla_t', 'swin_t'):
        assert set(det['parts'][kind]) == {'backbone', 'neck', 'rpn_head', 'roi_head'}
        assert 0 < sum(det['parts'][kind].values()) < det[kind]['max']
    assert t['detector_inference_mlla_t_over_swin_t'] > 0
    # Its per-round ratios are kept, and the printed line says how they spread.
    rounds = data['round_ratios']['detector_inference_mlla_t_over_swin_t']
    assert len(rounds) == det['mlla_t']['n']
    assert min(rounds) <= t['detector_inference_mlla_t_over_swin_t'] <= max(rounds)
    line = next(ln for ln in stdout.splitlines() if 'Mask R-CNN inference MLLA-T / Swin-T' in ln)
    assert f"(rounds {min(rounds):.3f}-{max(rounds):.3f})" in line


def test_slope_and_verdict_helpers():
    assert benchmark.slope([(1e4, 0.1), (4e4, 0.4), (16e4, 1.6)]) == pytest.approx(1.0)
    assert benchmark.slope([(1e4, 0.1), (4e4, 1.6)]) == pytest.approx(2.0)
    assert benchmark.verdict(0.7, 0.8) == 'PASS' and benchmark.verdict(0.9, 0.8) == 'FAIL'
    assert benchmark.verdict(0.75, 0.7, higher_is_better=True) == 'PASS'
    assert benchmark.verdict(None, 0.7) == 'SKIP'
    assert benchmark.parse_size('800x1280') == (800, 1280)


def test_peak_memory_sees_a_large_allocation():
    import torch
    mib = benchmark.peak_memory_mib(lambda: torch.ones(64 * 2**20 // 4).sum())
    if mib is None:
        pytest.skip('no /proc/self/clear_refs here')
    assert 50 < mib < 200


def test_get_flops_backbone_matches_spec():
    res = get_flops.measure('mlla_t', (224, 224))
    assert res['backbone_params'] == 23_880_096
    assert res['backbone_macs'] / 1e9 == pytest.approx(4.13, rel=0.005)
    assert res['backbone_flops'] == 2 * res['backbone_macs']
    assert sum(res['backbone_by_op'].values()) == res['backbone_macs']
    assert res['backbone_by_op']['bmm'] > 0  # the linear-attention products are counted
    assert get_flops.kind_and_arch('configs/detection/mask_rcnn_mlla_s.py') == ('mask_rcnn', 's')
    assert get_flops.kind_and_arch('configs/segmentation/upernet_mlla_b.py') == ('upernet', 'b')


@pytest.mark.slow
def test_get_flops_on_a_config(tmp_path, capsys):
    cfg = ROOT / 'configs' / 'detection' / 'mask_rcnn_mlla_t.py'  # the repo's own: missing is a failure
    assert cfg.is_file(), cfg
    out = tmp_path / 'f.json'
    assert get_flops.main([str(cfg), '--shape', '128', '160', '--json', str(out), '--threads', '1']) == 0
    stdout = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res['kind'] == 'mask_rcnn' and res['arch'] == 't' and res['published_gmacs'] == 255.
    assert res['params'] > res['backbone_params'] == 23_880_096
    assert res['macs'] > res['backbone_macs'] > 0
    assert 'GMACs' in stdout


def test_interleaved_alternates_the_order_and_pairs_rounds():
    order = []
    fns = {'a': lambda: order.append('a'), 'b': lambda: order.append('b')}
    times = benchmark.interleaved(fns, repeats=3, warmup=1)
    assert order == ['a', 'b', 'a', 'b', 'b', 'a', 'a', 'b']  # warm-up, then a-b, b-a, a-b
    assert {k: len(v) for k, v in times.items()} == {'a': 3, 'b': 3}
    ratio = benchmark.paired_ratio({'a': [1., 4., 3.], 'b': [2., 2., 1.]}, 'a', 'b')
    assert ratio == 2.0  # median of 0.5, 2, 3


def test_no_rounds_is_one_clear_error():
    res = run_tool(ROOT / 'tools' / 'benchmark.py', '--quick', '--train-repeats', '0', timeout=120)
    assert res.returncode == 2 and res.stdout.count('\n') <= 1
    assert res.stderr.strip().splitlines()[-1] == 'error: --train-repeats must be at least 1, got 0'


def test_unknown_model_is_rejected_by_name():
    res = run_tool(ROOT / 'tools' / 'benchmark.py', '--models', 'mlla_x', timeout=120)
    assert res.returncode == 2 and "invalid choice: 'mlla_x'" in res.stderr


def test_benchmark_bf16_quick(tmp_path):
    """tools/benchmark_bf16.py: three fp32/bf16 pairs, ratios consistent with the times, CPU named."""
    out_json = tmp_path / 'bf16.json'
    stdout = run_ok(ROOT / 'tools' / 'benchmark_bf16.py', '--quick', '--threads', '1', '--json', out_json)
    data = json.loads(out_json.read_text())
    assert data['cpu']['model_name'] and isinstance(data['cpu']['native_bf16'], bool)
    assert f"# CPU: {data['cpu']['model_name']}" in stdout
    for key in ('inference', 'forward_backward', 'detector_step'):
        r = data[key]
        assert r['fp32'] > 0 and r['bf16'] > 0 and r['rounds'] == 1
        assert r['bf16_over_fp32'] == pytest.approx(r['bf16'] / r['fp32'])  # one round: the paired ratio
    inf = data['inference']
    assert inf['size'] == '64x96' and 0 < inf['max_rel_diff'] < 0.1 and 0 < inf['max_rel_diff_autograd_code'] < 0.1
    assert inf['bf16_autograd_code'] > 0
    step = data['detector_step']
    assert step['speedup'] == pytest.approx(step['fp32'] / step['bf16'])
    assert step['loss_fp32'] > 0 and abs(step['loss_bf16'] - step['loss_fp32']) < 0.1 * step['loss_fp32']
    assert 'MLLA-T inference bf16 / fp32' in stdout and 'Mask R-CNN step speed-up' in stdout
    if not data['cpu']['native_bf16']:
        assert 'warning:' in stdout


def test_benchmark_bf16_bad_size_is_one_clear_error():
    res = run_tool(ROOT / 'tools' / 'benchmark_bf16.py', '--size', '800by1280', timeout=60)
    assert res.returncode == 2 and '--size' in res.stderr and '800by1280' in res.stderr


def test_benchmark_visualizer_times_both_and_pairs_the_ratio(tmp_path):
    """tools/benchmark_visualizer.py: both visualizers timed on the same images, the ratio from those times."""
    import re
    from mlla_mm.datasets import make_coco_shapes
    root = tmp_path / 'shapes'
    make_coco_shapes(str(root), seed=0, num_train=1, num_val=2, size=64)
    out = run_ok(ROOT / 'tools' / 'benchmark_visualizer.py', '--data', root, '--images', '2', '--repeats', '1',
                 '--threads', '1')
    assert re.search(r'CPU: .+; 1 threads; 2 images of val', out)
    mmdet = float(re.search(r"mmdet's DetLocalVisualizer +([0-9.]+) ms per image", out).group(1))
    fast = float(re.search(r'FastDetVisualizer +([0-9.]+) ms per image', out).group(1))
    ratio = float(re.search(r'fast / mmdet \(median of per-round ratios\): ([0-9.]+)', out).group(1))
    assert mmdet > 0 and fast > 0
    assert ratio == pytest.approx(fast / mmdet, rel=0.05, abs=0.002)  # one round: the ratio of the two times


def test_benchmark_visualizer_missing_data_is_one_clear_error(tmp_path):
    res = run_tool(ROOT / 'tools' / 'benchmark_visualizer.py', '--data', tmp_path / 'none', timeout=120)
    assert res.returncode == 2
    assert f"{tmp_path / 'none' / 'annotations' / 'instances_val.json'} not found" in res.stderr
    assert 'Traceback' not in res.stderr


def test_benchmark_visualizer_corrupt_image_is_one_clear_error(tmp_path):
    from mlla_mm.datasets import make_coco_shapes
    root = tmp_path / 'shapes'
    make_coco_shapes(str(root), seed=0, num_train=1, num_val=2, size=64)
    bad = root / 'val' / 'val_00001.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 40)  # a PNG signature and nothing readable after it
    res = run_tool(ROOT / 'tools' / 'benchmark_visualizer.py', '--data', root, '--images', '2', '--repeats', '1',
                   timeout=120)
    assert res.returncode == 2
    # The annotation file's images are checked first (mlla_mm.datasets.checks), as tools/test.py checks them.
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith('error: ')]
    assert len(lines) == 1 and f'{bad} (not an image file)' in lines[0] and 'cannot be read' in lines[0], res.stderr
    assert '--skip-bad-images' not in res.stderr  # this tool has no such option
    assert 'Traceback' not in res.stderr


# --------------------------------------------------------------------------
# Bad input: one ``error:`` line naming the argument or file, exit code 2, no traceback,
# no output file, and nothing measured first (in-process, so each takes a second or two).
# --------------------------------------------------------------------------
benchmark_bf16 = load_tool('benchmark_bf16')
benchmark_visualizer = load_tool('benchmark_visualizer')


def never(*args, **kwargs):
    raise AssertionError('measured although the arguments are bad')


@pytest.fixture
def file_in_the_way(tmp_path):
    """A regular file: a path under it cannot be written."""
    path = tmp_path / 'plain'
    path.write_text('x')
    return path


@pytest.mark.parametrize('argv, name', [
    (['mlla_t', '--threads', '0'], '--threads'),
    (['mlla_t', '--threads', '-2'], '--threads'),
    (['mlla_t', '--shape', '0', '32'], '--shape'),
    (['mlla_t', '--shape', '32', 'x'], '--shape'),
])
def test_get_flops_bad_arguments_are_one_error_line(argv, name, capsys, monkeypatch):
    monkeypatch.setattr(get_flops, 'measure', never)
    assert exit_code(get_flops.main, argv) == 2
    assert_one_error_line(capsys, name)


def test_get_flops_bad_config_or_backbone_name_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(get_flops, 'count_flops', never)
    broken = tmp_path / 'broken_cfg.py'
    broken.write_text('model = dict(\n')
    for target, expected in ((tmp_path / 'nonexist.py', 'neither a config file nor a backbone name'),
                             ('mlla_x', 'mlla_t, mlla_s, mlla_b'),
                             (broken, 'SyntaxError'),
                             (tmp_path, 'is a directory')):
        assert exit_code(get_flops.main, [target]) == 2
        assert expected in assert_one_error_line(capsys, target)


def test_get_flops_json_that_cannot_be_written_fails_before_measuring(tmp_path, file_in_the_way, capsys,
                                                                      monkeypatch):
    monkeypatch.setattr(get_flops, 'measure', never)
    for out in (file_in_the_way / 'x.json', tmp_path):
        assert exit_code(get_flops.main, ['mlla_t', '--shape', '32', '32', '--json', out]) == 2
        assert_one_error_line(capsys, '--json', out)
    assert not (file_in_the_way / 'x.json').exists()


def test_get_flops_json_is_whole_or_absent(tmp_path, monkeypatch, capsys):
    """--json goes through atomic_write: numbers that cannot be written leave no half-written file."""
    monkeypatch.setattr(get_flops, 'report', lambda res: 'report')
    monkeypatch.setattr(get_flops, 'measure', lambda target, shape: dict(target=target, bad=object()))
    out = tmp_path / 'f.json'
    with pytest.raises(TypeError):
        get_flops.main(['mlla_t', '--json', str(out)])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(get_flops, 'measure', lambda target, shape: dict(target=target, macs=1))
    assert get_flops.main(['mlla_t', '--json', str(out)]) == 0
    assert json.loads(out.read_text()) == dict(target='mlla_t', macs=1)
    assert [p.name for p in tmp_path.iterdir()] == ['f.json']


@pytest.mark.parametrize('argv, name', [
    (['--quick', '--threads', '0'], '--threads'),
    (['--threads', '-1'], '--threads'),
    (['--sizes', 'abc'], '--sizes'),
    (['--sizes', '64x64', '0x0'], '--sizes'),
    (['--memory-size', '7'], '--memory-size'),
    (['--detector-size', '96by128'], '--detector-size'),
    (['--repeats', '0'], '--repeats'),
    (['--train-size', '0'], '--train-size'),
    (['--ref-max-pixels', '-1'], '--ref-max-pixels'),
])
def test_benchmark_bad_arguments_are_one_error_line(argv, name, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, 'build_backbone', never)
    assert exit_code(benchmark.main, argv) == 2
    assert_one_error_line(capsys, name)


def test_benchmark_outputs_that_cannot_be_written_fail_before_measuring(tmp_path, file_in_the_way, capsys,
                                                                        monkeypatch):
    monkeypatch.setattr(benchmark, 'build_backbone', never)
    monkeypatch.setattr(benchmark, 'matmul_fn', never)
    for option, out in (('--json', file_in_the_way / 'x.json'), ('--plot', file_in_the_way / 'p.png'),
                        ('--json', tmp_path), ('--plot', tmp_path)):
        assert exit_code(benchmark.main, ['--quick', option, out]) == 2
        assert_one_error_line(capsys, option, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['plain']


def test_benchmark_parse_size_rejects_what_is_not_hxw():
    import argparse
    for text in ('abc', '7', '0x0', '64x-1', 'x64'):
        with pytest.raises(argparse.ArgumentTypeError, match='HxW'):
            benchmark.parse_size(text)
    assert benchmark.size_arg('64X96') == '64x96'


def test_benchmark_bf16_json_that_cannot_be_written_fails_before_measuring(file_in_the_way, capsys, monkeypatch):
    monkeypatch.setattr(benchmark_bf16, 'inference', never)
    out = file_in_the_way / 'x.json'
    assert exit_code(benchmark_bf16.main, ['--quick', '--no-detector', '--json', out]) == 2
    assert_one_error_line(capsys, '--json', out)
    assert not out.exists()


@pytest.mark.parametrize('option', ['--threads', '--repeats', '--batch', '--train-size'])
def test_benchmark_bf16_counts_below_one_are_one_error_line(option, capsys, monkeypatch):
    monkeypatch.setattr(benchmark_bf16, 'inference', never)
    assert exit_code(benchmark_bf16.main, ['--quick', option, '0']) == 2
    assert_one_error_line(capsys, option)


@pytest.mark.parametrize('option', ['--threads', '--images', '--repeats'])
def test_benchmark_visualizer_counts_below_one_are_one_error_line(option, capsys):
    assert exit_code(benchmark_visualizer.main, [option, '0']) == 2
    assert_one_error_line(capsys, option)


def test_benchmark_visualizer_invalid_annotation_json_is_one_error_line(tmp_path, capsys):
    from mlla_mm.datasets import make_coco_shapes
    root = tmp_path / 'shapes'
    make_coco_shapes(str(root), seed=0, num_train=1, num_val=2, size=64)
    ann = root / 'annotations' / 'instances_val.json'
    ann.write_text('{"images": [')
    assert exit_code(benchmark_visualizer.main, ['--data', root, '--images', '1', '--repeats', '1',
                                                 '--threads', '1']) == 2
    assert 'not valid JSON' in assert_one_error_line(capsys, ann)


def test_benchmark_visualizer_annotation_without_mask_is_one_error_line(tmp_path, capsys):
    from mlla_mm.datasets import make_coco_shapes
    root = tmp_path / 'shapes'
    make_coco_shapes(str(root), seed=0, num_train=1, num_val=2, size=64)
    ann = root / 'annotations' / 'instances_val.json'
    data = json.loads(ann.read_text())
    for a in data['annotations']:
        del a['segmentation']
    ann.write_text(json.dumps(data))
    assert exit_code(benchmark_visualizer.main, ['--data', root, '--images', '1', '--repeats', '1',
                                                 '--threads', '1']) == 2
    assert_one_error_line(capsys, ann)
