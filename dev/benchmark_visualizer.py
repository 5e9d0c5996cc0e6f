#!/usr/bin/env python
"""Maintainer timing: drawing a detection picture, mmdet's DetLocalVisualizer against mlla-mm's FastDetVisualizer.

    python dev/benchmark_visualizer.py [--data data/shapes_coco] [--split val] [--images 20] [--repeats 3]

What ``tools/test.py --show-dir`` does per test image, for the first
``--images`` images of a COCO-format split: read the image, draw ground truth
and predictions side by side, write the PNG. The "predictions" are the ground
truth with a score of 0.9 (so both visualizers draw the same instances). Rounds
alternate the order of the two visualizers; prints the CPU, each one's median
milliseconds per image and the median of the per-round ratios (fast / mmdet).
The demo's data set is made first if missing.

Bad input (a count below 1; a missing, invalid or non-COCO annotation file;
missing or unreadable images) is one ``error:`` line on stderr naming the
argument or file, exit code 2: the annotation file and its images are checked
first, with the checks ``tools/test.py`` runs
(:func:`mlla_mm.datasets.checks.check_annotations`).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    from mlla_mm.cli import ToolArgumentParser, positive_int
    p = ToolArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default=str(ROOT / 'data' / 'shapes_coco'),
                   help='COCO-format data set root with annotations/instances_<split>.json and <split>/')
    p.add_argument('--split', default='val')
    p.add_argument('--images', type=positive_int, default=20, help='images drawn per round')
    p.add_argument('--repeats', type=positive_int, default=3, help='timed rounds (after one warm-up round)')
    p.add_argument('--threads', type=positive_int, default=2, help='torch threads (default 2)')
    return p.parse_args(argv)


def check_split(root: Path, split: str) -> Path:
    """The split's annotation file, checked as ``tools/test.py`` checks it (JSON, COCO structure, images).

    Raises:
        DataNotFoundError: The file is missing, a folder, not valid JSON or not COCO format, or
            names images that are missing or unreadable (one line naming the file).
    """
    from mlla_mm.datasets.check_base import SKIP_HINT
    from mlla_mm.datasets.checks import DataNotFoundError, check_annotations
    ann_file = root / 'annotations' / f'instances_{split}.json'
    if not ann_file.is_file() and not ann_file.is_dir():
        raise DataNotFoundError(f'{ann_file} not found (expected a COCO-format data set under --data {root})')
    # classes=(): the file's own categories are drawn, so no class list to match (every category is kept).
    ds = dict(type='CocoDataset', data_root=str(root), ann_file=f'annotations/instances_{split}.json',
              data_prefix=dict(img=f'{split}/'), metainfo=dict(classes=()))
    try:
        check_annotations(ds, f'--data {root} --split {split}', 'dev/benchmark_visualizer.py', train=False)
    except DataNotFoundError as err:  # this tool has no --skip-bad-images: leave that hint out
        raise type(err)(str(err).replace(SKIP_HINT, 'fix or remove them')) from None
    return ann_file


def load_samples(root: Path, split: str, count: int):
    """``[(image path, DetDataSample with gt_instances and pred_instances)]`` for the first ``count`` images."""
    from pycocotools.coco import COCO

    from mlla_mm.datasets.checks import BadAnnotationError
    from mlla_mm.cli import one_line
    ann_file = check_split(root, split)
    coco = COCO(str(ann_file))
    cat_ids = coco.getCatIds()
    samples = []
    for img in coco.loadImgs(coco.getImgIds()[:count]):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img['id']))
        try:
            sample = _sample(coco, img, anns, cat_ids)
        except (KeyError, TypeError, ValueError, IndexError) as err:  # e.g. an annotation without segmentation
            raise BadAnnotationError(f'{ann_file}: cannot draw the annotations of image {img["file_name"]}: '
                                     f'{type(err).__name__}: {one_line(err)}') from None
        samples.append((str(root / split / img['file_name']), sample))
    classes = [c['name'] for c in coco.loadCats(cat_ids)]
    return samples, classes


def _sample(coco, img: dict, anns: list, cat_ids: list):
    """A DetDataSample with ``anns`` as ground truth and as predictions (score 0.9)."""
    import torch
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    inst = InstanceData()
    inst.bboxes = torch.tensor([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2],
                                 a['bbox'][1] + a['bbox'][3]] for a in anns], dtype=torch.float32).reshape(-1, 4)
    inst.labels = torch.tensor([cat_ids.index(a['category_id']) for a in anns], dtype=torch.long)
    inst.masks = torch.from_numpy(np.array([coco.annToMask(a) for a in anns], bool).reshape(
        len(anns), img['height'], img['width']))
    pred = inst.clone()
    pred.scores = torch.full((len(anns), ), 0.9)
    sample = DetDataSample()
    sample.gt_instances = inst
    sample.pred_instances = pred
    return sample


def main(argv=None) -> int:
    from mlla_mm.cli import run_main
    args = parse_args(argv)
    return run_main(lambda: run_benchmark(args))  # bad data: one ``error:`` line naming the file, exit code 2


def run_benchmark(args: argparse.Namespace) -> int:
    from mlla_mm.cli import UsageError
    import torch
    torch.set_num_threads(args.threads)
    import cv2
    from mmdet.utils import register_all_modules
    from mmdet.visualization import DetLocalVisualizer

    from mlla_mm.utils.cpu import cpu_description
    from mlla_mm.utils.timing import interleaved_times, median, paired_ratio
    from mlla_mm.visualization import FastDetVisualizer, _colour
    register_all_modules()
    root = Path(args.data)
    if root.resolve() == (ROOT / 'data' / 'shapes_coco').resolve() and not root.is_dir():
        from mmengine.config import Config

        from mlla_mm.datasets.synthetic import make_synthetic_data  # the demo's data set, as its config makes it
        cfg = Config.fromfile(str(ROOT / 'configs' / 'detection' / 'mask_rcnn_mlla_t_demo.py'))
        cfg.synthetic_data.root = str(root)
        make_synthetic_data(cfg)
    samples, classes = load_samples(root, args.split, args.images)
    palette = [_colour(i, None) for i in range(len(classes))]  # the visualizer's own fixed colours
    visualizers = {'mmdet': DetLocalVisualizer(name='bench-mmdet'), 'fast': FastDetVisualizer(name='bench-fast')}
    for vis in visualizers.values():
        vis.dataset_meta = dict(classes=classes, palette=palette)

    def draw_all(key, out_dir):
        def run():
            for path, sample in samples:
                image = cv2.imread(path, cv2.IMREAD_COLOR)  # None when missing or unreadable
                if image is None:
                    raise ValueError(f'{path}: missing or not a readable image')
                image = np.ascontiguousarray(image[..., ::-1])  # RGB, as the visualization hook passes it
                visualizers[key].add_datasample('x', image, sample, out_file=os.path.join(out_dir, key + '.png'),
                                                pred_score_thr=0.3)
        return run

    try:
        with tempfile.TemporaryDirectory(prefix='mlla_mm_vis_') as out_dir:
            times = interleaved_times({k: draw_all(k, out_dir) for k in visualizers}, args.repeats)
    except ValueError as err:
        raise UsageError(str(err)) from None
    cpu = cpu_description()['model_name']
    n = len(samples)
    print(f'CPU: {cpu}; {args.threads} threads; {n} images of {args.split} from {root}, {args.repeats} rounds')
    for key, label in (('mmdet', "mmdet's DetLocalVisualizer"), ('fast', 'FastDetVisualizer')):
        print(f'  {label:<28} {1000 * median(times[key]) / n:8.1f} ms per image')
    print(f'  fast / mmdet (median of per-round ratios): {paired_ratio(times, "fast", "mmdet"):.3f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
