"""The mmseg folder-dataset check: pairs, readable files, label sizes, --skip-bad-images."""
import numpy as np
import pytest
from PIL import Image

from mlla_mm.datasets.checks import BadAnnotationError, BadImageError, check_seg_folder
from tests.helpers import write_image


def write_label(path, size=(32, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0]), np.uint8)).save(path)


@pytest.fixture
def ade(tmp_path):
    """ADE20K layout: 3 training pairs of 32x24."""
    for i in range(3):
        write_image(tmp_path / 'images' / 'training' / f'a{i}.jpg', (32, 24), seed=i)
        write_label(tmp_path / 'annotations' / 'training' / f'a{i}.png')
    return tmp_path


def seg_cfg(root, **extra):
    return dict(type='ADE20KDataset', data_root=str(root), reduce_zero_label=False,
                data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'), **extra)


def run(root, **kw):
    return check_seg_folder(seg_cfg(root), 'train_dataloader', 'seg_cfg.py', **kw)


def test_clean_folder_passes(ade):
    assert run(ade) == []


def test_image_without_label(ade):
    (ade / 'annotations' / 'training' / 'a1.png').unlink()
    with pytest.raises(BadImageError, match=r'1 of 3 image/label pairs.*a1\.png \(missing\)') as err:
        run(ade)
    assert str(ade / 'images' / 'training') in str(err.value) and 'seg_cfg.py' in str(err.value)


@pytest.mark.parametrize('which', ['images/training/a2.jpg', 'annotations/training/a2.png'])
def test_unreadable_image_or_label(ade, which):
    (ade / which).write_bytes((ade / which).read_bytes()[:30])
    with pytest.raises(BadImageError, match='cannot be read') as err:
        run(ade)
    assert str(ade / which) in str(err.value)


def test_label_of_another_size(ade):
    write_label(ade / 'annotations' / 'training' / 'a0.png', size=(24, 32))
    with pytest.raises(BadImageError, match=r'a0\.png is 24x32, a0\.jpg is 32x24'):
        run(ade)


def test_empty_image_folder(tmp_path):
    (tmp_path / 'images' / 'training').mkdir(parents=True)
    (tmp_path / 'annotations' / 'training').mkdir(parents=True)
    with pytest.raises(BadAnnotationError, match=r'no images ending in \.jpg'):
        run(tmp_path)


def test_skip_bad_images_writes_a_split_file_mmseg_reads(ade, tmp_path):
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules
    (ade / 'images' / 'training' / 'a1.jpg').write_bytes(b'')
    ds = seg_cfg(ade)
    warnings = check_seg_folder(ds, 'train_dataloader', skip_bad_images=True, out_dir=str(tmp_path / 'dc'))
    split = tmp_path / 'dc' / 'train_dataloader_split.txt'
    assert len(warnings) == 1 and 'leaves out 1 of 3 images' in warnings[0] and 'a1.jpg (empty file' in warnings[0]
    assert split.read_text() == 'a0\na2\n' and ds['ann_file'] == str(split.resolve())
    register_all_modules()
    dataset = DATASETS.build(dict(ds, pipeline=[]))
    assert [dataset.get_data_info(i)['img_path'] for i in range(len(dataset))] == [
        str(ade / 'images' / 'training' / n) for n in ('a0.jpg', 'a2.jpg')]
