"""Bad input gets a clear error (or is handled) and leaves nothing half-written."""
import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config

from mlla_mm.checkpoint import CheckpointError, load_file
from mlla_mm.datasets.checks import check_data
from mlla_mm.engine.launch import prepare_config
from mlla_mm.errors import BadAnnotationError, DataNotFoundError

from tests.helpers import fill_disk_on_fsync, final_error_line, load_tool


@pytest.fixture(scope='module')
def runner(cfg_path, tmp_path_factory):
    from mmengine.registry import RUNNERS, init_default_scope
    cfg = Config.fromfile(cfg_path)
    prepare_config(cfg, work_dir=str(tmp_path_factory.mktemp('work')), config_path=str(cfg_path))
    init_default_scope('mmdet')
    return RUNNERS.build(cfg)


# ---- checkpoints given to load_from ------------------------------------------
@pytest.mark.parametrize('damage', ['truncated', 'empty'])
def test_damaged_checkpoint(runner, tmp_path, damage):
    path = tmp_path / f'{damage}.pth'
    torch.save({'state_dict': runner.model.state_dict(), 'meta': {}}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == 'truncated' else b'')
    with pytest.raises(CheckpointError, match=f'{damage}.pth.*|.*{damage}.pth'):
        runner.load_checkpoint(str(path))


def test_checkpoint_of_another_mlla_size(runner, tmp_path):
    from mlla_mm.models import MLLA
    other = MLLA(dict(embed_dims=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4])).state_dict()
    sd = dict(runner.model.state_dict())
    sd.update({'backbone.' + k: v for k, v in other.items()})
    torch.save({'state_dict': sd, 'meta': {}}, tmp_path / 'mlla_32.pth')
    before = {k: v.clone() for k, v in runner.model.state_dict().items()}
    with pytest.raises(CheckpointError, match='another MLLA size') as err:
        runner.load_checkpoint(str(tmp_path / 'mlla_32.pth'))
    assert 'mlla_32.pth' in str(err.value)
    assert all(torch.equal(v, runner.model.state_dict()[k]) for k, v in before.items()), 'model was changed'


def test_checkpoint_of_another_model(runner, tmp_path):
    import torchvision
    torch.save({'state_dict': torchvision.models.resnet18().state_dict()}, tmp_path / 'r18.pth')
    with pytest.raises(CheckpointError, match='another model') as err:
        runner.load_checkpoint(str(tmp_path / 'r18.pth'))
    assert 'r18.pth' in str(err.value)


def test_backbone_only_checkpoint_in_load_from_gets_a_hint(runner, tmp_path):
    sd = {k[len('backbone.'):]: v for k, v in runner.model.state_dict().items() if k.startswith('backbone.')}
    torch.save(sd, tmp_path / 'bb.pth')
    with pytest.raises(CheckpointError, match='init_cfg'):
        runner.load_checkpoint(str(tmp_path / 'bb.pth'))


def test_other_number_of_classes_still_fine_tunes(runner, tmp_path):
    """A COCO (80-class) checkpoint loads into the 3-class model: every tensor of matching shape (backbone,
    neck, RPN, shared heads) comes from the checkpoint; the class-dependent head layers keep the model's own
    fresh initialisation at the config's class count (mmengine skips them with a warning)."""
    model = runner.model
    num_classes = model.roi_head.bbox_head.num_classes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # (tensor, its rows in the model, its rows in an 80-class COCO checkpoint)
    head = {'roi_head.bbox_head.fc_cls.weight': (num_classes + 1, 81), 'roi_head.bbox_head.fc_cls.bias':
            (num_classes + 1, 81), 'roi_head.bbox_head.fc_reg.weight': (4 * num_classes, 320),
            'roi_head.bbox_head.fc_reg.bias': (4 * num_classes, 320),
            'roi_head.mask_head.conv_logits.weight': (num_classes, 80),
            'roi_head.mask_head.conv_logits.bias': (num_classes, 80)}
    gen = torch.Generator().manual_seed(0)
    ckpt = {k: v + torch.rand(v.shape, generator=gen) + 0.5 if v.is_floating_point() else v
            for k, v in before.items()}  # every float tensor differs from the model's
    for key, (rows, coco_rows) in head.items():
        assert before[key].shape[0] == rows, key
        ckpt[key] = torch.rand((coco_rows, *before[key].shape[1:]), generator=gen)
    torch.save({'state_dict': ckpt, 'meta': {}}, tmp_path / 'coco80.pth')
    try:
        runner.load_checkpoint(str(tmp_path / 'coco80.pth'))
        after = model.state_dict()
        assert set(after) == set(before)
        loaded = [k for k in after if k not in head]
        assert any(k.startswith('backbone.') for k in loaded) and any(k.startswith('neck.') for k in loaded)
        for key in loaded:  # the backbone (and all else that fits) is the checkpoint's
            assert torch.equal(after[key], ckpt[key]), key
        for key, (rows, _) in head.items():  # the class-dependent layers: fresh, at the config's class count
            assert after[key].shape[0] == rows and torch.equal(after[key], before[key]), key
            assert after[key].abs().sum() > 0, key
    finally:
        model.load_state_dict(before)  # (the module's runner stays as it was for the other tests)


# ---- configs through tools/train.py -----------------------------------------
@pytest.mark.parametrize('option, word', [('model.backbone.arch=tinyy', 'tinyy'),
                                          ('model.backbone.drop_path_rat=0.1', 'drop_path_rat')])
def test_bad_backbone_config_is_one_line_exit_2(cfg_path, tmp_path, capsys, option, word):
    train = load_tool('train')
    rc = train.main([str(cfg_path), '--work-dir', str(tmp_path / 'w'), '--cfg-options', option])
    err = capsys.readouterr().err
    assert rc == 2 and 'Traceback' not in err
    # (Library warnings printed while importing, e.g. pkg_resources', are not ours.)
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and str(cfg_path) in errors[0] and word in errors[0]
    assert err.strip().splitlines()[-1] == errors[0]
    assert not list((tmp_path / 'w').rglob('*.pth'))


@pytest.mark.parametrize('text, word', [('model = dict(\n', 'SyntaxError'),
                                        ("_base_ = ['./no_such_base.py']\n", 'no_such_base'),
                                        ("custom_imports = dict(imports=['no_such_module'])\n", 'no_such_module')])
def test_config_that_does_not_parse_is_one_line_exit_2(tmp_path, capsys, text, word):
    bad = tmp_path / 'bad_config.py'
    bad.write_text(text)
    rc = load_tool('train').main([str(bad), '--work-dir', str(tmp_path / 'w')])
    line = final_error_line(capsys.readouterr().err)
    assert rc == 2 and str(bad) in line and word in line


@pytest.mark.parametrize('text, word', [('x = 1 / 0\n', 'ZeroDivisionError'),
                                        ('raise RuntimeError("boom")\n', 'boom'),
                                        ('def f():\n    return f()\nf()\n', 'RecursionError'),
                                        ('', 'defines no model'),
                                        ('model = 3\n', 'defines no model')])
def test_config_code_that_raises_anything_is_one_line_exit_2(tmp_path, capsys, text, word):
    """A config is Python that runs when read: whatever it raises is one line naming the file (train and test)."""
    bad = tmp_path / 'raising_config.py'
    bad.write_text(text)
    ckpt = tmp_path / 'c.pth'
    torch.save({'state_dict': {}}, ckpt)
    for argv in (['train', str(bad)], ['test', str(bad), str(ckpt)]):
        rc = load_tool(argv[0]).main(argv[1:] + ['--work-dir', str(tmp_path / 'w')])
        line = final_error_line(capsys.readouterr().err)
        assert rc == 2 and str(bad) in line and word in line, line
    assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('option, word', [('train_dataloader.batch_size=-1', 'train_dataloader.batch_size'),
                                          ('train_dataloader.batch_size=0', 'train_dataloader.batch_size'),
                                          ('val_dataloader.num_workers=-1', 'val_dataloader.num_workers'),
                                          ('train_cfg.max_epochs=0', 'train_cfg.max_epochs'),
                                          ('train_cfg.max_epochs=-1', 'train_cfg.max_epochs'),
                                          ("optim_wrapper.optimizer.lr='abc'", 'optimizer.lr')])
def test_settings_mmengine_checks_late_are_one_line_exit_2(cfg_path, tmp_path, capsys, option, word):
    """Values mmengine would only reject inside train() (after building everything; a traceback), or accept
    silently (0 epochs: nothing trained, exit 0), are one error line before anything runs."""
    rc = load_tool('train').main([str(cfg_path), '--work-dir', str(tmp_path / 'w'), '--cfg-options', option])
    line = final_error_line(capsys.readouterr().err)
    assert rc == 2 and word in line, line
    assert not list((tmp_path / 'w').rglob('*.pth'))


def test_a_backbone_alone_is_not_a_trainable_model(tmp_path, capsys):
    bare = tmp_path / 'bare_backbone.py'
    bare.write_text("custom_imports = dict(imports=['mlla_mm'], allow_failed_imports=False)\n"
                    "default_scope = 'mmdet'\nmodel = dict(type='mlla_mm.MLLA', arch='tiny')\n"
                    "train_dataloader = None\ntrain_cfg = None\noptim_wrapper = None\n")
    rc = load_tool('train').main([str(bare), '--work-dir', str(tmp_path / 'w')])
    line = final_error_line(capsys.readouterr().err)
    assert rc == 2 and 'no train_step' in line and 'MLLA' in line, line


@pytest.mark.parametrize('tool, option', [('train', '--work-dir'), ('test', '--work-dir'), ('test', '--show-dir'),
                                          ('test', '--out')])
def test_output_under_a_regular_file_is_one_line_exit_2(cfg_path, tmp_path, capsys, tool, option):
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    ckpt = tmp_path / 'c.pth'
    torch.save({'state_dict': {}}, ckpt)
    target = str(blocker / ('x.pkl' if option == '--out' else 'dir'))
    argv = [str(cfg_path)] + ([str(ckpt)] if tool == 'test' else []) + [option, target]
    if option != '--work-dir':
        argv += ['--work-dir', str(tmp_path / 'w')]
    rc = load_tool(tool).main(argv)
    line = final_error_line(capsys.readouterr().err)
    assert rc == 2 and option in line and f'{blocker} is a file, not a directory' in line, line


def test_test_out_must_be_a_pickle_and_a_directory_is_not_a_checkpoint(cfg_path, tmp_path, capsys):
    ckpt = tmp_path / 'c.pth'
    torch.save({'state_dict': {}}, ckpt)
    test = load_tool('test')
    assert test.main([str(cfg_path), str(ckpt), '--out', str(tmp_path / 'p.json')]) == 2
    assert '--out' in final_error_line(capsys.readouterr().err)
    assert test.main([str(cfg_path), str(tmp_path)]) == 2
    assert 'is a directory, not a checkpoint file' in final_error_line(capsys.readouterr().err)
    assert load_tool('train').main([str(cfg_path), '--work-dir', str(tmp_path / 'w'), '--resume', str(tmp_path)]) == 2
    assert '--resume' in final_error_line(capsys.readouterr().err)
    with pytest.raises(CheckpointError, match='is a directory, not a checkpoint file'):
        load_file(str(tmp_path))


def test_whole_model_check_for_test_and_resume(runner, tmp_path):
    """tools/test.py and --resume take the whole model from the file: every tensor must be in it (a checkpoint of
    the other task or of a deeper MLLA would otherwise run with those parts at random); load_from for
    fine-tuning still accepts a partial file."""
    from mlla_mm.checkpoint import check_checkpoint_fits
    model = runner.model
    full = model.state_dict()
    partial = {k: v for k, v in full.items() if not k.startswith('roi_head.')}
    check_checkpoint_fits(model, full, 'full.pth', whole=True)
    check_checkpoint_fits(model, partial, 'partial.pth')  # fine-tuning: allowed
    with pytest.raises(CheckpointError, match=r'partial\.pth: \d+ of the model.s tensors are not in it.*roi_head'):
        check_checkpoint_fits(model, partial, 'partial.pth', whole=True)
    blocks = {k: v for k, v in full.items() if '.blocks.0.' not in k}
    with pytest.raises(CheckpointError, match='blocks.0'):
        check_checkpoint_fits(model, blocks, 'shallower.pth', whole=True)
    # through the runner: resuming is "whole", plain load_from is not
    torch.save({'state_dict': partial, 'meta': {}}, tmp_path / 'partial.pth')
    runner.load_checkpoint(str(tmp_path / 'partial.pth'))  # load_from: a warning, no error
    runner._resume = True
    try:
        with pytest.raises(CheckpointError, match='not in it'):
            runner.load_checkpoint(str(tmp_path / 'partial.pth'))
    finally:
        runner._resume = False


@pytest.mark.parametrize('option', ['train_cfg.max_epochs', 'train_cfg.max_epochs=[1,2', '=3',
                                    'model=dict(type="X",arch="tiny")'])
def test_cfg_options_that_do_not_parse_are_one_line_exit_2(cfg_path, tmp_path, capsys, option):
    with pytest.raises(SystemExit) as stop:
        load_tool('train').main([str(cfg_path), '--cfg-options', option])
    line = final_error_line(capsys.readouterr().err)
    assert stop.value.code == 2 and '--cfg-options' in line and option in line


def test_cfg_options_that_do_not_fit_the_config_are_one_line_exit_2(cfg_path, tmp_path, capsys):
    option = 'model.backbone.arch.embed_dims.x=1'  # embed_dims is a number, not a dict
    rc = load_tool('train').main([str(cfg_path), '--work-dir', str(tmp_path / 'w'), '--cfg-options', option])
    line = final_error_line(capsys.readouterr().err)
    assert rc == 2 and '--cfg-options' in line and 'embed_dims' in line


@pytest.mark.slow  # trains 2 epochs in the test process
def test_full_disk_while_saving_a_checkpoint_is_one_line_exit_2(cfg_path, tmp_path, capsys, monkeypatch):
    work = tmp_path / 'w'
    fill_disk_on_fsync(monkeypatch, 'epoch_2.pth')
    rc = load_tool('train').main([str(cfg_path), '--work-dir', str(work), '--cfg-options', 'train_cfg.max_epochs=2',
                                   'train_dataloader.batch_size=4'])  # one iteration per epoch
    line = final_error_line(capsys.readouterr().err)
    assert rc == 2 and str(work / 'epoch_2.pth') in line and 'No space left on device' in line
    assert not (work / 'epoch_2.pth').exists() and not list(work.glob('.*.tmp-*'))
    assert (work / 'last_checkpoint').read_text().strip() == str(work / 'epoch_1.pth')
    assert load_file(work / 'epoch_1.pth')['meta']['epoch'] == 1  # the previous checkpoint is intact


def test_missing_data_root(cfg_path, tmp_path, capsys):
    train = load_tool('train')
    root = tmp_path / 'nowhere'
    rc = train.main([str(cfg_path), '--work-dir', str(tmp_path / 'w'), '--cfg-options', 'synthetic_data=None',
                     f'train_dataloader.dataset.data_root={root}'])
    err = capsys.readouterr().err
    assert rc == 2 and 'Data not found' in err and str(root) in err and 'Traceback' not in err


def _copy_data(tiny_data, tmp_path):
    root = tmp_path / 'shapes'
    shutil.copytree(tiny_data, root)
    return root


def _cfg_on(cfg_path, root):
    cfg = Config.fromfile(cfg_path)
    cfg.train_dataloader.dataset.data_root = str(root) + '/'
    return cfg


def test_annotation_file_not_json(cfg_path, tiny_data, tmp_path):
    root = _copy_data(tiny_data, tmp_path)
    ann = root / 'annotations' / 'instances_train.json'
    ann.write_text(ann.read_text()[:100])
    with pytest.raises(BadAnnotationError, match='not valid JSON') as err:
        check_data(_cfg_on(cfg_path, root), ('train_dataloader', ), str(cfg_path))
    assert str(ann) in str(err.value) and 'COCO-format' in str(err.value)


def test_annotation_file_names_missing_images(cfg_path, tiny_data, tmp_path, capsys):
    root = _copy_data(tiny_data, tmp_path)
    (root / 'train' / 'train_00002.png').unlink()
    with pytest.raises(BadAnnotationError, match='1 of 4 images') as err:
        check_data(_cfg_on(cfg_path, root), ('train_dataloader', ), str(cfg_path))
    assert 'train_00002.png' in str(err.value) and 'instances_train.json' in str(err.value)
    train = load_tool('train')
    rc = train.main([str(cfg_path), '--work-dir', str(tmp_path / 'w'), '--cfg-options', 'synthetic_data=None',
                     f'train_dataloader.dataset.data_root={root}/'])
    assert rc == 2 and 'train_00002.png' in capsys.readouterr().err
    assert isinstance(err.value, DataNotFoundError)


# ---- odd images --------------------------------------------------------------
@pytest.fixture(scope='module')
def detector(cfg_path):
    from mmdet.apis import init_detector
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(cfg_path)
    cfg.test_dataloader.dataset.pipeline[1].scale = (1333, 800)  # the real test scale
    return init_detector(cfg, device='cpu')


def _odd_images(root):
    """Rewrite the 4 train images as grayscale, RGBA, 16-bit and 16-bit grayscale."""
    files = sorted((root / 'train').glob('*.png'))
    img = [cv2.imread(str(f), cv2.IMREAD_UNCHANGED) for f in files]
    cv2.imwrite(str(files[0]), cv2.cvtColor(img[0], cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(files[1]), cv2.cvtColor(img[1], cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(files[2]), img[2].astype(np.uint16) * 257)
    cv2.imwrite(str(files[3]), cv2.cvtColor(img[3], cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257)
    kinds = [cv2.imread(str(f), cv2.IMREAD_UNCHANGED) for f in files]
    assert [(k.ndim, k.shape[-1] if k.ndim == 3 else 1, k.dtype) for k in kinds] == [
        (2, 1, np.uint8), (3, 4, np.uint8), (3, 3, np.uint16), (2, 1, np.uint16)]
    return files


def _train_step(model, cfg, root, **dataset):
    from mmdet.registry import DATASETS
    from mmengine.dataset import pseudo_collate
    ds_cfg = cfg.train_dataloader.dataset.copy()
    ds_cfg.update(data_root=str(root) + '/', **dataset)
    ds = DATASETS.build(ds_cfg)
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        assert it['inputs'].shape[0] == 3 and it['inputs'].dtype == torch.uint8
    model.train()
    data = model.data_preprocessor(pseudo_collate(items), True)
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    loss.backward()
    model.zero_grad()
    model.eval()
    assert torch.isfinite(loss)
    return items


def test_gray_rgba_16bit_images_train_and_infer(detector, tiny_data, tmp_path):
    from mmdet.apis import inference_detector
    root = _copy_data(tiny_data, tmp_path)
    files = _odd_images(root)
    _train_step(detector, detector.cfg, root)
    results = inference_detector(detector, [str(f) for f in files])
    for r, f in zip(results, files):
        assert r.ori_shape == (64, 64), f
        assert torch.isfinite(r.pred_instances.bboxes).all()


def test_image_without_annotations_trains(detector, tiny_data, tmp_path):
    root = _copy_data(tiny_data, tmp_path)
    ann = root / 'annotations' / 'instances_train.json'
    data = json.loads(ann.read_text())
    data['annotations'] = [a for a in data['annotations'] if a['image_id'] != 1]
    ann.write_text(json.dumps(data))
    items = _train_step(detector, detector.cfg, root, filter_cfg=dict(filter_empty_gt=False))
    assert any(len(it['data_samples'].gt_instances) == 0 for it in items)
    # With mmdet's default filter (as in the configs) the empty image is skipped instead.
    from mmdet.registry import DATASETS
    ds_cfg = detector.cfg.train_dataloader.dataset.copy()
    ds_cfg.update(data_root=str(root) + '/', filter_cfg=dict(filter_empty_gt=True))
    assert len(DATASETS.build(ds_cfg)) == 3


@pytest.mark.parametrize('hw', [(1, 1), (7, 1000), (1000, 7)])
def test_tiny_and_thin_images_in_detector_inference(detector, hw):
    from mmdet.apis import inference_detector
    img = np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)
    result = inference_detector(detector, img)
    assert result.ori_shape == hw
    boxes = result.pred_instances.bboxes
    assert torch.isfinite(boxes).all()
    if len(boxes):
        assert (boxes[:, 2] <= hw[1] + 1e-3).all() and (boxes[:, 3] <= hw[0] + 1e-3).all()


@pytest.mark.parametrize('tool', ['test', 'resume'])
@pytest.mark.parametrize('kind', ['no_roi_head', 'wider_backbone', 'not_a_state_dict'])
def test_a_checkpoint_of_another_model_is_refused_before_the_runner(runner, cfg_path, tmp_path, capsys, tool, kind):
    """A readable checkpoint that is not a whole checkpoint of the config's model (the other task's heads
    missing, another MLLA size, no state dict) is one error line naming it, found before the runner makes its
    log folder."""
    full = {k: v.clone() for k, v in runner.model.state_dict().items()}
    if kind == 'no_roi_head':
        sd, expect = {k: v for k, v in full.items() if not k.startswith('roi_head.')}, 'are not in it'
    elif kind == 'wider_backbone':
        key = 'backbone.layers.0.blocks.0.norm1.weight'
        sd, expect = dict(full, **{key: torch.ones(full[key].shape[0] * 2)}), 'another MLLA size'
    else:
        sd, expect = None, 'no state_dict'
    ckpt = tmp_path / f'{kind}.pth'
    torch.save({'state_dict': sd if sd is not None else [1, 2], 'meta': {}}, ckpt)
    rc, line, out = _test_or_resume_with(tool, cfg_path, ckpt, tmp_path / 'work', capsys)
    assert rc == 2 and str(ckpt) in line and expect in line, line
    assert not (tmp_path / 'work').exists(), sorted((tmp_path / 'work').rglob('*'))
    assert 'Config' not in out.out and 'mmengine' not in out.out  # no config dump before the error


def _test_or_resume_with(tool, cfg_path, ckpt, work, capsys):
    """tools/test.py CKPT or tools/train.py --resume CKPT: (exit code, the one error line, captured output)."""
    if tool == 'test':
        rc = load_tool('test').main([str(cfg_path), str(ckpt), '--work-dir', str(work)])
    else:
        rc = load_tool('train').main([str(cfg_path), '--work-dir', str(work), '--resume', str(ckpt)])
    out = capsys.readouterr()
    return rc, final_error_line(out.err), out


@pytest.mark.parametrize('tool', ['test', 'resume'])
@pytest.mark.parametrize('kind', ['reduce_os_system', 'truncated'])
def test_refused_checkpoint_is_the_only_output_and_makes_no_folder(cfg_path, tmp_path, capsys, tool, kind):
    """A checkpoint the safe loader refuses is refused before the runner is built: one error line naming it, and
    no work dir (no timestamped log folder, no config dump) is left behind."""
    from tests.test_reliability import evil_pickles as ep
    marker = tmp_path / 'marker'
    ckpt = tmp_path / f'{kind}.pth'
    if kind == 'truncated':
        torch.save({'state_dict': {'w': torch.zeros(1000)}}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:-100])
    else:
        ckpt.write_bytes(ep.corpus(str(marker))[kind])
    work = tmp_path / 'work'
    rc, line, out = _test_or_resume_with(tool, cfg_path, ckpt, work, capsys)
    assert rc == 2 and str(ckpt) in line and 'refusing to load' in line, line
    assert not work.exists() and not marker.exists()
    assert 'Config' not in out.out and 'mmengine' not in out.out  # no config dump before the error
