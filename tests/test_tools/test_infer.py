"""tools/infer.py: pictures of the predictions of detection and segmentation checkpoints."""
import shutil

import cv2
import numpy as np
import pytest
import torch

from tests.helpers import load_tool, run_main, save_random_checkpoint, write_tiny_seg_config

infer = load_tool('infer')


pytestmark = pytest.mark.usefixtures('one_thread')  # tiny models


@pytest.fixture(scope='module')
def seg_model(tmp_path_factory):
    from mlla_mm.datasets import make_ade_shapes
    tmp = tmp_path_factory.mktemp('infer_seg')
    data = make_ade_shapes(str(tmp / 'shapes'), seed=0, num_train=2, num_val=3, size=64)
    cfg = write_tiny_seg_config(tmp, data)
    ckpt = save_random_checkpoint(cfg, tmp / 'seg.pth')
    return cfg, ckpt, data / 'images' / 'validation'


def images_with_a_corrupt_one(src, dst):
    """Copy the images of ``src`` into ``dst`` (one in a sub-folder) and add a corrupt PNG."""
    files = sorted(src.iterdir())
    dst.mkdir()
    (dst / 'sub').mkdir()
    shutil.copy(files[0], dst / 'sub' / files[0].name)
    for f in files[1:]:
        shutil.copy(f, dst / f.name)
    (dst / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really an image' * 10)
    return [dst / 'sub' / files[0].name] + [dst / f.name for f in files[1:]]


def check_pictures(inputs, root, out):
    for img in inputs:
        pic = out / img.relative_to(root).with_suffix('.png')
        assert pic.is_file(), pic
        drawn, orig = cv2.imread(str(pic)), cv2.imread(str(img))
        assert drawn.shape == orig.shape
        assert np.abs(drawn.astype(int) - orig.astype(int)).mean() > 1.0, f'{pic} looks like the input'
    assert not (out / 'broken.png').exists()
    assert not list(out.rglob('.*tmp-*')), 'temporary files left behind'


@pytest.mark.parametrize('kind', ['det', 'seg'])
def test_draws_every_image_of_a_folder_and_skips_a_corrupt_one(kind, det_model, seg_model, tmp_path, capsys):
    cfg, ckpt, src = det_model if kind == 'det' else seg_model
    inputs = images_with_a_corrupt_one(src, tmp_path / 'in')
    out = tmp_path / 'out'
    extra = ['--score-thr', '0'] if kind == 'det' else []  # random weights: low scores, draw them all
    code = infer.main([str(cfg), str(ckpt), str(tmp_path / 'in'), '--out', str(out), '--device', 'cpu'] + extra)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    check_pictures(inputs, tmp_path / 'in', out)
    assert f'warning: skipped {tmp_path / "in" / "broken.png"}: not a readable image' in captured.err
    assert f'wrote {len(inputs)} picture(s)' in captured.out and 'skipped 1 unreadable' in captured.out
    assert f'{len(inputs) + 1}/{len(inputs) + 1}' in captured.out  # the progress bar reached the end


def test_single_image_and_same_stem_names(det_model, tmp_path, capsys):
    cfg, ckpt, src = det_model
    first = sorted(src.iterdir())[0]
    (tmp_path / 'in').mkdir()
    shutil.copy(first, tmp_path / 'in' / 'a.png')
    cv2.imwrite(str(tmp_path / 'in' / 'a.jpg'), cv2.imread(str(first)))
    assert infer.main([str(cfg), str(ckpt), str(tmp_path / 'in'), '--out', str(tmp_path / 'o1'),
                       '--score-thr', '0']) == 0
    assert sorted(p.name for p in (tmp_path / 'o1').iterdir()) == ['a.png', 'a_jpg.png']
    assert infer.main([str(cfg), str(ckpt), str(tmp_path / 'in' / 'a.jpg'), '--out', str(tmp_path / 'o2')]) == 0
    assert [p.name for p in (tmp_path / 'o2').iterdir()] == ['a.png']


def test_one_line_errors(det_model, seg_model, tmp_path, capsys):
    cfg, ckpt, src = det_model
    seg_cfg, seg_ckpt, _ = seg_model
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'only_broken').mkdir()
    (tmp_path / 'only_broken' / 'x.jpg').write_bytes(b'garbage')
    cases = [
        ([str(tmp_path / 'nope.py'), str(ckpt), str(src)], 'config file not found'),
        ([str(cfg), str(tmp_path / 'nope.pth'), str(src)], 'weights not found'),
        ([str(cfg), str(ckpt), str(tmp_path / 'nope')], 'image or folder not found'),
        ([str(cfg), str(ckpt), str(tmp_path / 'empty')], 'no images'),
        ([str(cfg), str(ckpt), str(tmp_path / 'only_broken')], 'none of the 1 image(s)'),
        ([str(cfg), str(seg_ckpt), str(src)], f'weights {seg_ckpt} do not fit the model of {cfg}'),
        ([str(seg_cfg), str(ckpt), str(src)], f'weights {ckpt} do not fit the model of {seg_cfg}'),
    ]
    for args, message in cases:
        code = infer.main(args + ['--out', str(tmp_path / 'out')])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (args, err)
        assert err[-1].startswith('error: ') and message in err[-1], err
    assert not (tmp_path / 'out').exists() or not list((tmp_path / 'out').rglob('*.png'))


# --------------------------------------------------------------------------
# Bad arguments: one line, exit 2, before the model is built, nothing written.
# --------------------------------------------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('the model was built although an argument is invalid')

    monkeypatch.setattr(infer, 'build_model', refuse)


def run_infer(capsys, *args):
    """(exit code, non-empty stderr lines) of infer.main; argparse's exit is an exit code too."""
    return run_main(capsys, infer.main, *args)


def test_bad_arguments_are_one_line_before_the_model_is_built(det_model, tmp_path, capsys, monkeypatch, no_model):
    cfg, ckpt, src = det_model
    (tmp_path / 'afile').write_text('x')
    out = tmp_path / 'out'
    cases = [
        (['--cfg-options', 'foo'], ['--cfg-options', "'foo' is not KEY=VALUE"]),
        (['--cfg-options', 'a=[1,2'], ['--cfg-options', 'a=[1,2', 'Imbalanced brackets']),
        (['--device', 'foo'], ['--device foo: not a device']),
        (['--device', 'cuda:99'], ['--device cuda:99']),
        (['--out', tmp_path / 'afile' / 'inf'], [f'--out {tmp_path / "afile" / "inf"}: cannot write there',
                                                 f'{tmp_path / "afile"} is a file, not a directory']),
        (['--out', tmp_path / 'afile'], [f'--out {tmp_path / "afile"}: cannot write there', 'not a directory']),
    ]
    for extra, needles in cases:
        code, lines = run_infer(capsys, cfg, ckpt, src, '--out', out, *extra)  # a second --out wins
        assert code == 2, (extra, lines)
        assert len(lines) == 1 and lines[0].startswith('error: '), (extra, lines)
        assert all(n in lines[0] for n in needles), (extra, lines)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    code, lines = run_infer(capsys, cfg, ckpt, src, '--out', out, '--device', 'cuda')
    assert code == 2 and lines == ['error: --device cuda: no CUDA device on this machine (use --device cpu)']
    assert not out.exists() and (tmp_path / 'afile').read_text() == 'x'


def test_a_directory_as_weights_says_so(det_model, tmp_path, capsys, no_model):
    cfg, _, src = det_model
    code, lines = run_infer(capsys, cfg, tmp_path, src, '--out', tmp_path / 'out')
    assert code == 2 and lines == [f'error: weights {tmp_path} is a directory, not a checkpoint file']
    assert not (tmp_path / 'out').exists()


def test_a_file_in_the_way_of_a_picture_is_refused_before_the_model_is_built(det_model, tmp_path, capsys,
                                                                             no_model):
    cfg, ckpt, src = det_model
    (tmp_path / 'in' / 'sub').mkdir(parents=True)
    shutil.copy(sorted(src.iterdir())[0], tmp_path / 'in' / 'sub' / 'a.png')
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'sub').write_text('in the way')
    code, lines = run_infer(capsys, cfg, ckpt, tmp_path / 'in', '--out', tmp_path / 'out')
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f'error: --out {tmp_path / "out"}: cannot write {tmp_path / "out" / "sub" / "a.png"}')
    assert 'is a file, not a directory' in lines[0]
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['sub']
