#!/usr/bin/env python
"""Classify images with an MLLA ImageNet classifier (timm), or evaluate it on a folder.

    python tools/classify.py IMAGE [IMAGE ...] --weights MLLA_T.pth [--model mlla_tiny] [--show-dir DIR]
    python tools/classify.py --data-dir DIR --weights MLLA_T.pth [--model mlla_tiny] [--batch-size 32]

With images it prints the five most likely ImageNet classes of each (timm's
ImageNet-1k class names) and, with ``--show-dir``, writes each picture with
its top-5 drawn under it. With ``--data-dir`` it evaluates a folder in
``ImageFolder`` layout (one subfolder per class, named by its WordNet id such
as ``n01440764`` or by its class index) and prints top-1 and top-5 accuracy.

Images are prepared as the published model was evaluated (timm's transform
from the model's pretrained_cfg: bicubic resize to 256, centre crop 224,
ImageNet mean/std). The weights file is read by mlla-mm's safe loader; the
number of classes comes from its head. ``--model-kwargs`` passes arguments to
the model (e.g. another arch: ``embed_dim=32 depths=(1,1,1,1)``).

No output (``--out``, the pictures of ``--show-dir``) replaces an input (an
image or the weights; refused even with ``--force``) or an existing file the
tools did not write, unless ``--force`` is given; pictures of two images
with the same name (``a/x.jpg``, ``b/x.jpg``) get distinct names
(``x_top5.png``, ``x_top5_2.png``).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.pgm')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from mlla_mm.cli import ToolArgumentParser, non_negative_int, positive_int
    parser = ToolArgumentParser(description='Classify images with an MLLA ImageNet classifier, '
                                'or evaluate it on an ImageFolder-layout folder.')
    parser.add_argument('images', nargs='*', help='image files to classify')
    parser.add_argument('--weights', required=True, help='classifier checkpoint (e.g. the published MLLA_T.pth)')
    parser.add_argument('--model', default='mlla_tiny', help='timm model name (default: mlla_tiny)')
    parser.add_argument('--model-kwargs', nargs='+', default=[], metavar='KEY=VALUE',
                        help='extra model arguments, values as Python literals, e.g. embed_dim=32')
    parser.add_argument('--use-ema', action='store_true', help='take state_dict_ema of a training checkpoint')
    parser.add_argument('--data-dir', help='evaluate on this folder (class subfolders) instead of images')
    parser.add_argument('--show-dir', help='write each image with its top-5 drawn here')
    parser.add_argument('--topk', type=positive_int, default=5, help='classes to print per image (default 5)')
    parser.add_argument('--batch-size', type=positive_int, default=32,
                        help='batch size for --data-dir (default 32)')
    parser.add_argument('--workers', type=non_negative_int, default=2,
                        help='data loading processes for --data-dir (default 2; 0: in the main process)')
    parser.add_argument('--out', help='write the results as JSON to this file')
    parser.add_argument('--device', default=None, help='cpu, cuda, cuda:1 ... (default: cuda if available)')
    parser.add_argument('--force', action='store_true',
                        help='overwrite existing files that mlla-mm did not write (never an input)')
    args = parser.parse_args(argv)
    if bool(args.images) == bool(args.data_dir):
        parser.error('give either IMAGE files or --data-dir')
    if args.show_dir and args.data_dir:
        parser.error('--show-dir draws single images; it does not go with --data-dir')
    return args


def parse_model_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """``['embed_dim=32', 'depths=(1,1,1,1)']`` -> ``{'embed_dim': 32, 'depths': (1, 1, 1, 1)}``."""
    from mlla_mm.cli import UsageError
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key.isidentifier():
            raise UsageError(f'--model-kwargs: expected KEY=VALUE, got {item!r}')
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a plain string
    return out


# --------------------------------------------------------------------------
# Model and class names.
# --------------------------------------------------------------------------
def build_classifier(name: str, weights: str, model_kwargs: Dict[str, Any], use_ema: bool):
    """The timm model ``name`` with the classifier weights of ``weights`` (safe loader, strict)."""
    import timm

    import mlla_mm  # noqa: F401  (registers the models)
    from mlla_mm.checkpoint import load_file
    from mlla_mm.cli import UsageError
    from mlla_mm.models import checkpoint_filter_fn, load_checkpoint_weights

    choices = timm.list_models('mlla_*')
    if name.split('.')[0] not in choices:
        raise UsageError(f'--model: {name!r} is not an MLLA classifier; choose one of {choices}')
    state_dict = checkpoint_filter_fn(load_file(weights), use_ema=use_ema, source=weights)
    head = state_dict.get('head.weight')
    if head is None or head.dim() != 2:
        raise UsageError(f'{weights}: has no classifier head (head.weight); a backbone checkpoint cannot classify '
                         '(the published ImageNet checkpoints MLLA_T/S/B.pth have one)')
    try:
        model = timm.create_model(name, num_classes=head.shape[0], **model_kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError(f'--model {name} --model-kwargs: {err}') from None
    load_checkpoint_weights(model, state_dict, source=weights)
    return model.eval()


def class_names(num_classes: int) -> Tuple[List[str], List[str]]:
    """(WordNet ids, descriptions) of timm's ImageNet-1k classes, or plain indices for another head."""
    if num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return ([info.index_to_label_name(i) for i in range(num_classes)],
                [info.index_to_description(i) for i in range(num_classes)])
    return [str(i) for i in range(num_classes)], [f'class {i}' for i in range(num_classes)]


# --------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------
def open_image(path: str):
    """An RGB PIL image; a one-line error naming the file when it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    from mlla_mm.cli import UsageError
    if not os.path.isfile(path):
        raise FileNotFoundError(f'image not found: {path}')
    try:
        with Image.open(path) as img:
            return img.convert('RGB')
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UsageError(f'cannot read image {path}: {err}') from None


def folder_samples(root: str, num_classes: int, label_names: List[str]) -> Tuple[List[Tuple[str, int]], Dict[str, int]]:
    """``(path, class index)`` of every image under ``root/<class>/``; class folders named by WordNet id or index."""
    from mlla_mm.cli import UsageError
    if not os.path.isdir(root):
        raise FileNotFoundError(f'--data-dir not found: {root}')
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    if not folders:
        raise UsageError(f'--data-dir {root}: no class subfolders '
                         f'(expected ImageFolder layout: {root}/<class>/<image>)')
    by_name = {n: i for i, n in enumerate(label_names)}
    if all(f in by_name for f in folders):
        mapping = {f: by_name[f] for f in folders}
    elif all(f.isdigit() and int(f) < num_classes for f in folders):
        mapping = {f: int(f) for f in folders}
    else:
        bad = [f for f in folders if f not in by_name and not (f.isdigit() and int(f) < num_classes)]
        if not bad:
            raise UsageError(f'--data-dir {root}: class folders mix WordNet ids and class indices '
                             f'({folders[0]!r}, {folders[-1]!r}); name every class folder one way')
        kind = 'an ImageNet WordNet id (e.g. n01440764) or' if num_classes == 1000 else ''
        raise UsageError(f'--data-dir {root}: class folder {bad[0]!r} is not {kind} a class index below '
                         f'{num_classes}')
    samples = []
    for folder in folders:
        base = os.path.join(root, folder)
        for dirpath, _, files in sorted(os.walk(base)):
            for fname in sorted(files):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fname), mapping[folder]))
    if not samples:
        raise UsageError(f'--data-dir {root}: no images ({", ".join(IMAGE_EXTENSIONS)}) in its class folders')
    return samples, mapping


class FolderDataset:
    """Images and targets; an unreadable image yields its error message instead of raising in a worker."""

    def __init__(self, samples: List[Tuple[str, int]], transform: Any) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        import torch
        path, target = self.samples[index]
        try:
            return self.transform(open_image(path)), target, ''
        except Exception as err:  # reported by the main process, one line naming the file
            from mlla_mm.cli import one_line
            text = one_line(err)
            return torch.zeros(0), target, text if path in text else f'cannot read image {path}: {text}'


def collate(batch):
    import torch
    errors = [e for _, _, e in batch if e]
    if errors:
        return None, None, errors[0]
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), ''


# --------------------------------------------------------------------------
# The two modes.
# --------------------------------------------------------------------------
def draw_top(img, lines: List[str]):
    """The image (at least 320 pixels wide) above a white panel with ``lines``."""
    from PIL import Image, ImageDraw, ImageFont
    width = max(img.width, 320)
    if width != img.width:
        img = img.resize((width, max(1, round(img.height * width / img.width))), Image.BICUBIC)
    font = ImageFont.load_default()
    line_h = 14
    canvas = Image.new('RGB', (width, img.height + line_h * len(lines) + 8), 'white')
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, img.height + 4 + i * line_h), line, fill='black', font=font)
    return canvas


def show_paths(images: Sequence[str], show_dir: str, k: int) -> List[str]:
    """A distinct ``show_dir/<stem>_top<k>.png`` per image (a name taken twice gets ``_2``, ``_3``, ...)."""
    from mlla_mm.utils.io import distinct_paths
    return distinct_paths([[os.path.join(show_dir, f'{os.path.splitext(os.path.basename(p))[0]}_top{k}.png')]
                           for p in images])


def check_show_paths(args: argparse.Namespace, k: int) -> List[str]:
    """The ``--show-dir`` pictures.

    A :class:`UsageError` when one would replace an input, ``--out`` or a foreign file.
    """
    from mlla_mm.cli import UsageError
    from mlla_mm.utils.io import check_outputs
    shown = show_paths(args.images, args.show_dir, k)
    check_outputs(shown, [args.weights, *args.images, args.out], force=args.force, option='--show-dir',
                  error=UsageError)
    return shown


def classify_images(args: argparse.Namespace, model, transform, device) -> Dict[str, Any]:
    import io

    import torch

    from mlla_mm.utils.io import atomic_write, png_signed
    synsets, descriptions = class_names(model.num_classes)
    k = min(args.topk, model.num_classes)
    results = []
    shown = check_show_paths(args, k) if args.show_dir else []
    for n, path in enumerate(args.images):
        img = open_image(path)
        with torch.no_grad():
            probs = model(transform(img).unsqueeze(0).to(device)).float().softmax(-1)[0].cpu()
        top = probs.topk(k)
        print(path)
        lines = []
        for rank, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            line = f'{rank}. {p:.4f}  {i:4d} {synsets[i]}  {descriptions[i]}'
            print('  ' + line)
            lines.append(f'{rank}. {p:.3f} {descriptions[i]}')
        results.append(dict(image=path, top=[dict(index=i, label=synsets[i], description=descriptions[i], prob=p)
                                             for p, i in zip(top.values.tolist(), top.indices.tolist())]))
        if args.show_dir:
            out = shown[n]
            buf = io.BytesIO()
            draw_top(img, lines).save(buf, format='PNG')
            with atomic_write(out) as f:
                f.write(png_signed(buf.getvalue()))
            print(f'  drawn: {out}')
    return dict(images=results)


def evaluate_folder(args: argparse.Namespace, model, transform, device) -> Dict[str, Any]:
    import torch
    from mmengine.utils import ProgressBar

    from mlla_mm.cli import UsageError
    synsets, _ = class_names(model.num_classes)
    samples, mapping = folder_samples(args.data_dir, model.num_classes, synsets)
    loader = torch.utils.data.DataLoader(FolderDataset(samples, transform), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=collate, shuffle=False)
    k = min(5, model.num_classes)
    correct1 = correct5 = seen = 0
    bar = None
    for images, targets, error in loader:
        if error:
            if bar is not None:
                sys.stderr.write('\n')  # end the progress bar's line
            raise UsageError(error)
        if bar is None:  # started once data arrives, so a bad first image gives one clean line
            bar = ProgressBar(len(samples), file=sys.stderr)
        with torch.no_grad():
            logits = model(images.to(device)).float().cpu()
        top = logits.topk(k, dim=-1).indices
        hits = top == targets[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        seen += len(targets)
        bar.update(len(targets))
    sys.stderr.write('\n')
    top1, top5 = 100.0 * correct1 / seen, 100.0 * correct5 / seen
    print(f'{args.data_dir}: {seen} images, {len(mapping)} classes, model {args.model}, weights {args.weights}')
    print(f'top-1 accuracy: {top1:.2f}% ({correct1}/{seen})')
    print(f'top-{k} accuracy: {top5:.2f}% ({correct5}/{seen})')
    return dict(data_dir=args.data_dir, images=seen, classes=len(mapping), top1=top1, top5=top5,
                correct1=correct1, correct5=correct5)


def classify(args: argparse.Namespace) -> int:
    import torch
    from timm.data import create_transform, resolve_data_config

    from mlla_mm.checkpoint import check_file
    from mlla_mm.cli import UsageError, check_device, check_output, one_line
    from mlla_mm.utils.io import WRITTEN_BY, AtomicWriteError, atomic_write, check_outputs
    # Everything the user gave is checked before the model is built.
    device = check_device(args.device) if args.device else torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    check_output(args.out, '--out')
    check_output(args.show_dir, '--show-dir', folder=True)
    if not os.path.exists(args.weights):  # where to get the published file and where to put it
        from mlla_mm.models.timm_mlla import MissingWeightsError, missing_weights_message
        raise MissingWeightsError(missing_weights_message(args.weights, args.model, option='--weights'))
    check_file(args.weights, name='--weights')  # a folder or refused: before the model is built
    for path in args.images:
        if os.path.isdir(path):
            raise UsageError(f'{path} is a directory, not an image (a folder of class subfolders goes to --data-dir)')
        if not os.path.isfile(path):
            raise FileNotFoundError(f'image not found: {path}')
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise UsageError(f'--data-dir {args.data_dir}: ' + ('not a directory' if os.path.exists(args.data_dir)
                                                           else 'not found'))
    # never an input (images, weights), nor a file the tools did not write unless --force (the pictures again
    # once the model says k: a head with fewer classes than --topk draws fewer)
    check_outputs([args.out] if args.out else [], [args.weights, *args.images], force=args.force, option='--out',
                  error=UsageError)
    if args.show_dir:
        check_show_paths(args, args.topk)
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    model = build_classifier(args.model, args.weights, model_kwargs, args.use_ema)
    model.to(device)
    transform = create_transform(**resolve_data_config({}, model=model))
    try:
        if args.data_dir:
            result = evaluate_folder(args, model, transform, device)
        else:
            result = classify_images(args, model, transform, device)
        if args.out:
            result = dict(written_by=f'{WRITTEN_BY} classify', **result, model=args.model, weights=args.weights)
            with atomic_write(args.out, 'w') as f:
                json.dump(result, f, indent=1)
    except AtomicWriteError as err:  # its message without the '[Errno N]' prefix
        raise UsageError(err.strerror or one_line(err)) from None
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mlla_mm.cli import run_main
    args = parse_args(argv)
    return run_main(lambda: classify(args))


if __name__ == '__main__':
    sys.exit(main())
