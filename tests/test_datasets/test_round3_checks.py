"""Issue 26 items 6, 8, 9: the data check refuses what mmcv, mmseg or pycocotools would load wrongly or crash on.

Crafted files: rotated PNG/WebP/MPO/TIFF pictures (EXIF orientation), polygons with NaN/inf/1e10
coordinates, RLE masks of another size or with broken counts, a PNG whose IDAT is garbage under valid
CRCs, label maps with values that are no class, image ids of two types.
"""
import json
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from mlla_mm.datasets import checks, coco_checks, image_files
from mlla_mm.datasets.checks import (BadAnnotationError, BadImageError, check_annotations, check_seg_folder,
                                     inspect_image, inspect_label_map)
from tests.helpers import ds_cfg, make_coco, png_bytes, write_ann, write_label


def check(root, data, loader='train_dataloader', **cfg):
    path = write_ann(root, data)
    return path, check_annotations(ds_cfg(root, **cfg), loader, 'my_cfg.py')


def _pixels(size, seed=0):
    w, h = size
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def write_rotated(path, size, orientation):
    """A ``size`` (width, height) picture whose EXIF orientation is ``orientation``, in the suffix's format."""
    img = Image.fromarray(_pixels(size))
    if path.suffix == '.tif':
        img.save(path, tiffinfo={0x0112: orientation})
        return path
    exif = Image.Exif()
    exif[0x0112] = orientation
    if path.suffix == '.mpo':  # a JPEG with a second picture (what phone cameras write)
        img.save(path, format='MPO', save_all=True, append_images=[img], exif=exif)
    else:
        img.save(path, exif=exif)
    return path


# ---- item 6: EXIF orientation of every format ---------------------------------------------------------------
@pytest.mark.parametrize('suffix', ['.png', '.webp', '.mpo', '.tif'])
@pytest.mark.parametrize('orientation', [3, 6, 8])
def test_rotated_image_size_is_the_size_mmcv_loads(tmp_path, suffix, orientation):
    import mmcv
    path = write_rotated(tmp_path / f'r{suffix}', (40, 24), orientation)
    size, reason = inspect_image(str(path))
    assert reason == ''
    loaded = {}
    for backend in ('cv2', 'pillow'):
        img = mmcv.imfrombytes(path.read_bytes(), flag='color', backend=backend)
        loaded[backend] = (img.shape[1], img.shape[0])
    assert size == loaded['pillow']
    if suffix != '.tif':  # OpenCV rotates TIFFs too; see the test below for the backends' agreement
        assert size == loaded['cv2']
    assert size == ((24, 40) if orientation in (6, 8) else (40, 24))


@pytest.mark.parametrize('suffix', ['.png', '.webp', '.mpo'])
def test_rotated_picture_with_unrotated_width_height_is_refused(tmp_path, suffix):
    """The old check took the header size of these formats: boxes of a 90-degree picture trained unrotated."""
    data = make_coco(tmp_path, num_images=2, size=(64, 48))
    write_rotated(tmp_path / 'img' / f'im1{suffix}', (64, 48), 6)
    data['images'][1]['file_name'] = f'im1{suffix}'
    with pytest.raises(BadImageError, match=rf'im1\{suffix} is 48x64, the file says 64x48') as err:
        check(tmp_path, data)
    assert str(tmp_path / 'ann.json') in str(err.value) and '\n' not in str(err.value)


# ---- item 8: what the pipeline decodes --------------------------------------------------------------------------
def _idat(width, height, rows=None, filter_byte=0):
    """zlib data of ``rows`` rows (default all) of an RGB ``width`` x ``height`` picture."""
    raw = b''.join(bytes([filter_byte]) + bytes(range(3 * width)) for _ in range(height if rows is None else rows))
    return zlib.compress(raw)


GARBAGE = b'\x78\x9c' + bytes(np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8))


@pytest.mark.parametrize('idat, words', [
    (GARBAGE, 'PNG pixel data: zlib'),
    (_idat(32, 24, rows=10), 'PNG pixel data holds 970 of 2328 bytes'),
    (_idat(32, 24, filter_byte=9), 'PNG row filter type 9'),
])
def test_png_with_damaged_pixel_data_under_valid_crcs(tmp_path, idat, words):
    import mmcv
    path = tmp_path / 'img' / 'im1.png'
    data = make_coco(tmp_path, size=(32, 24), suffix='.png')
    path.write_bytes(png_bytes(32, 24, idat))
    with Image.open(path) as im:
        im.verify()  # what the old check relied on: every CRC is right
    # what the training loop would have met mid-epoch: LoadImageFromFile's default backend cannot decode it
    assert mmcv.imfrombytes(path.read_bytes(), backend='cv2') is None
    size, reason = inspect_image(str(path))
    assert size is None and reason.startswith('damaged image file') and words in reason
    with pytest.raises(BadImageError, match=r'1 of 3 images cannot be read.*im1\.png \(damaged image file'):
        check(tmp_path, data)
    # the same file with intact pixel data passes
    path.write_bytes(png_bytes(32, 24, _idat(32, 24)))
    assert inspect_image(str(path)) == ((32, 24), '')


def test_interlaced_and_16_bit_pngs_pass(tmp_path):
    Image.fromarray(_pixels((33, 17))).save(tmp_path / 'i.png', interlace=1)
    Image.fromarray(np.arange(35 * 9, dtype=np.uint16).reshape(9, 35)).save(tmp_path / 'g16.png')
    assert inspect_image(str(tmp_path / 'i.png')) == ((33, 17), '')
    assert inspect_image(str(tmp_path / 'g16.png')) == ((35, 9), '')


def test_other_formats_are_decoded_in_full(tmp_path):
    """WebP has no verify(): one whose bitstream is zeroed after its header passed the old check."""
    import mmcv
    path = tmp_path / 'a.webp'
    Image.fromarray(_pixels((64, 48))).save(path, lossless=True)
    raw = path.read_bytes()
    path.write_bytes(raw[:40] + bytes(len(raw) - 40))
    with Image.open(path) as im:
        assert im.size == (64, 48)  # the header is intact
    assert mmcv.imfrombytes(path.read_bytes(), backend='cv2') is None
    size, reason = inspect_image(str(path))
    assert size is None and reason.startswith('damaged image file')


POLY_CRASH = '''
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 31, resource.RLIM_INFINITY))
from pycocotools import mask
seg, h, w = json.loads(sys.argv[1])
if isinstance(seg, list):
    rle = mask.merge(mask.frPyObjects(seg, h, w))
elif isinstance(seg['counts'], list):
    rle = mask.frPyObjects(seg, h, w)
else:
    rle = seg
m = mask.decode(rle)
print('decoded', m.shape)
'''


def _pycocotools_decode(seg, h=48, w=64):
    """Decode ``seg`` as mmdet's LoadAnnotations does, in a child process limited to 2 GiB of address space.

    A crash below Python (SIGSEGV) is a negative return code; the limit makes a huge allocation fail at once.
    """
    return subprocess.run([sys.executable, '-c', POLY_CRASH, json.dumps([seg, h, w])], capture_output=True,
                          text=True, timeout=120)


BAD_POLYGONS = {
    'nan': [[4, 5, 24, 5, float('nan'), 15, 4, 15]],
    'inf': [[4, 5, float('inf'), 5, 24, 15, 4, 15]],
    '1e10': [[4, 5, 1e10, 5, 24, 15, 4, 15]],
}


@pytest.mark.parametrize('name', sorted(BAD_POLYGONS))
def test_polygon_coordinates_that_crash_pycocotools(tmp_path, name):
    seg = BAD_POLYGONS[name]
    done = _pycocotools_decode(seg)
    assert done.returncode < 0 and 'decoded' not in done.stdout, (done.returncode, done.stdout, done.stderr[-500:])
    data = make_coco(tmp_path)
    data['annotations'][3]['segmentation'] = seg
    with pytest.raises(BadAnnotationError, match=r'1 annotations have polygon coordinates that are not finite '
                                                 r'.*annotation ids 4 \(coordinate ') as err:
        check(tmp_path, data)
    assert str(tmp_path / 'ann.json') in str(err.value) and '\n' not in str(err.value)
    # a coordinate a little outside the image is fine (and decodes)
    data['annotations'][3]['segmentation'] = [[-3.5, 5, 70, 5, 24, 50, 4, 15]]
    assert _pycocotools_decode(data['annotations'][3]['segmentation']).returncode == 0
    assert check(tmp_path, data)[1] == []


def test_polygon_coordinate_that_is_not_a_number(tmp_path):
    data = make_coco(tmp_path)
    data['annotations'][1]['segmentation'] = [[4, 5, '24px', 5, 24, 15]]
    data['annotations'][4]['segmentation'] = [[4, 5, None, 5, 24, 15]]
    data['annotations'][2]['segmentation'] = [4, 5, 24, 5, 24, 15]  # flat list: mmdet takes len() of a number
    with pytest.raises(BadAnnotationError, match=r'neither a list of polygons .*annotation ids 3 '):
        check(tmp_path, data)
    data['annotations'][2]['segmentation'] = [[4, 5, 24, 5, 24, 15]]
    with pytest.raises(BadAnnotationError, match=r'annotation ids 2 \(a polygon coordinate that is not a number\), '
                                                 r'5 \(a polygon coordinate that is not a number\) '):
        check(tmp_path, data)
    data['annotations'][1]['segmentation'] = [[4, 5, '24', 5, 24, 15]]  # pycocotools converts it
    data['annotations'][4]['segmentation'] = [[4, 5, 24, 5, 24, 15, 7]]  # the odd number is ignored
    assert check(tmp_path, data)[1] != []  # (a warning about the odd polygon, as before)


def _rle(h, w):
    from pycocotools import mask
    m = np.zeros((h, w), np.uint8, order='F')
    m[5:15, 4:24] = 1
    rle = mask.encode(m)
    rle['counts'] = rle['counts'].decode('ascii')
    return rle


def test_rle_of_a_huge_size_crashes_pycocotools_and_is_refused(tmp_path):
    huge = dict(_rle(48, 64), size=[100000, 100000])
    done = _pycocotools_decode(huge)
    assert done.returncode < 0 and 'decoded' not in done.stdout, (done.returncode, done.stdout, done.stderr[-500:])
    data = make_coco(tmp_path)
    data['annotations'][0]['segmentation'] = huge
    with pytest.raises(BadAnnotationError, match=r'1 annotations have an RLE mask pycocotools cannot decode .*'
                                                 r'annotation ids 1 \(RLE size 100000x100000 \(height x width\) '
                                                 r'is not its image\'s 48x64\)'):
        check(tmp_path, data)


@pytest.mark.parametrize('change, words', [
    (lambda r: r.__setitem__('size', [64, 48]), "RLE size 64x48 (height x width) is not its image's 48x64"),
    (lambda r: r.__setitem__('size', [48]), 'is not [height, width]'),
    (lambda r: r.__setitem__('counts', [100, 200]), 'RLE counts cover 300 pixels, its 48x64 image has 3072'),
    (lambda r: r.__setitem__('counts', [3000, -10, 82]), 'not all non-negative integers'),
    (lambda r: r.__setitem__('counts', r['counts'] + '7'), 'cover'),           # one more run: too many pixels
    (lambda r: r.__setitem__('counts', r['counts'][:-1] + 'o'), 'not a valid COCO RLE string'),  # runs past end
    (lambda r: r.__setitem__('counts', r['counts'] + '\x7f'), 'not a valid COCO RLE string'),
    (lambda r: r.__setitem__('counts', 7), 'RLE "counts" is a int'),
])
def test_rle_that_does_not_fit_its_image(tmp_path, change, words):
    data = make_coco(tmp_path)
    rle = _rle(48, 64)
    change(rle)
    data['annotations'][2]['segmentation'] = rle
    with pytest.raises(BadAnnotationError, match=r'annotation ids 3 \(') as err:
        check(tmp_path, data)
    assert words in str(err.value) and '\n' not in str(err.value)


def test_valid_rle_passes_and_counts_read_like_pycocotools(tmp_path):
    from pycocotools import mask
    data = make_coco(tmp_path)
    data['annotations'][0]['segmentation'] = _rle(48, 64)
    data['annotations'][1]['segmentation'] = dict(size=[48, 64], counts=[100, 200, 2772])  # uncompressed
    data['annotations'][1]['iscrowd'] = 1
    assert check(tmp_path, data)[1] == []
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = np.asfortranarray(rng.random((37, 23)) < rng.random())
        rle = mask.encode(m.astype(np.uint8))
        ours = coco_checks._rle_string_counts(rle['counts'].decode('ascii'))
        theirs = mask.frPyObjects(dict(size=[37, 23], counts=ours.tolist()), 37, 23)
        assert theirs['counts'] == rle['counts']  # the runs we read encode back to the same string


def test_short_polygons_in_an_evaluated_set(tmp_path):
    """COCO mask evaluation reads a 2-number first polygon as 'input type is not supported'."""
    data = make_coco(tmp_path)
    data['annotations'][4]['segmentation'] = [[1, 1, 5, 5]]
    data['annotations'][5]['segmentation'] = [[1, 1]]
    with pytest.raises(BadAnnotationError, match=r'2 annotations have polygons with fewer than 3 points.*ids 5, 6'):
        check(tmp_path, data, loader='val_dataloader')
    # training data: mmdet drops them; counted in the warning line as before
    _, warnings = check(tmp_path, data)
    assert len(warnings) == 1 and '2 polygons with fewer than 3 points' in warnings[0]
    # boxes only: the masks are never decoded (the warning line as for training)
    assert len(check(tmp_path, data, loader='val_dataloader', with_mask=False)[1]) == 1


# ---- item 8: label values of segmentation maps ----------------------------------------------------------------
@pytest.fixture
def seg_data(tmp_path):
    """3 pairs of 32x24 with labels 0..3 (what 4 classes allow)."""
    for i in range(3):
        img = tmp_path / 'images' / f'a{i}.jpg'
        img.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pixels((32, 24), seed=i)).save(img)
        write_label(tmp_path / 'labels' / f'a{i}.png', np.arange(32 * 24).reshape(24, 32) % 4)
    return tmp_path


def seg_cfg(root, **extra):
    return dict(dict(type='BaseSegDataset', data_root=str(root), img_suffix='.jpg', seg_map_suffix='.png',
                     reduce_zero_label=False, metainfo=dict(classes=('bg', 'a', 'b', 'c')),
                     data_prefix=dict(img_path='images', seg_map_path='labels')), **extra)


def test_label_values_above_num_classes(seg_data):
    label = np.arange(32 * 24).reshape(24, 32) % 4
    label[0, :3] = [7, 255, 200]
    write_label(seg_data / 'labels' / 'a1.png', label)
    assert inspect_label_map(str(seg_data / 'labels' / 'a1.png')) == ((32, 24), '', (0, 1, 2, 3, 7, 200, 255))
    with pytest.raises(BadImageError) as err:
        check_seg_folder(seg_cfg(seg_data), 'train_dataloader', 'seg.py', num_classes=4)
    msg = str(err.value)
    assert msg.startswith(f'{seg_data / "images"}: 1 of 3 label maps hold values that are not classes')
    assert f'{seg_data / "labels" / "a1.png"} (7, 200)' in msg and 'num_classes=4' in msg and '0..3 or 255' in msg
    assert '\n' not in msg
    # the model's num_classes decides; without it, the data set's classes (4 here)
    assert check_seg_folder(seg_cfg(seg_data), 'train_dataloader', num_classes=201) == []
    with pytest.raises(BadImageError, match='num_classes=4'):
        check_seg_folder(seg_cfg(seg_data), 'train_dataloader')


def test_label_value_is_an_index_error_in_the_loss(seg_data):
    """What the value check prevents: mmseg's cross-entropy on a label >= num_classes."""
    import torch
    from mmseg.models.losses import CrossEntropyLoss
    target = torch.tensor([[[0, 7]]])
    with pytest.raises((IndexError, RuntimeError), match='out of bounds'):
        CrossEntropyLoss()(torch.zeros(1, 4, 1, 2), target, ignore_index=255)


def test_label_values_with_reduce_zero_label(seg_data):
    label = np.arange(32 * 24).reshape(24, 32) % 5  # 0 (ignored) and 1..4 -> classes 0..3
    write_label(seg_data / 'labels' / 'a0.png', label)
    assert check_seg_folder(seg_cfg(seg_data, reduce_zero_label=True), 'val_dataloader', num_classes=4) == []
    with pytest.raises(BadImageError, match=r'a0\.png \(4\).*reduce_zero_label'):
        check_seg_folder(seg_cfg(seg_data), 'val_dataloader', num_classes=4)


def test_label_map_with_garbage_pixel_data(seg_data):
    bad = seg_data / 'labels' / 'a2.png'
    bad.write_bytes(png_bytes(32, 24, GARBAGE, colour=0))
    with pytest.raises(BadImageError, match=r'1 of 3 image/label pairs .*label map .*a2\.png \(damaged image file'):
        check_seg_folder(seg_cfg(seg_data), 'train_dataloader', num_classes=4)


def test_rgb_label_map_is_refused(seg_data):
    Image.fromarray(_pixels((32, 24))).save(seg_data / 'labels' / 'a0.png')
    with pytest.raises(BadImageError, match=r'a0\.png \(label map with 3 channels'):
        check_seg_folder(seg_cfg(seg_data), 'train_dataloader', num_classes=4)


def test_check_data_takes_num_classes_from_the_decode_head(seg_data, tmp_path):
    from mmengine.config import Config
    label = np.zeros((24, 32), np.uint8)
    label[3, 3] = 5
    write_label(seg_data / 'labels' / 'a2.png', label)
    cfg = Config(dict(default_scope='mmseg', work_dir=str(tmp_path / 'w'),
                      model=dict(type='EncoderDecoder', decode_head=dict(type='FCNHead', num_classes=5)),
                      train_dataloader=dict(dataset=seg_cfg(seg_data))))
    with pytest.raises(BadImageError, match=r'a2\.png \(5\).*num_classes=5 .*0\.\.4 or 255'):
        checks.check_data(cfg, ('train_dataloader', ), 'seg.py')
    cfg.model.decode_head.num_classes = 6
    assert checks.check_data(cfg, ('train_dataloader', ), 'seg.py') == []


def test_long_checks_show_progress(seg_data, monkeypatch, capsys):
    monkeypatch.setattr(image_files, 'PROGRESS_AFTER_S', 0.0)
    check_seg_folder(seg_cfg(seg_data), 'train_dataloader', num_classes=4)
    err = capsys.readouterr().err
    assert 'checking images: 3/3 files' in err and 'checking label maps: 3/3 files' in err
    monkeypatch.setattr(image_files, 'PROGRESS_AFTER_S', 60.0)
    check_seg_folder(seg_cfg(seg_data), 'val_dataloader', num_classes=4)
    assert capsys.readouterr().err == ''


# ---- item 9: ids of two types --------------------------------------------------------------------------------
def _coco_with_a_string_id(root, table, key, new):
    """``make_coco(root)`` whose second entry of ``table`` has the string id ``new`` (so do the annotations'
    ``key`` that named its number)."""
    data = make_coco(root)
    old = data[table][1]['id']
    data[table][1]['id'] = new
    for a in data['annotations']:
        if a[key] == old:
            a[key] = new
    return data


def test_mixed_int_and_str_image_ids(tmp_path):
    data = _coco_with_a_string_id(tmp_path, 'images', 'image_id', 'two')
    with pytest.raises(BadAnnotationError, match=r"image ids are both numbers and strings \(e\.g\. 1 and 'two'\)"
                       ) as err:
        check(tmp_path, data, loader='val_dataloader')
    assert str(tmp_path / 'ann.json') in str(err.value) and '\n' not in str(err.value)
    # what it prevents: pycocotools' evaluation fails only once it has run
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt = COCO(str(tmp_path / 'ann.json'))
    dt = gt.loadRes([dict(image_id=1, category_id=1, bbox=[4, 5, 20, 10], score=0.9)])
    with pytest.raises(TypeError):
        COCOeval(gt, dt, 'bbox').evaluate()
    # one type (all strings) is fine
    for img in data['images']:
        img['id'] = str(img['id'])
    for a in data['annotations']:
        a['image_id'] = str(a['image_id'])
    assert check(tmp_path, data, loader='val_dataloader')[1] == []


def test_mixed_category_id_types(tmp_path):
    data = _coco_with_a_string_id(tmp_path, 'categories', 'category_id', 'dog')
    with pytest.raises(BadAnnotationError, match=r"category ids are both numbers and strings \(e\.g\. 1 and 'dog'\)"):
        check(tmp_path, data)
