"""The COCO data check: each defect gets the right error, or one warning line with exact counts."""
import json
import re

import pytest

from mlla_mm.datasets.checks import (BadAnnotationError, BadImageError, DataNotFoundError, check_annotations,
                                     inspect_image)
from tests.helpers import build_coco_dataset, ds_cfg, make_coco, write_ann, write_image


@pytest.fixture
def coco(tmp_path):
    """(root, clean COCO dict) with 3 images of 64x48 and 6 annotations; the file is written by each test."""
    return tmp_path, make_coco(tmp_path)


def check(root, data, loader='train_dataloader', **cfg):
    path = write_ann(root, data)
    return path, check_annotations(ds_cfg(root, **cfg), loader, 'my_cfg.py')


def test_clean_data_passes_without_warnings(coco):
    root, data = coco
    _, warnings = check(root, data)
    assert warnings == []


def test_the_data_errors_are_the_leaf_module_s_and_importable_from_datasets():
    from mlla_mm import errors
    from mlla_mm.datasets import BadAnnotationError, BadImageError, DataNotFoundError, checks
    assert (DataNotFoundError, BadAnnotationError, BadImageError) == (
        errors.DataNotFoundError, errors.BadAnnotationError, errors.BadImageError)
    assert checks.DataNotFoundError is errors.DataNotFoundError and 'CocoDataset' in checks.LAYOUTS


# ---- ids and malformed entries: one line naming the file and the config -------------------------------------
@pytest.mark.parametrize('damage, words', [
    pytest.param(lambda d: d['images'][2].update(id=2), 'duplicate image ids 2 (1 ids', id='duplicate-image-ids'),
    pytest.param(lambda d: d['annotations'][3].update(id=1) or d['annotations'][5].update(id=2),
                 'duplicate annotation ids 1, 2 (2 ids', id='duplicate-annotation-ids'),
    pytest.param(lambda d: d['annotations'][1].update(category_id=9), 'category ids that are not in "categories": 9 ',
                 id='unknown-category-id'),
    pytest.param(lambda d: d['annotations'][0].update(image_id=77), 'image ids that are not in "images": 77 ',
                 id='unknown-image-id'),
    (lambda d: d['annotations'][0].pop('bbox'), 'bbox of 4 finite numbers'),
    (lambda d: d['annotations'][0].__setitem__('bbox', [1, 2, 3]), 'annotations[0]'),
    (lambda d: d['annotations'][1].__setitem__('bbox', [1, 2, float('nan'), 3]), 'annotations[1]'),
    (lambda d: d['annotations'][2].pop('area'), 'numeric area'),
    (lambda d: d['images'][1].pop('width'), 'images[1]'),
    (lambda d: d['images'][0].__setitem__('file_name', 7), 'images[0]'),
    (lambda d: d.pop('categories'), 'no "categories" list'),
    (lambda d: d['categories'].append(dict(id=1, name='bird')), 'duplicate category ids 1'),
    (lambda d: d['categories'].append(dict(id=3, name='dog')), "duplicate category names 'dog'"),
    (lambda d: d.__setitem__('annotations', {}), 'not a list'),
    (lambda d: d.__setitem__('images', []), 'has no images'),
])
def test_malformed_entries_are_errors_not_crashes(coco, damage, words):
    root, data = coco
    damage(data)
    with pytest.raises(BadAnnotationError, match=re.escape(words)) as err:
        check(root, data)
    assert str(root / 'ann.json') in str(err.value) and 'my_cfg.py' in str(err.value)
    assert '\n' not in str(err.value)


# ---- classes -------------------------------------------------------------------------------------------------
def test_config_classes_not_in_the_file(coco):
    root, data = coco
    with pytest.raises(BadAnnotationError, match="classes 'cow' are not categories of the file") as err:
        check(root, data, classes=('cat', 'cow'))
    assert "'cat', 'dog'" in str(err.value)


def test_config_classes_in_another_order(coco):
    root, data = coco
    with pytest.raises(BadAnnotationError, match="another order.*'cat', 'dog'"):
        check(root, data, classes=('dog', 'cat'))


def test_default_coco_classes_do_not_match_a_custom_file(coco):
    root, data = coco
    # No metainfo: CocoDataset's 80 COCO classes, none of which is in the file.
    with pytest.raises(BadAnnotationError, match="classes 'person', 'bicycle'"):
        check(root, data, classes=None)


def test_subset_of_classes_is_a_warning(coco):
    root, data = coco
    _, warnings = check(root, data, classes=('dog', ))
    assert len(warnings) == 1
    assert "mmdet will drop 3 of 6 annotations (3 of categories not in the config's classes ('cat'))" in warnings[0]


# ---- what mmdet drops ----------------------------------------------------------------------------------------
def test_degenerate_boxes_and_short_polygons_in_one_warning_line(coco):
    root, data = coco
    a = data['annotations']
    a[0]['bbox'] = [4.0, 5.0, 0.0, 10.0]      # zero width
    a[1]['bbox'] = [4.0, 5.0, 10.0, -3.0]     # negative height
    a[2]['bbox'] = [70.0, 5.0, 10.0, 10.0]    # right of the 64-pixel-wide image
    a[3]['area'] = 0.0                        # zero area
    a[4]['segmentation'] = [[1, 1, 5, 5]]     # 2-point polygon: the only polygon of this instance
    a[5]['segmentation'] = [[1, 1, 5, 5, 9, 1], [3, 3, 4, 4]]  # one good, one 2-point polygon
    path, warnings = check(root, data)
    assert len(warnings) == 1 and '\n' not in warnings[0]
    assert warnings[0] == (
        f'{path}: mmdet will drop 4 of 6 annotations (1 with area <= 0, 1 with box outside its image, '
        '2 with box width or height < 1); 2 polygons with fewer than 3 points or an odd number of coordinates '
        '(1 instances left without a mask are ignored).')
    # The count is what mmdet really does with the file.
    dataset = build_coco_dataset(ds_cfg(root))
    assert sum(len(dataset.get_data_info(i)['instances']) for i in range(len(dataset))) == 6 - 4


def test_empty_annotation_list(coco):
    root, data = coco
    data['annotations'] = []
    with pytest.raises(BadAnnotationError, match='has no annotations') as err:
        check(root, data)
    assert str(root / 'ann.json') in str(err.value)
    with pytest.raises(BadAnnotationError, match='has no annotations'):
        check(root, data, loader='val_dataloader')


def test_no_annotations_key_is_fine_for_test_image_info_files(coco):
    root, data = coco
    del data['annotations']
    with pytest.raises(BadAnnotationError, match='has no annotations'):
        check(root, data)
    assert check(root, data, loader='test_dataloader')[1] == []


def test_train_set_where_no_annotation_is_usable(coco):
    root, data = coco
    for a in data['annotations']:
        a['iscrowd'] = 1
    with pytest.raises(BadAnnotationError, match='none of its 6 annotations can be trained on'):
        check(root, data)
    assert check(root, data, loader='val_dataloader')[1] == []


def test_annotation_without_segmentation_when_masks_are_loaded(coco):
    root, data = coco
    del data['annotations'][4]['segmentation']
    with pytest.raises(BadAnnotationError, match='1 annotations have no segmentation.*annotation ids 5 '):
        check(root, data)
    assert check(root, data, with_mask=False)[1] == []


# ---- images --------------------------------------------------------------------------------------------------
def test_unreadable_images_are_listed_with_the_annotation_file(coco):
    root, data = coco
    good = (root / 'img' / 'im0.jpg').read_bytes()
    (root / 'img' / 'im0.jpg').write_bytes(good[:len(good) // 2])          # truncated JPEG
    (root / 'img' / 'im1.jpg').write_text('this is not an image\n')        # text renamed .jpg
    (root / 'img' / 'im2.jpg').write_bytes(b'')                            # zero bytes
    with pytest.raises(BadImageError) as err:
        check(root, data)
    msg = str(err.value)
    assert msg.startswith(f'{root / "ann.json"}: 3 of 3 images cannot be read')
    assert f'{root / "img" / "im0.jpg"} (truncated JPEG' in msg
    assert f'{root / "img" / "im1.jpg"} (not an image file)' in msg
    assert f'{root / "img" / "im2.jpg"} (empty file (0 bytes))' in msg
    assert '--skip-bad-images' in msg and '\n' not in msg
    assert isinstance(err.value, DataNotFoundError)


def test_truncated_png(tmp_path):
    data = make_coco(tmp_path, suffix='.png')
    png = tmp_path / 'img' / 'im1.png'
    png.write_bytes(png.read_bytes()[:-40])
    with pytest.raises(BadImageError, match=r'1 of 3 images cannot be read.*im1\.png \(damaged image file'):
        check(tmp_path, data)


def test_wrong_width_height(coco):
    root, data = coco
    data['images'][1]['width'] = 50
    with pytest.raises(BadImageError, match='im1.jpg is 64x48, the file says 50x48') as err:
        check(root, data)
    assert str(root / 'ann.json') in str(err.value)


def test_missing_image_still_reported(coco):
    root, data = coco
    (root / 'img' / 'im2.jpg').unlink()
    with pytest.raises(BadAnnotationError, match='1 of 3 images named in .* are missing.*im2.jpg'):
        check(root, data)


@pytest.mark.parametrize('orientation', [1, 3, 6, 8])
def test_image_size_is_the_size_mmcv_loads(tmp_path, orientation):
    """EXIF-rotated JPEGs: the checked size is the one mmcv's loader gives (cv2 and pillow backends)."""
    import mmcv
    path = write_image(tmp_path / 'r.jpg', (40, 24), exif_orientation=orientation)
    size, reason = inspect_image(str(path))
    assert reason == ''
    for backend in ('cv2', 'pillow'):
        img = mmcv.imfrombytes(path.read_bytes(), flag='color', backend=backend)
        assert size == (img.shape[1], img.shape[0]), backend


# ---- --skip-bad-images --------------------------------------------------------------------------------------
def test_skip_bad_images_writes_a_filtered_copy(coco, tmp_path):
    root, data = coco
    (root / 'img' / 'im1.jpg').write_bytes(b'\x00' * 100)
    (root / 'img' / 'im2.jpg').unlink()
    path = write_ann(root, data)
    ds = ds_cfg(root)
    out = tmp_path / 'work' / 'data_checks'
    warnings = check_annotations(ds, 'train_dataloader', 'my_cfg.py', skip_bad_images=True, out_dir=str(out))
    copy = out / 'train_dataloader_ann.json'
    assert len(warnings) == 1
    assert warnings[0] == (f'{path}: --skip-bad-images leaves out 2 of 3 images: im2.jpg (missing), '
                           f'im1.jpg (not an image file); train_dataloader reads the filtered copy {copy}.')
    assert ds['ann_file'] == str(copy.resolve())
    kept = json.loads(copy.read_text())
    assert [i['file_name'] for i in kept['images']] == ['im0.jpg']
    assert {a['image_id'] for a in kept['annotations']} == {1} and len(kept['annotations']) == 2
    assert kept['categories'] == data['categories']
    assert json.loads(path.read_text()) == data, 'the original file was changed'
    assert not [p for p in out.iterdir() if p.name.startswith('.')], 'temporary file left behind'
    dataset = build_coco_dataset(ds)
    assert [dataset.get_data_info(i)['img_path'] for i in range(len(dataset))] == [str(root / 'img' / 'im0.jpg')]
    # Sizes are still checked on the images that remain; all images bad is still an error.
    (root / 'img' / 'im0.jpg').write_bytes(b'')
    with pytest.raises(BadImageError, match='none of its 3 images can be read'):
        check_annotations(ds_cfg(root), 'train_dataloader', skip_bad_images=True, out_dir=str(out))


def test_panoptic_file_gets_the_image_checks_only(coco):
    """Panoptic annotations have segments_info and no bbox: not an error; image problems still are."""
    root, data = coco
    data['annotations'] = [dict(image_id=img['id'], file_name=f'p{img["id"]}.png',
                                segments_info=[dict(id=1, category_id=1, iscrowd=0, bbox=[0, 0, 4, 4], area=16)])
                           for img in data['images']]
    cfg = dict(ds_cfg(root), type='CocoPanopticDataset')
    write_ann(root, data)
    assert check_annotations(cfg, 'train_dataloader') == []
    data['images'][1]['id'] = 1
    write_ann(root, data)
    with pytest.raises(BadAnnotationError, match='duplicate image ids 1 '):
        check_annotations(cfg, 'train_dataloader')


def _png_header_only(path, width, height):
    """A PNG of a few dozen bytes whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = height * (1 + 3 * width) if width * height < 1 << 20 else 16  # all rows for a small image
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(b'\0' * rows)) + chunk(b'IEND', b''))
    return path


def test_decompression_bomb_is_a_bad_image_found_without_decoding_it(tmp_path):
    import subprocess
    import sys
    bomb = _png_header_only(tmp_path / 'bomb.png', 30000, 30000)  # 2.7 GB of pixels from 72 bytes
    assert inspect_image(str(bomb)) == (None, 'more pixels than PIL allows (decompression-bomb limit)')
    # In a process allowed only 512 MiB more address space than it has after its imports, the check still
    # gives that answer: it never decodes the pixels (decoding them would be a MemoryError).
    script = ('import resource, sys; from mlla_mm.datasets.checks import inspect_image; '
              'import PIL.PngImagePlugin; '
              'used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize(); '
              'resource.setrlimit(resource.RLIMIT_AS, (used + (512 << 20), resource.RLIM_INFINITY)); '
              'print(inspect_image(sys.argv[1]))')
    done = subprocess.run([sys.executable, '-c', script, str(bomb)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(None, 'more pixels than PIL allows (decompression-bomb limit)')"
    fine = _png_header_only(tmp_path / 'small.png', 4, 2)  # the same file with a small header is an image
    assert inspect_image(str(fine))[0] == (4, 2)
