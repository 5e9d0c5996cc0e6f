"""tools/classify.py: top-5 of images, ImageFolder evaluation, clear errors on bad input."""
import json
import os
import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

import mlla_mm  # noqa: F401  (registers the timm models)
from tests.helpers import load_tool, run_tool

TINY_KWARGS = ['embed_dim=16', 'depths=(1,1,1,1)', 'num_heads=(1,2,2,4)']
SIZES = [(40, 52), (37, 37), (64, 30), (50, 50), (33, 71), (45, 40)]


@pytest.fixture(scope='module')
def tool():
    return load_tool('classify')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A tiny 1000-class model with a saved checkpoint, six random images and their logits."""
    root = tmp_path_factory.mktemp('classify')
    torch.manual_seed(0)
    model = timm.create_model('mlla_tiny', embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)).eval()
    with torch.no_grad():  # a livelier head than the 0.02-std init, so the top classes are well apart
        model.head.weight.normal_(0, 1)
    weights = root / 'tiny_cls.pth'
    torch.save({'model': model.state_dict(), 'epoch': 1}, weights)
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate(SIZES):
        path = root / 'loose' / f'img{i}.png'
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(path)
    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.no_grad():
        logits = torch.cat([model(transform(Image.open(p).convert('RGB')).unsqueeze(0)) for p in images])
    return dict(root=root, model=model, weights=weights, images=images, logits=logits)


def run(tool, capsys, *args):
    rc = tool.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_images_print_the_top5_and_draw_them(tool, setup, capsys, tmp_path):
    info = ImageNetInfo()
    images = setup['images'][:2]
    rc, out, err = run(tool, capsys, *images, '--weights', setup['weights'], '--model-kwargs', *TINY_KWARGS,
                       '--show-dir', tmp_path / 'vis', '--out', tmp_path / 'res.json')
    assert rc == 0, err
    probs = setup['logits'][:2].softmax(-1)
    for n, path in enumerate(images):
        block = out.split(str(path) + '\n')[1]
        lines = [ln.strip() for ln in block.splitlines() if re.match(r'\s+\d\. ', ln)][:5]
        top = probs[n].topk(5)
        for rank, (line, p, i) in enumerate(zip(lines, top.values.tolist(), top.indices.tolist()), 1):
            assert line == f'{rank}. {p:.4f}  {i:4d} {info.index_to_label_name(i)}  {info.index_to_description(i)}'
        drawn = tmp_path / 'vis' / f'{path.stem}_top5.png'
        assert f'drawn: {drawn}' in out
        pic = Image.open(drawn)
        src = Image.open(path)
        assert pic.width == 320 and pic.height > round(src.height * 320 / src.width)
        panel = np.asarray(pic)[round(src.height * 320 / src.width) + 2:]
        assert (panel < 128).any() and (panel == 255).mean() > 0.5  # dark text on the white panel
    res = json.loads((tmp_path / 'res.json').read_text())
    assert [t['index'] for t in res['images'][1]['top']] == probs[1].topk(5).indices.tolist()


def _make_folder(root, setup, names):
    for path, name in zip(setup['images'], names):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / path.name).write_bytes(path.read_bytes())
    return root


def test_folder_evaluation_matches_a_direct_computation(tool, setup, capsys, tmp_path):
    info = ImageNetInfo()
    logits = setup['logits']
    order = logits.argsort(dim=-1, descending=True)
    # two images labelled with their top-1 class, two with their third, two with their least likely
    labels = [order[0, 0], order[1, 0], order[2, 2], order[3, 2], order[4, -1], order[5, -1]]
    labels = [int(v) for v in labels]
    data = _make_folder(tmp_path / 'val', setup, [info.index_to_label_name(i) for i in labels])
    rc, out, err = run(tool, capsys, '--data-dir', data, '--weights', setup['weights'], '--model-kwargs',
                       *TINY_KWARGS, '--workers', '1', '--batch-size', '4', '--out', tmp_path / 'res.json')
    assert rc == 0, err
    target = torch.tensor(labels)
    top5 = logits.topk(5, dim=-1).indices
    correct1 = int((top5[:, 0] == target).sum())
    correct5 = int((top5 == target[:, None]).any(dim=1).sum())
    assert (correct1, correct5) == (2, 4)  # by construction
    assert f'top-1 accuracy: {100 * correct1 / 6:.2f}% ({correct1}/6)' in out
    assert f'top-5 accuracy: {100 * correct5 / 6:.2f}% ({correct5}/6)' in out
    assert '100%' in err or '6/6' in err  # the progress bar
    res = json.loads((tmp_path / 'res.json').read_text())
    assert (res['correct1'], res['correct5'], res['images']) == (2, 4, 6)


def test_folder_named_by_class_index(tool, setup, capsys, tmp_path):
    top1 = setup['logits'].argmax(-1).tolist()
    names = [str(top1[0])] * 3 + ['999'] * 3
    data = _make_folder(tmp_path / 'val', setup, names)
    rc, out, err = run(tool, capsys, '--data-dir', data, '--weights', setup['weights'], '--model-kwargs',
                       *TINY_KWARGS, '--workers', '0')
    assert rc == 0, err
    expected = sum(1 for i, t in enumerate(top1) if t == int(names[i]))
    assert expected >= 1
    assert f'({expected}/6)' in out.split('top-1 accuracy:')[1].splitlines()[0]


def _evil(tmp_path, marker):
    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}', ))

    path = tmp_path / 'evil.pth'
    torch.save({'model': {'head.weight': torch.zeros(2, 2)}, 'config': Evil()}, path)
    return path


def test_bad_input_is_one_clear_line(tool, setup, capsys, tmp_path):
    marker = tmp_path / 'pwned'
    evil = _evil(tmp_path, marker)
    data = setup['weights'].read_bytes()
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(data[:len(data) // 3])
    backbone = tmp_path / 'backbone.pth'
    torch.save({k: v for k, v in setup['model'].state_dict().items() if not k.startswith('head')}, backbone)
    bad_img = tmp_path / 'bad.jpg'
    bad_img.write_bytes(b'not an image at all')
    other = _make_folder(tmp_path / 'other', setup, ['n01440764', 'n01440764', 'cats', 'cats', '3', '3'])
    mixed = _make_folder(tmp_path / 'mixed', setup, ['n01440764', 'n01440764', '3', '3', '3', '3'])
    broken = tmp_path / 'broken'
    (broken / '7').mkdir(parents=True)
    (broken / '7' / 'x.png').write_bytes(b'\x89PNG garbage')
    (tmp_path / 'empty').mkdir()
    img = setup['images'][0]
    w = setup['weights']
    cases = [
        ([img, '--weights', evil], str(evil)),
        ([img, '--weights', truncated], str(truncated)),
        ([img, '--weights', backbone], 'no classifier head'),
        ([img, '--weights', w], 'wrong shape'),  # tiny weights into the real mlla_tiny
        ([img, '--weights', w, '--model', 'mlla_small', '--model-kwargs', 'embed_dim=16', 'num_heads=(1,2,2,4)'],
         'missing'),  # deeper stages
        ([img, '--weights', w, '--model', 'resnet50'], 'not an MLLA classifier'),
        ([img, '--weights', tmp_path / 'nowhere.pth'], 'nowhere.pth'),
        ([tmp_path / 'missing.png', '--weights', w, '--model-kwargs', *TINY_KWARGS], 'missing.png'),
        ([bad_img, '--weights', w, '--model-kwargs', *TINY_KWARGS], str(bad_img)),
        (['--data-dir', other, '--weights', w, '--model-kwargs', *TINY_KWARGS], "'cats'"),
        (['--data-dir', mixed, '--weights', w, '--model-kwargs', *TINY_KWARGS], 'mix WordNet ids and class indices'),
        (['--data-dir', broken, '--weights', w, '--model-kwargs', *TINY_KWARGS, '--workers', '1'], 'x.png'),
        (['--data-dir', tmp_path / 'empty', '--weights', w, '--model-kwargs', *TINY_KWARGS], 'no class subfolders'),
        ([img, '--weights', w, '--model-kwargs', 'depths'], 'KEY=VALUE'),
        ([img, '--weights', w, '--use-ema', '--model-kwargs', *TINY_KWARGS], 'state_dict_ema'),
        ([img, '--weights', w, '--model-kwargs', 'depth=(1,1,1,1)'], 'depth'),
    ]
    for args, needle in cases:
        rc, out, err = run(tool, capsys, *args)
        assert rc == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error: ') and needle in lines[0], (args, err)
    assert not marker.exists()


def test_command_line(setup, tmp_path):
    """The script as users run it: output, and exit code 2 with one line for a refused file."""
    res = run_tool('tools/classify.py', setup['images'][0], '--weights', setup['weights'], '--model-kwargs',
                   *TINY_KWARGS, '--topk', '3', timeout=600)
    assert res.returncode == 0, res.stderr
    assert len([ln for ln in res.stdout.splitlines() if re.match(r'\s+\d\. ', ln)]) == 3
    marker = tmp_path / 'pwned'
    res = run_tool('tools/classify.py', setup['images'][0], '--weights', _evil(tmp_path, marker), timeout=600)
    assert res.returncode == 2 and 'Traceback' not in res.stderr
    assert res.stderr.strip().startswith('error: ') and 'evil.pth' in res.stderr
    assert not marker.exists()


# --------------------------------------------------------------------------
# Bad arguments: one line, exit 2, before the model is built, nothing written.
# --------------------------------------------------------------------------
def run_or_exit(tool, capsys, *args):
    """``run``, with argparse's exit as an exit code."""
    try:
        rc = tool.main([str(a) for a in args])
    except SystemExit as stop:
        rc = stop.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_bad_arguments_are_one_line_before_the_model_is_built(tool, setup, capsys, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('the model was built although an argument is invalid')

    monkeypatch.setattr(tool, 'build_classifier', refuse)
    img, w = setup['images'][0], setup['weights']
    afile = tmp_path / 'afile'
    afile.write_text('x')
    cases = [
        (['--device', 'foo'], ['--device foo: not a device']),
        (['--device', 'cuda:99'], ['--device cuda:99']),
        (['--out', afile / 'x.json'], [f'--out {afile / "x.json"}: cannot write there',
                                       f'{afile} is a file, not a directory']),
        (['--out', tmp_path], [f'--out {tmp_path}: cannot write there', 'is a directory']),
        (['--show-dir', afile], [f'--show-dir {afile}: cannot write there', 'not a directory']),
        (['--topk', '0'], ['--topk', "expected a positive integer, got '0'"]),
        (['--batch-size', 'x'], ['--batch-size', "got 'x'"]),
        (['--workers', '-1'], ['--workers', "expected an integer >= 0, got '-1'"]),
        (['--bogus'], ['unrecognized arguments: --bogus']),
    ]
    for extra, needles in cases:
        rc, out, err = run_or_exit(tool, capsys, img, '--weights', w, *extra)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and 'Traceback' not in err, (extra, err)
        assert len(lines) == 1 and lines[0].startswith('error: ') and '[Errno' not in lines[0], (extra, err)
        assert all(n in lines[0] for n in needles), (extra, lines)
    for args, needles in [([tmp_path], [f'{tmp_path} is a directory, not an image', '--data-dir']),
                          ([img, tmp_path / 'nope.png'], [f'image not found: {tmp_path / "nope.png"}']),
                          (['--data-dir', afile], [f'--data-dir {afile}: not a directory']),
                          (['--data-dir', tmp_path / 'nope'], [f'--data-dir {tmp_path / "nope"}: not found'])]:
        rc, out, err = run_or_exit(tool, capsys, *args, '--weights', w)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and 'Traceback' not in err, (extra, err)
        assert len(lines) == 1 and lines[0].startswith('error: ') and '[Errno' not in lines[0], (extra, err)
        assert all(n in lines[0] for n in needles), (extra, lines)
    rc, out, err = run_or_exit(tool, capsys, img, '--weights', tmp_path)
    assert rc == 2 and err.strip() == f'error: --weights {tmp_path} is a directory, not a checkpoint file'
    rc, out, err = run_or_exit(tool, capsys, img, '--weights', tmp_path / 'nope.pth')
    assert rc == 2 and err.strip() == (f'error: --weights {tmp_path / "nope.pth"}: not found (the published weights '
                                       'are not downloaded: get MLLA_T.pth from https://github.com/LeapLabTHU/MLLA '
                                       '(README, Pretrained Models) and put it at data/pretrained/MLLA_T.pth)')
    (tmp_path / 'empty.pth').write_bytes(b'')
    rc, out, err = run_or_exit(tool, capsys, img, '--weights', tmp_path / 'empty.pth')
    assert rc == 2 and err.strip() == f'error: --weights is empty: {tmp_path / "empty.pth"}'
    (tmp_path / 'empty.pth').unlink()
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    rc, out, err = run_or_exit(tool, capsys, img, '--weights', w, '--device', 'cuda')
    assert rc == 2 and err.strip() == 'error: --device cuda: no CUDA device on this machine (use --device cpu)'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['afile'] and afile.read_text() == 'x'


def test_failed_json_write_is_one_line_without_errno(tool, setup, capsys, tmp_path, monkeypatch):
    """The disk fills up while --out is written: the reason, naming the file, no '[Errno N]'; no file left."""
    from tests.helpers import fill_disk_on_rename
    fill_disk_on_rename(monkeypatch, '.json')
    out = tmp_path / 'res.json'
    rc, _, err = run(tool, capsys, setup['images'][0], '--weights', setup['weights'], '--model-kwargs',
                     *TINY_KWARGS, '--out', out)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f'error: cannot write {out}: No space left on device'), lines
    assert '[Errno' not in lines[0]
    assert list(tmp_path.iterdir()) == []
