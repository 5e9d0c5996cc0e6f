#!/usr/bin/env python
"""Convert a published MLLA checkpoint (ImageNet, mmdet 2.x, mmseg 0.x, plain) to mlla-mm's layout.

    python tools/convert_checkpoint.py SRC DST [--backbone-only] [--use-ema] [--trusted]

Running it on its own output gives the same file. A file that is not a
safe checkpoint (see mlla_mm.checkpoint.load_file), a missing source, a
directory given as SRC, a DST that cannot be written (a directory, a file
in the way, no permission; checked before SRC is read) or a failed write
(e.g. a full disk) is one ``error:`` line naming the file and exit code 2;
DST may not be SRC itself (nor a link to it);
the destination is written atomically, so a failed write leaves any
previous file there unchanged.
"""
import sys

from mlla_mm.checkpoint import AtomicWriteError, CheckpointError, check_file, convert_file
from mlla_mm.cli import ToolArgumentParser
from mlla_mm.utils.io import output_path_problem, same_path


def check_paths(src: str, dst: str, trusted: bool = False) -> str:
    """Why SRC cannot be read or DST cannot be written, before any work; ``''`` when both are fine."""
    try:
        check_file(src, trusted=True if trusted else None)
    except (CheckpointError, FileNotFoundError) as err:
        return str(err)
    if same_path(src, dst):  # the source itself (also through a link): --backbone-only would drop the rest
        return f'cannot write {dst}: it is the source {src}; write the converted file elsewhere'
    problem = output_path_problem(dst)
    return f'cannot write {dst}: {problem}' if problem else ''


def main(argv=None) -> int:
    parser = ToolArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('src', help='checkpoint to read')
    parser.add_argument('dst', help='file to write (written atomically)')
    parser.add_argument('--backbone-only', action='store_true', help='keep only the backbone weights')
    parser.add_argument('--use-ema', action='store_true', help='take state_dict_ema of a training checkpoint')
    parser.add_argument('--trusted', action='store_true',
                        help='the file is trusted: allow arbitrary pickled objects (runs code from it)')
    args = parser.parse_args(argv)
    problem = check_paths(args.src, args.dst, args.trusted)
    if problem:
        print(f'error: {problem}', file=sys.stderr)
        return 2
    try:
        out = convert_file(args.src, args.dst, use_ema=args.use_ema, backbone_only=args.backbone_only,
                           trusted=True if args.trusted else None)
    except (CheckpointError, FileNotFoundError, AtomicWriteError) as err:
        message = err.strerror if isinstance(err, AtomicWriteError) and err.strerror else str(err)
        print(f'error: {message}', file=sys.stderr)
        return 2
    meta = out['meta']
    print(f'wrote {args.dst}: {len(out["state_dict"])} tensors, layout {meta["mlla_mm_layout"]} '
          f'(from {meta.get("source_layout")}), dropped {len(meta.get("dropped_keys", []))} unused keys')
    return 0


if __name__ == '__main__':
    sys.exit(main())
