"""Data checks through the tools: one `error:` line and exit 2, --skip-bad-images, the demo data passes."""
import json
import re
import shutil

import pytest
from mmengine.config import Config

from mlla_mm.datasets.checks import BadImageError, check_data
from tests.helpers import ROOT, error_lines, exit_code, load_tool, run_tool, write_tiny_config


def _copy(tiny_data, tmp_path):
    root = tmp_path / 'shapes'
    shutil.copytree(tiny_data, root)
    return root


def _tool_here(capsys, tool, *args):
    """tools/<tool>.py run in this process (no interpreter start-up, for runs that stop with an error line):
    (exit code, stderr)."""
    code = exit_code(load_tool(tool).main, args)
    return code, capsys.readouterr().err


def test_duplicate_image_id_through_train_tool(tiny_data, tmp_path, capsys):
    root = _copy(tiny_data, tmp_path)
    ann = root / 'annotations' / 'instances_train.json'
    data = json.loads(ann.read_text())
    data['images'][3]['id'] = data['images'][0]['id']
    ann.write_text(json.dumps(data))
    cfg = write_tiny_config(tmp_path, root, epochs=1)
    code, err = _tool_here(capsys, 'train', cfg, '--work-dir', tmp_path / 'w', '--cfg-options', 'synthetic_data=None')
    assert code == 2, err[-3000:]
    assert 'Traceback' not in err
    errors = error_lines(err)
    assert len(errors) == 1 and str(ann) in errors[0] and 'duplicate image ids 1 ' in errors[0]
    assert err.strip().splitlines()[-1] == errors[0]
    assert not list((tmp_path / 'w').rglob('*.pth'))


def test_out_indices_not_matching_the_neck_through_train_tool(tiny_data, tmp_path, capsys):
    cfg = write_tiny_config(tmp_path, tiny_data, epochs=1)
    rc = load_tool('train').main([str(cfg), '--work-dir', str(tmp_path / 'w'),
                                  '--cfg-options', 'model.backbone.out_indices=[1,2,3]'])
    err = capsys.readouterr().err
    assert rc == 2 and 'Traceback' not in err
    errors = error_lines(err)
    assert errors == [f'error: {cfg}: model.neck.in_channels is [16, 32, 64, 128] but the backbone (MLLA, '
                      'out_indices=(1, 2, 3)) returns 3 maps with channels [32, 64, 128]; make them match']


@pytest.mark.slow
def test_skip_bad_images_trains_then_tests(tiny_data, tmp_path, capsys):
    """A truncated training image: an error without the flag; with it, training runs on the rest. (The runs that
    stop with an error line run in this process; those that train and test, as subprocesses.)"""
    root = _copy(tiny_data, tmp_path)
    bad = root / 'train' / 'train_00001.png'
    bad.write_bytes(bad.read_bytes()[:200])
    cfg = write_tiny_config(tmp_path, root, epochs=1)
    work = tmp_path / 'w'
    code, err = _tool_here(capsys, 'train', cfg, '--work-dir', work, '--cfg-options', 'synthetic_data=None')
    assert code == 2 and 'Traceback' not in err
    errors = error_lines(err)
    assert len(errors) == 1 and 'instances_train.json' in errors[0] and str(bad) in errors[0]
    assert '1 of 4 images cannot be read' in errors[0]

    res = run_tool('tools/train.py', cfg, '--work-dir', work, '--skip-bad-images',
                   '--cfg-options', 'synthetic_data=None')
    out = res.stdout + res.stderr
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r'WARNING - .*instances_train\.json: --skip-bad-images leaves out 1 of 4 images: '
                     r'train_00001\.png \(damaged image file', out)
    copy = work / 'data_checks' / 'train_dataloader_instances_train.json'
    assert len(json.loads(copy.read_text())['images']) == 3
    assert (work / 'epoch_1.pth').is_file()

    # The same for evaluation: a bad validation image is left out of the data and of the metric's ground truth.
    bad_val = root / 'val' / 'val_00000.png'
    bad_val.write_bytes(b'')
    code, err = _tool_here(capsys, 'test', cfg, work / 'epoch_1.pth', '--work-dir', tmp_path / 't',
                           '--cfg-options', 'synthetic_data=None')
    assert code == 2 and str(bad_val) in error_lines(err)[0]
    res = run_tool('tools/test.py', cfg, work / 'epoch_1.pth', '--work-dir', tmp_path / 't', '--skip-bad-images',
                   '--cfg-options', 'synthetic_data=None')
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'leaves out 1 of 2 images: val_00000.png (empty file (0 bytes))' in res.stdout + res.stderr
    assert re.search(r'metrics: .*coco/bbox_mAP=', res.stdout)


def _on(cfg, root, loaders):
    for name in loaders:
        cfg[name].dataset.data_root = str(root) + '/'
    return cfg


def test_bundled_demo_data_passes_without_warnings(tiny_data, tmp_path):
    cfg = _on(Config.fromfile(ROOT / 'configs' / 'detection' / 'mask_rcnn_mlla_t_demo.py'), tiny_data,
              ('train_dataloader', 'val_dataloader', 'test_dataloader'))
    cfg.work_dir = str(tmp_path / 'w')
    assert check_data(cfg, ('train_dataloader', 'val_dataloader', 'test_dataloader'), 'demo.py') == []
    assert not (tmp_path / 'w').exists(), 'a clean check writes nothing'


def test_bundled_seg_demo_data_passes_without_warnings(tmp_path):
    from mlla_mm.datasets import make_ade_shapes
    root = make_ade_shapes(str(tmp_path / 'ade'), seed=0, num_train=3, num_val=2, size=32)
    cfg = _on(Config.fromfile(ROOT / 'configs' / 'segmentation' / 'upernet_mlla_t_demo.py'), root,
              ('train_dataloader', 'val_dataloader', 'test_dataloader'))
    assert check_data(cfg, ('train_dataloader', 'val_dataloader'), 'demo.py') == []
    # and the check reads these files: a label removed is found.
    (root / 'annotations' / 'validation' / 'validation_00001.png').unlink()
    with pytest.raises(BadImageError, match=r"validation_00001\.png \(missing\)"):
        check_data(cfg, ('val_dataloader', ), 'demo.py')
