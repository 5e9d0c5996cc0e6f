"""tools/benchmark.py: one tool, subcommands all/backbone/detector/train/onnx/bf16 sharing mlla_mm.utils.timing.

Quick runs (tiny sizes) check that each subcommand measures what it says and prints ratios against the peers it
ran, never verdicts; bad input is one ``error:`` line, exit code 2, before anything is measured.
"""
import json
import re
import sys

import pytest

from tests.helpers import ROOT, assert_one_error_line, exit_code, load_tool, run_tool

benchmark = load_tool('benchmark')
TOOL = ROOT / 'tools' / 'benchmark.py'


def run_ok(*args, timeout=300):
    """Run the tool, require success, return its stdout."""
    res = run_tool(TOOL, *args, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert 'PASS' not in res.stdout and 'FAIL' not in res.stdout  # measured ratios, not the project's targets
    return res.stdout, res.stderr


def cpu_line_of(stdout):
    """The first line names the CPU and its bf16 / VNNI / AMX support (mlla_mm.utils.cpu)."""
    from mlla_mm.utils.cpu import cpu_line
    first = stdout.splitlines()[0]
    assert first.startswith(f'# {cpu_line()}; '), first
    return first


def test_default_is_all_backbone_and_detector_with_json_and_plot(tmp_path):
    """No subcommand (what `make benchmark` runs): backbones, then the whole detector; ratios with their rounds."""
    out_json, out_png = tmp_path / 'b.json', tmp_path / 'b.png'
    stdout, _ = run_ok('--quick', '--threads', '1', '--no-train', '--sizes', '64x96', '256x256', '--repeats', '2',
                       '--train-repeats', '1', '--json', out_json, '--plot', out_png)
    cpu_line_of(stdout)
    data = json.loads(out_json.read_text())
    assert data['command'] == 'all' and out_png.read_bytes()[:4] == b'\x89PNG' and out_png.stat().st_size > 1000
    assert set(data['latency']) == {'mlla_t', 'mlla_t_ref'}
    for name, rows in data['latency'].items():
        assert set(rows) == {'64x96', '256x256'}
        for r in rows.values():
            assert 0 < r['min'] <= r['median'] <= r['max'] and r['n'] == 2
            assert r['images_per_s'] == pytest.approx(1 / r['median'])
        if sys.platform.startswith('linux'):  # inference peak memory grows with the input
            assert rows['256x256']['peak_mib'] > max(1.0, rows['64x96']['peak_mib'])
    ratios, rounds = data['ratios'], data['round_ratios']
    # MLLA-T against the peer it ran, per size: the median of the per-round ratios, printed with their range.
    for size in ('64x96', '256x256'):
        key = f'mlla_t_over_mlla_t_ref_{size}'
        assert len(rounds[key]) == 2 and min(rounds[key]) <= ratios[key] <= max(rounds[key])
        assert re.search(rf'MLLA-T / MLLA-T reference latency at {size} +{ratios[key]:.3f} \(rounds '
                         rf'{min(rounds[key]):.3f}-{max(rounds[key]):.3f}\)', stdout), stdout
    assert ratios['mlla_t_flops_size'] == '256x256' and 0 < ratios['flops_fraction_of_matmul']
    mem = data['memory']
    assert ratios['with_cp_memory_ratio'] == pytest.approx(mem['with_cp'] / mem['no_cp'])
    assert re.search(r'^# estimated run time: about (<1|\d+) min', stdout, re.M), stdout[:2000]
    det = data['detector_inference']  # on by default in `all`; 96x128 with --quick
    assert det['size'] == '96x128' and 'train' not in data
    assert (det['proposals'], det['detections']) == (100, 20)  # --quick: less head work, the same code
    for kind in ('mlla_t', 'swin_t'):
        assert set(det['parts'][kind]) == {'backbone', 'neck', 'rpn_head', 'roi_head'}
        assert 0 < sum(det['parts'][kind].values()) < det[kind]['max']
    key = 'detector_inference_mlla_t_over_swin_t'  # --train-repeats 1: one round, its ratio
    assert len(rounds[key]) == det['mlla_t']['n'] == 1
    assert ratios[key] == pytest.approx(det['mlla_t']['median'] / det['swin_t']['median'])
    assert re.search(rf'Mask R-CNN inference MLLA-T / Swin-T +{ratios[key]:.3f}$', stdout, re.M), stdout


@pytest.mark.slow  # two Mask R-CNN train iterations per round, about 10 s each on a loaded 2-core machine
def test_train_subcommand_times_both_detectors_in_the_same_rounds(tmp_path):
    out = tmp_path / 't.json'
    stdout, _ = run_ok('train', '--quick', '--threads', '1', '--repeats', '2', '--json', out)
    data = json.loads(out.read_text())
    assert data['command'] == 'train' and data['train']['size'] == 128 and 'latency' not in data
    assert data['train']['mlla_t']['n'] == data['train']['swin_t']['n'] == 2
    rounds = data['round_ratios']['train_mlla_t_over_swin_t']
    assert len(rounds) == 2 and data['ratios']['train_mlla_t_over_swin_t'] == pytest.approx(sorted(rounds)[0] / 2
                                                                                            + sorted(rounds)[1] / 2)
    assert 'Mask R-CNN train iteration MLLA-T / Swin-T' in stdout


def test_bf16_subcommand_pairs_fp32_and_bf16(tmp_path):
    """Three fp32/bf16 pairs, ratios consistent with the times, the CPU named; a warning only without native bf16."""
    out = tmp_path / 'bf16.json'
    stdout, stderr = run_ok('bf16', '--quick', '--threads', '1', '--json', out)
    cpu_line_of(stdout)
    data = json.loads(out.read_text())
    for key in ('inference', 'forward_backward', 'detector_step'):
        r = data[key]
        assert r['fp32'] > 0 and r['bf16'] > 0 and r['rounds'] == 1
        assert r['bf16_over_fp32'] == pytest.approx(r['bf16'] / r['fp32'])  # one round: the paired ratio
    inf = data['inference']
    assert inf['size'] == '64x96' and 0 < inf['max_rel_diff'] < 0.1 and 0 < inf['max_rel_diff_autograd_code'] < 0.1
    step = data['detector_step']
    assert step['size'] == '1x64x64'  # --quick: one image per training step
    assert step['speedup'] == pytest.approx(step['fp32'] / step['bf16'])
    assert step['loss_fp32'] > 0 and abs(step['loss_bf16'] - step['loss_fp32']) < 0.1 * step['loss_fp32']
    assert re.search(rf"MLLA-T inference +{inf['bf16_over_fp32']:.3f}$", stdout, re.M), stdout
    assert 'Mask R-CNN training step' in stdout
    assert ('warning:' in stderr) != data['cpu']['native_bf16']


@pytest.mark.slow
def test_onnx_subcommand_fp32_and_int8_against_eager(tmp_path):
    out = tmp_path / 'onnx.json'
    stdout, _ = run_ok('onnx', '--quick', '--models', 'mlla_t', 'swin_t', '--levels', 'all', 'disable', '--threads',
                       '1', '--int8', '--repeats', '2', '--json', out, timeout=600)
    assert cpu_line_of(stdout).endswith(f"onnxruntime {json.loads(out.read_text())['onnxruntime']}")
    data = json.loads(out.read_text())
    assert set(data['latency']) == {'mlla_t:torch', 'mlla_t:ort-all', 'mlla_t:ort-disable', 'mlla_t:ort-int8-all',
                                    'swin_t:torch', 'swin_t:ort-all'}  # Swin-T: its first level, no INT8
    for row in data['latency'].values():
        assert 0 < row['min'] <= row['median'] <= row['max'] and row['n'] == 2
    assert data['latency']['mlla_t:torch']['over_torch'] == pytest.approx(1.0)
    for run in ('ort-all', 'ort-int8-all'):
        rounds = data['round_ratios'][f'mlla_t:{run}_over_torch']
        assert data['ratios'][f'mlla_t:{run}_over_torch'] == pytest.approx(sum(rounds) / 2)
        assert data['latency'][f'mlla_t:{run}']['over_torch'] == pytest.approx(sum(rounds) / 2)
    assert 'mlla_t_int8_over_ort_fp32' in data['ratios'] and 'MLLA-T INT8 / fp32, both ONNX Runtime' in stdout
    for key, num, den in (('mlla_over_swin_torch', 'mlla_t:torch', 'swin_t:torch'),
                          ('mlla_over_swin_ort', 'mlla_t:ort-all', 'swin_t:ort-all')):  # the same rounds
        assert len(data['round_ratios'][key]) == 2 and data['ratios'][key] > 0
    assert data['models']['swin_t']['max_rel_diff'] < 1e-4 and not data['models']['swin_t']['dynamic']
    model = data['models']['mlla_t']
    assert model['max_rel_diff'] < 1e-4 and model['dynamic']
    assert model['int8_mib'] < 0.5 * model['onnx_mib']  # int8 weights
    assert 1e-4 < model['int8_max_rel_diff'] < 0.5  # quantized, not fp32, yet related


@pytest.mark.slow
def test_onnx_subcommand_whole_detector_eager_fp32_int8_in_the_same_rounds(tmp_path):
    """The whole Mask R-CNN: mmdet's test_step against ONNX Runtime fp32 and INT8 (pre/post-processing included),
    one round, the ratios computed from the three timings, and every call's detections equal (the same work)."""
    out = tmp_path / 'det.json'
    stdout, _ = run_ok('onnx', '--quick', '--models', 'mask_rcnn_mlla_t', '--int8', '--threads', '1', '--json', out,
                       timeout=600)
    cpu_line_of(stdout)
    data = json.loads(out.read_text())
    runs = ('torch', 'ort-all', 'ort-int8-all')
    lat = {run: data['latency'][f'mask_rcnn_mlla_t:{run}'] for run in runs}
    assert set(data['latency']) == {f'mask_rcnn_mlla_t:{run}' for run in runs} and data['detector_size'] == '64x96'
    for row in lat.values():
        assert row['n'] == 1 and row['median'] > 0
    for run in runs[1:]:  # one round: the ratio is that round's
        assert data['ratios'][f'mask_rcnn_mlla_t:{run}_over_torch'] == pytest.approx(
            lat[run]['median'] / lat['torch']['median'])
    int8_over_fp32 = data['ratios']['mask_rcnn_mlla_t_int8_over_ort_fp32']
    assert int8_over_fp32 == pytest.approx(lat['ort-int8-all']['median'] / lat['ort-all']['median'])
    assert re.search(rf'Mask R-CNN MLLA-T INT8 / fp32, both ONNX Runtime +{int8_over_fp32:.3f}$', stdout, re.M)
    model = data['models']['mask_rcnn_mlla_t']
    cfg = model['test_cfg']
    assert cfg['score_thr'] == 0 < cfg['config_score_thr'] and model['size'] == model['input_size'] == '64x96'
    # the same work: every call of every run (warm-up and round) found max_per_img detections
    assert model['detections'] == {f'mask_rcnn_mlla_t:{run}': [cfg['max_per_img']] * 2 for run in runs}
    assert re.search(rf"detections per image, every call: torch {cfg['max_per_img']}, ort-all {cfg['max_per_img']}, "
                     rf"ort-int8-all {cfg['max_per_img']} \(score_thr 0 instead of the config's", stdout), stdout
    assert model['max_rel_diff'] < 1e-3 and model['dynamic']  # fp32: the same detections as PyTorch
    from mlla_mm.models.ops import fast_inference_default
    assert model['fast_inference'] is fast_inference_default()  # eager as the config builds it (env override)
    assert model['int8_mib'] < 0.5 * model['onnx_mib']

# --------------------------------------------------------------------------
# The command line: the default subcommand, helpers, and bad input (in-process, a second or two each).
# --------------------------------------------------------------------------
def test_no_subcommand_is_all_and_keeps_the_old_options():
    args = benchmark.parse_args([])
    assert args.command == 'all' and args.do_backbone and args.do_train and args.do_detector
    assert args.sizes == ['512x512', '800x1280', '1024x1024', '2048x2048'] and args.repeats == 5
    args = benchmark.parse_args(['--threads', '2', '--no-train', '--no-detector', '--models', 'mlla_t', 'swin_t'])
    assert args.command == 'all' and not args.do_train and not args.do_detector and args.models == ['mlla_t', 'swin_t']
    args = benchmark.parse_args(['detector', '--size', '64x80', '--repeats', '3'])
    assert (args.do_backbone, args.do_train, args.do_detector) == (False, False, True)
    assert args.detector_size == '64x80' and args.train_repeats == 3
    assert benchmark.parse_args(['backbone']).do_detector is False
    make = (ROOT / 'Makefile').read_text()
    assert re.search(r'^\t\$\(PY\) tools/benchmark\.py$', make, re.M)  # `make benchmark`: the default


def test_onnx_times_backbone_detector_and_upernet_at_the_issue_sizes():
    args = benchmark.parse_args(['onnx'])
    assert args.models == ['mlla_t', 'swin_t', 'upernet_mlla_t', 'mask_rcnn_mlla_t'] and not args.int8
    assert (args.backbone_size, args.detector_size, args.seg_size) == ('800x1280', '800x1333', '512x512')
    args = benchmark.parse_args(['onnx', '--quick', '--detector-size', '800x1333'])
    assert (args.backbone_size, args.detector_size, args.seg_size, args.repeats) == ('64x96', '64x96', '64x64', 1)
    assert [benchmark.onnx_size(n, args) for n in args.models] == [(64, 96), (64, 96), (64, 64), (64, 96)]

def test_slope_and_parse_size():
    import argparse
    assert benchmark.slope([(1e4, 0.1), (4e4, 0.4), (16e4, 1.6)]) == pytest.approx(1.0)
    assert benchmark.slope([(1e4, 0.1), (4e4, 1.6)]) == pytest.approx(2.0)
    assert benchmark.parse_size('800x1280') == (800, 1280) and benchmark.size_arg('64X96') == '64x96'
    for text in ('abc', '7', '0x0', '64x-1', 'x64'):
        with pytest.raises(argparse.ArgumentTypeError, match='HxW'):
            benchmark.parse_size(text)


def never(*args, **kwargs):
    raise AssertionError('measured although the arguments are bad')


@pytest.fixture
def nothing_measured(monkeypatch):
    for name in ('build_backbone', 'matmul_fn', 'train_iteration_times', 'detector_inference_times', 'onnx_target',
                 'bf16_inference', 'print_estimate'):
        monkeypatch.setattr(benchmark, name, never)


@pytest.mark.parametrize('argv, name', [
    (['--quick', '--threads', '0'], '--threads'),
    (['--threads', '-1'], '--threads'),
    (['--sizes', 'abc'], '--sizes'),
    (['backbone', '--sizes', '64x64', '0x0'], '--sizes'),
    (['--memory-size', '7'], '--memory-size'),
    (['--detector-size', '96by128'], '--detector-size'),
    (['--repeats', '0'], '--repeats'),
    (['--train-size', '0'], '--train-size'),
    (['--quick', '--train-repeats', '0'], '--train-repeats must be at least 1, got 0'),
    (['--ref-max-pixels', '-1'], '--ref-max-pixels'),
    (['--models', 'mlla_x'], "invalid choice: 'mlla_x'"),
    (['detector', '--size', '96by128'], '--size'),
    (['train', '--size', '0'], '--size'),
    (['bf16', '--size', '800by1280'], '800by1280'),
    (['bf16', '--batch', '0'], '--batch'),
    (['onnx', '--backbone-size', '0x64'], '--backbone-size'),
    (['onnx', '--seg-size', '64'], '--seg-size'),
    (['onnx', '--detector-size', '800'], '--detector-size'),
    (['onnx', '--models', 'mask_rcnn_mlla_x'], "invalid choice: 'mask_rcnn_mlla_x'"),
    (['onnx', '--calib-dir', 'x'], '--calib-dir needs --int8'),
    (['onnx', '--int8', '--calib-dir', 'MISSING'], 'not a directory'),
    (['nosuch', '--quick'], 'nosuch'),
])
def test_bad_arguments_are_one_error_line(argv, name, capsys, nothing_measured, tmp_path):
    argv = [str(tmp_path / 'missing') if a == 'MISSING' else a for a in argv]
    assert exit_code(benchmark.main, argv) == 2
    assert_one_error_line(capsys, name)


@pytest.mark.parametrize('command', [[], ['backbone'], ['detector'], ['onnx', '--models', 'mlla_t'], ['bf16']])
def test_outputs_that_cannot_be_written_fail_before_measuring(command, tmp_path, capsys, nothing_measured):
    plain = tmp_path / 'plain'
    plain.write_text('x')
    outputs = [('--json', plain / 'x.json'), ('--json', tmp_path)]
    if command in ([], ['backbone']):
        outputs += [('--plot', plain / 'p.png'), ('--plot', tmp_path)]
    for option, out in outputs:
        assert exit_code(benchmark.main, command + ['--quick', option, out]) == 2
        assert_one_error_line(capsys, option, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['plain']
