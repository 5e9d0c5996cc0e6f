"""Small COCO-format data sets with one defect each, for the data-check tests."""
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

CLASSES = ('cat', 'dog')


def write_image(path: Path, size: Tuple[int, int] = (64, 48), seed: int = 0, exif_orientation: int = 0) -> Path:
    """A random RGB image of ``size`` (width, height); the format follows the suffix."""
    w, h = size
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        extra['exif'] = exif
    Image.fromarray(pixels).save(path, **extra)
    return path


def make_coco(root: Path, num_images: int = 3, size: Tuple[int, int] = (64, 48), suffix: str = '.jpg') -> Dict:
    """Images ``img/im<i><suffix>`` under ``root`` and a clean COCO dict: one cat and one dog per image."""
    images, anns = [], []
    for i in range(num_images):
        name = f'im{i}{suffix}'
        write_image(root / 'img' / name, size, seed=i)
        images.append(dict(id=i + 1, file_name=name, width=size[0], height=size[1]))
        for cat in (1, 2):
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=cat, bbox=[4.0, 5.0, 20.0, 10.0],
                             area=200.0, iscrowd=0, segmentation=[[4, 5, 24, 5, 24, 15, 4, 15]]))
    return dict(images=images, annotations=anns,
                categories=[dict(id=k + 1, name=n) for k, n in enumerate(CLASSES)])


def write_ann(root: Path, data: Dict, name: str = 'ann.json') -> Path:
    path = root / name
    path.write_text(json.dumps(data))
    return path


def ds_cfg(root: Path, classes: Optional[Tuple[str, ...]] = CLASSES, with_mask: bool = True,
           ann: str = 'ann.json') -> Dict:
    """A CocoDataset config on ``root`` (plain dict, as check_annotations gets it)."""
    pipeline: List[Dict] = [dict(type='LoadImageFromFile'),
                            dict(type='LoadAnnotations', with_bbox=True, with_mask=with_mask)]
    cfg = dict(type='CocoDataset', data_root=str(root) + '/', ann_file=ann, data_prefix=dict(img='img/'),
               pipeline=pipeline)
    if classes is not None:
        cfg['metainfo'] = dict(classes=classes)
    return cfg


def build_coco_dataset(cfg: Dict):
    """mmdet's CocoDataset from a config made by :func:`ds_cfg` (no pipeline, no filtering)."""
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = dict(cfg, pipeline=[], filter_cfg=None)
    return DATASETS.build(cfg)


def png_bytes(width: int, height: int, idat: bytes, colour: int = 2, depth: int = 8) -> bytes:
    """A PNG file with the given (possibly damaged) ``IDAT`` content; every chunk has a valid CRC."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, depth, colour, 0, 0, 0))
            + chunk(b'IDAT', idat) + chunk(b'IEND', b''))


def write_label(path: Path, values: np.ndarray) -> Path:
    """A gray (8-bit) label map PNG holding ``values`` (height x width)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, np.uint8)).save(path)
    return path
