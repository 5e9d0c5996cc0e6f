"""Issue 26, round 3: nothing a user owns is deleted or overwritten (synthetic data, tools' outputs).

Each test reproduces a defect of the issue (items 1, 2 and 13) and fails on the code before the fix.
"""
import shutil
import zlib

import cv2
import numpy as np
import pytest
import torch

from mlla_mm.utils.io import distinct_paths, png_signed, written_by_toolkit

from tests.helpers import assert_one_error_line, exit_code, load_tool, png_bytes, write_tiny_config


# --------------------------------------------------------------------------
# Item 1: synthetic_data.root pointing at a folder of one's own.
# --------------------------------------------------------------------------
def _users_folder(path):
    (path / 'annotations').mkdir(parents=True)
    (path / 'annotations' / 'instances_train.json').write_text('{"mine": true}')
    (path / 'photo.jpg').write_bytes(b'my holiday')
    return sorted(p.relative_to(path) for p in path.rglob('*'))


@pytest.mark.parametrize('kind', ['coco', 'ade'])
def test_synthetic_data_never_deletes_a_folder_it_did_not_make(tmp_path, kind):
    from mlla_mm.datasets import make_ade_shapes, make_coco_shapes
    from mlla_mm.datasets.synthetic import ForeignFolderError
    make = make_coco_shapes if kind == 'coco' else make_ade_shapes
    root = tmp_path / 'my_data'
    before = _users_folder(root)
    with pytest.raises(ForeignFolderError, match=str(root)):
        make(str(root), num_train=1, num_val=1, size=32)
    assert sorted(p.relative_to(root) for p in root.rglob('*')) == before
    assert (root / 'photo.jpg').read_bytes() == b'my holiday'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['my_data']  # no temporary folder left beside it


def test_synthetic_data_in_a_foreign_folder_is_one_error_line_from_train(tmp_path, capsys, tiny_data):
    root = tmp_path / 'my_data'
    before = _users_folder(root)
    cfg = write_tiny_config(tmp_path, root, epochs=1)  # the demo config with data_root edited to one's own data
    code = exit_code(load_tool('train').main, [cfg, '--work-dir', tmp_path / 'w'])
    line = assert_one_error_line(capsys, root, 'synthetic_data')
    assert code == 2, line
    assert sorted(p.relative_to(root) for p in root.rglob('*')) == before


def test_synthetic_data_goes_into_an_empty_folder_and_replaces_only_its_own(tmp_path):
    from mlla_mm.datasets import make_coco_shapes
    from mlla_mm.datasets.synthetic import MARKER
    root = tmp_path / 'shapes'
    root.mkdir()
    make_coco_shapes(str(root), num_train=1, num_val=1, size=32)
    assert (root / MARKER).is_file() and (root / 'train' / 'train_00000.png').is_file()
    make_coco_shapes(str(root), num_train=2, num_val=1, size=32)  # other parameters: its own folder is replaced
    assert (root / 'train' / 'train_00001.png').is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['shapes']


# --------------------------------------------------------------------------
# Item 2: distinct output names, and the shared output checks.
# --------------------------------------------------------------------------
def test_distinct_paths_never_gives_two_items_one_name():
    wanted = [['o/a.png'], ['o/a_jpg.png'], ['o/a.png', 'o/a_jpg.png'], ['o/a.png'], ['o/a_2.png']]
    got = distinct_paths(wanted)
    assert len(set(got)) == len(got) == 5
    assert got[:2] == ['o/a.png', 'o/a_jpg.png'] and got[4] == 'o/a_2.png'  # first choices are kept


def test_only_files_the_tools_wrote_count_as_theirs(tmp_path):
    ok, png = cv2.imencode('.png', np.zeros((4, 4, 3), np.uint8))
    (tmp_path / 'ours.png').write_bytes(png_signed(png.tobytes()))
    (tmp_path / 'theirs.png').write_bytes(png.tobytes())
    assert written_by_toolkit(str(tmp_path / 'ours.png')) and not written_by_toolkit(str(tmp_path / 'theirs.png'))
    assert cv2.imread(str(tmp_path / 'ours.png')).shape == (4, 4, 3)  # the signed PNG still decodes


def test_output_checks_see_links_and_stay_linear_in_the_number_of_files(tmp_path):
    import os
    import time

    from mlla_mm.utils.io import OutputPathError, check_outputs
    weights = tmp_path / 'W.pth'
    weights.write_bytes(b'weights')
    os.link(weights, tmp_path / 'hard.png')
    os.symlink(weights, tmp_path / 'soft.png')
    for out in ('hard.png', 'soft.png'):
        with pytest.raises(OutputPathError, match=f'also an input .*{weights}'):
            check_outputs([str(tmp_path / out)], [str(weights)], force=True)
    inputs = [str(tmp_path / 'in' / f'{i}.jpg') for i in range(5000)]
    start = time.perf_counter()
    check_outputs([str(tmp_path / 'out' / f'{i}.png') for i in range(5000)], inputs)  # a big folder
    assert time.perf_counter() - start < 10  # one look-up per output (all pairs: minutes)


# ---- tools/infer.py ----------------------------------------------------------
infer = load_tool('infer')


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('the model was built although the outputs are refused')

    monkeypatch.setattr(infer, 'build_model', refuse)


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_infer_never_writes_over_its_input_images(det_model, tmp_path, capsys, no_model):
    cfg, ckpt, src = det_model
    imgs = tmp_path / 'imgs'
    shutil.copytree(src, imgs)
    before = _snapshot(imgs)
    for extra in ([], ['--force']):  # an input is never overwritten, --force or not
        code = exit_code(infer.main, [cfg, ckpt, imgs, '--out', imgs, *extra])
        line = assert_one_error_line(capsys, '--out', imgs, 'also an input')
        assert code == 2, line
        assert _snapshot(imgs) == before


def test_infer_never_writes_over_the_weights_or_config(det_model, tmp_path, capsys, no_model):
    cfg, _, src = det_model
    out = tmp_path / 'out'
    out.mkdir()
    weights = out / 'a.png'  # weights that happen to sit where the picture of a.png goes
    shutil.copy(det_model[1], weights)
    (tmp_path / 'in').mkdir()
    shutil.copy(sorted(src.iterdir())[0], tmp_path / 'in' / 'a.png')
    data = weights.read_bytes()
    code = exit_code(infer.main, [cfg, weights, tmp_path / 'in', '--out', out, '--force'])
    assert_one_error_line(capsys, 'also an input', weights)
    assert code == 2 and weights.read_bytes() == data


def _input_and_a_foreign_picture(tmp_path, src):
    """``tmp_path/in`` holding the first picture of ``src`` as a.png, and ``tmp_path/out`` (returned) holding an
    a.png of the user's."""
    (tmp_path / 'in').mkdir()
    shutil.copy(sorted(src.iterdir())[0], tmp_path / 'in' / 'a.png')
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'a.png').write_bytes(b'a picture of my own')
    return out


def test_infer_keeps_a_foreign_file_unless_forced(det_model, tmp_path, capsys, no_model):
    cfg, ckpt, src = det_model
    out = _input_and_a_foreign_picture(tmp_path, src)
    code = exit_code(infer.main, [cfg, ckpt, tmp_path / 'in', '--out', out])
    assert_one_error_line(capsys, out / 'a.png', 'not written by mlla-mm', '--force')
    assert code == 2 and (out / 'a.png').read_bytes() == b'a picture of my own'


@pytest.mark.slow  # two inference runs
def test_infer_force_replaces_a_foreign_file_and_its_own_pictures_are_rewritten(det_model, tmp_path, capsys):
    cfg, ckpt, src = det_model
    out = _input_and_a_foreign_picture(tmp_path, src)
    assert exit_code(infer.main, [cfg, ckpt, tmp_path / 'in', '--out', out, '--force']) == 0
    assert written_by_toolkit(str(out / 'a.png'))
    assert exit_code(infer.main, [cfg, ckpt, tmp_path / 'in', '--out', out]) == 0  # its own picture: rewritten


def test_infer_output_names_never_collide(tmp_path):
    from pathlib import Path
    images = [tmp_path / n for n in ('a.jpg', 'a_jpg.png', 'a.png', 'sub/a.png', 'b.JPG', 'b.jpg')]
    targets = infer.output_paths(images, tmp_path, Path('out'))
    assert len(set(targets.values())) == len(images), targets
    assert targets[tmp_path / 'a.png'] == Path('out/a.png') and targets[tmp_path / 'a_jpg.png'] == Path('out/a_jpg.png')
    assert targets[tmp_path / 'sub/a.png'] == Path('out/sub/a.png')


@pytest.mark.slow  # draws three pictures
def test_infer_colliding_names_give_one_picture_each(det_model, tmp_path, capsys):
    cfg, ckpt, src = det_model
    first = cv2.imread(str(sorted(src.iterdir())[0]))
    (tmp_path / 'in').mkdir()
    for name, img in [('a.png', first), ('a_jpg.png', first[::-1]), ('a.jpg', first[:, ::-1])]:
        cv2.imwrite(str(tmp_path / 'in' / name), img)
    out = tmp_path / 'out'
    assert exit_code(infer.main, [cfg, ckpt, tmp_path / 'in', '--out', out, '--score-thr', '0']) == 0
    assert 'wrote 3 picture(s)' in capsys.readouterr().out
    pictures = sorted(out.iterdir())
    assert len(pictures) == 3, pictures
    assert len({p.read_bytes() for p in pictures}) == 3  # three different pictures, none written over another


# ---- item 13: an image too large to decode -----------------------------------
def _png_header_only(path, width, height):
    """A PNG whose header says width x height (what a 746 KB 16000x16000 PNG shows before decoding)."""
    path.write_bytes(png_bytes(width, height, zlib.compress(b'\x00' * 64)))


def test_infer_skips_an_image_over_max_pixels_before_decoding_it(det_model, tmp_path, capsys, monkeypatch):
    cfg, ckpt, src = det_model
    (tmp_path / 'in').mkdir()
    for f in sorted(src.iterdir())[:2]:
        shutil.copy(f, tmp_path / 'in' / f.name)
    _png_header_only(tmp_path / 'in' / 'huge.png', 16000, 16000)
    big = np.zeros((120, 100, 3), np.uint8)
    cv2.imwrite(str(tmp_path / 'in' / 'big.png'), big)
    decoded = []
    real_read = infer.read_image
    monkeypatch.setattr(infer, 'read_image', lambda p: decoded.append(p.name) or real_read(p))
    out = tmp_path / 'out'
    code = exit_code(infer.main, [cfg, ckpt, tmp_path / 'in', '--out', out, '--max-pixels', 10000])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert 'huge.png' not in decoded and 'big.png' not in decoded  # refused from the header alone
    for name, size in [('huge.png', '16000x16000'), ('big.png', '100x120')]:
        assert f'warning: skipped {tmp_path / "in" / name}: {size}' in captured.err
        assert 'over --max-pixels 10,000' in captured.err
    assert 'wrote 2 picture(s)' in captured.out and 'skipped 2' in captured.out
    assert sorted(p.name for p in out.iterdir()) == sorted(f.name for f in sorted(src.iterdir())[:2])


def test_infer_max_pixels_default_keeps_a_large_ordinary_photo(tmp_path):
    img = tmp_path / 'photo.png'
    _png_header_only(img, 6000, 4000)  # 24 MP: a camera's photo is drawn with the default bound
    assert infer.too_large(img, infer.DEFAULT_MAX_PIXELS) == ''
    assert 'over --max-pixels' in infer.too_large(img, 20_000_000)


# ---- tools/classify.py -------------------------------------------------------
classify = load_tool('classify')
TINY_KWARGS = ['embed_dim=16', 'depths=(1,1,1,1)', 'num_heads=(1,2,2,4)']


@pytest.fixture(scope='module')
def cls_setup(tmp_path_factory):
    import timm
    from PIL import Image

    import mlla_mm  # noqa: F401  (registers the timm models)
    root = tmp_path_factory.mktemp('round3_cls')
    torch.manual_seed(0)
    model = timm.create_model('mlla_tiny', embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)).eval()
    weights = root / 'tiny_cls.pth'
    torch.save({'model': model.state_dict()}, weights)
    rng = np.random.default_rng(0)
    images = []
    for folder in ('a', 'b'):
        path = root / folder / 'x.jpg'
        path.parent.mkdir()
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return weights, images


def test_classify_never_writes_over_its_weights(cls_setup, tmp_path, capsys, monkeypatch):
    weights, images = cls_setup
    copy = tmp_path / 'W.pth'
    shutil.copy(weights, copy)
    data = copy.read_bytes()
    monkeypatch.setattr(classify, 'build_classifier', lambda *a, **k: pytest.fail('model built'))
    for extra in ([], ['--force']):
        code = exit_code(classify.main, [images[0], '--weights', copy, '--out', copy, *extra])
        assert_one_error_line(capsys, '--out', copy, 'also an input')
        assert code == 2 and copy.read_bytes() == data


def test_classify_show_dir_keeps_both_pictures_of_two_same_named_images(cls_setup, tmp_path, capsys):
    weights, images = cls_setup
    show = tmp_path / 'show'
    code = exit_code(classify.main, [*images, '--weights', weights, '--model-kwargs', *TINY_KWARGS,
                                     '--show-dir', show, '--out', tmp_path / 'res.json'])
    assert code == 0, capsys.readouterr().err
    pictures = sorted(p.name for p in show.iterdir())
    assert pictures == ['x_top5.png', 'x_top5_2.png']
    assert written_by_toolkit(str(show / 'x_top5.png')) and written_by_toolkit(str(tmp_path / 'res.json'))
    # run again: its own files are rewritten; a foreign file in the way is kept without --force
    assert exit_code(classify.main, [*images, '--weights', weights, '--model-kwargs', *TINY_KWARGS,
                                     '--show-dir', show, '--out', tmp_path / 'res.json']) == 0
    (show / 'x_top5_2.png').write_bytes(b'mine')
    capsys.readouterr()
    code = exit_code(classify.main, [*images, '--weights', weights, '--model-kwargs', *TINY_KWARGS,
                                     '--show-dir', show])
    assert_one_error_line(capsys, show / 'x_top5_2.png', '--force')
    assert code == 2 and (show / 'x_top5_2.png').read_bytes() == b'mine'


# ---- tools/export_onnx.py ----------------------------------------------------
export_onnx = load_tool('export_onnx')


@pytest.fixture
def no_export(monkeypatch):
    from mlla_mm.deploy import onnx_export
    monkeypatch.setattr(onnx_export, 'build_target', lambda *a, **k: pytest.fail('a model was built'))
    monkeypatch.setattr(onnx_export, 'require', lambda *a: None)


def test_export_onnx_never_writes_over_its_weights_or_config(tmp_path, capsys, no_export):
    weights = tmp_path / 'W.pth'
    torch.save({'state_dict': {}}, weights)
    data = weights.read_bytes()
    for extra in ([], ['--force']):
        code = exit_code(export_onnx.main, ['mlla_t', weights, '--out', weights, *extra])
        assert_one_error_line(capsys, '--out', weights, 'also an input')
        assert code == 2 and weights.read_bytes() == data
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("model = dict(type='mlla_mm.MLLA')\n")
    code = exit_code(export_onnx.main, [cfg, '--out', cfg, '--force'])
    assert_one_error_line(capsys, '--out', cfg, 'also an input')
    assert code == 2 and cfg.read_text() == "model = dict(type='mlla_mm.MLLA')\n"


def test_export_onnx_keeps_a_foreign_file_unless_forced(tmp_path, capsys, no_export):
    out = tmp_path / 'model.onnx'
    out.write_bytes(b'somebody else\'s model')
    code = exit_code(export_onnx.main, ['mlla_t', '--out', out, '--shape', '32', '32'])
    assert_one_error_line(capsys, out, 'not written by mlla-mm', '--force')
    assert code == 2 and out.read_bytes() == b'somebody else\'s model'
    with pytest.raises(pytest.fail.Exception, match='a model was built'):  # --force: on to the export
        export_onnx.main(['mlla_t', '--out', str(out), '--shape', '32', '32', '--force'])
