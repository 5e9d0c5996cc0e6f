"""dev/benchmark_visualizer.py: both visualizers timed on the same images; bad data is one error line."""
import json
import re

import pytest

from tests.helpers import ROOT, assert_one_error_line, exit_code, load_dev, run_tool

visualizer = load_dev('benchmark_visualizer')
SCRIPT = ROOT / 'dev' / 'benchmark_visualizer.py'


@pytest.fixture
def shapes(tmp_path):
    """A COCO-format data set of 1 train and 2 val images of 64x64."""
    from mlla_mm.datasets import make_coco_shapes
    root = tmp_path / 'shapes'
    make_coco_shapes(str(root), seed=0, num_train=1, num_val=2, size=64)
    return root


def test_times_both_and_pairs_the_ratio(shapes):
    res = run_tool(SCRIPT, '--data', shapes, '--images', '2', '--repeats', '1', '--threads', '1', timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert re.search(r'CPU: .+; 1 threads; 2 images of val', out)
    mmdet = float(re.search(r"mmdet's DetLocalVisualizer +([0-9.]+) ms per image", out).group(1))
    fast = float(re.search(r'FastDetVisualizer +([0-9.]+) ms per image', out).group(1))
    ratio = float(re.search(r'fast / mmdet \(median of per-round ratios\): ([0-9.]+)', out).group(1))
    assert mmdet > 0 and fast > 0
    assert ratio == pytest.approx(fast / mmdet, rel=0.05, abs=0.002)  # one round: the ratio of the two times


def test_missing_data_is_one_clear_error(tmp_path, capsys):
    assert exit_code(visualizer.main, ['--data', tmp_path / 'none']) == 2
    assert_one_error_line(capsys, tmp_path / 'none' / 'annotations' / 'instances_val.json', 'not found')


def test_corrupt_image_is_one_clear_error(shapes, capsys):
    bad = shapes / 'val' / 'val_00001.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 40)  # a PNG signature and nothing readable after it
    assert exit_code(visualizer.main, ['--data', shapes, '--images', '2', '--repeats', '1']) == 2
    # The annotation file's images are checked first (mlla_mm.datasets.checks), as tools/test.py checks them.
    line = assert_one_error_line(capsys, f'{bad} (not an image file)', 'cannot be read')
    assert '--skip-bad-images' not in line  # this script has no such option


@pytest.mark.parametrize('option', ['--threads', '--images', '--repeats'])
def test_counts_below_one_are_one_error_line(option, capsys):
    assert exit_code(visualizer.main, [option, '0']) == 2
    assert_one_error_line(capsys, option)


def test_invalid_annotation_json_is_one_error_line(shapes, capsys):
    ann = shapes / 'annotations' / 'instances_val.json'
    ann.write_text('{"images": [')
    assert exit_code(visualizer.main, ['--data', shapes, '--images', '1', '--repeats', '1', '--threads', '1']) == 2
    assert 'not valid JSON' in assert_one_error_line(capsys, ann)


def test_annotation_without_mask_is_one_error_line(shapes, capsys):
    ann = shapes / 'annotations' / 'instances_val.json'
    data = json.loads(ann.read_text())
    for a in data['annotations']:
        del a['segmentation']
    ann.write_text(json.dumps(data))
    assert exit_code(visualizer.main, ['--data', shapes, '--images', '1', '--repeats', '1', '--threads', '1']) == 2
    assert_one_error_line(capsys, ann)
