#!/usr/bin/env python
"""Convert a published MLLA checkpoint (ImageNet, mmdet 2.x, mmseg 0.x, plain) to mlla-mm's layout.

    python tools/convert_checkpoint.py SRC DST [--backbone-only] [--use-ema] [--trusted]

Running it on its own output gives the same file. A file that is not a
safe checkpoint (see mlla_mm.checkpoint.load_file), a missing source, a
directory given as SRC, a DST that cannot be written (a directory, a file
in the way, no permission; checked before SRC is read) or a failed write
(e.g. a full disk) is one ``error:`` line naming the file and exit code 2;
DST may not be SRC itself (nor a link to it), nor an existing file the
converter did not write unless ``--force``;
the destination is written atomically, so a failed write leaves any
previous file there unchanged.
"""
import os
import sys

from mlla_mm.checkpoint import AtomicWriteError, CheckpointError, check_file, convert_file
from mlla_mm.cli import ToolArgumentParser
from mlla_mm.utils.io import output_path_problem, same_path


def converted_by_this_tool(path: str) -> bool:
    """Whether ``path`` is a torch zip whose pickle records ``mlla_mm_layout`` (what :func:`convert_file` writes).

    Reads only the zip directory and the pickle member (no tensor data, nothing unpickled).
    """
    import zipfile
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith('/data.pkl') or n == 'data.pkl']
            if len(names) != 1 or archive.getinfo(names[0]).file_size > 64 << 20:
                return False
            return b'mlla_mm_layout' in archive.read(names[0])
    except (OSError, zipfile.BadZipFile, ValueError, KeyError):
        return False


def check_paths(src: str, dst: str, trusted: bool = False, force: bool = False) -> str:
    """Why SRC cannot be read or DST cannot be written, before any work; ``''`` when both are fine."""
    try:
        check_file(src, trusted=True if trusted else None)
    except (CheckpointError, FileNotFoundError) as err:
        return str(err)
    if same_path(src, dst):  # the source itself (also through a link): --backbone-only would drop the rest
        return f'cannot write {dst}: it is the source {src}; write the converted file elsewhere'
    problem = output_path_problem(dst)
    if problem:
        return f'cannot write {dst}: {problem}'
    if os.path.lexists(dst) and not force and not converted_by_this_tool(dst):
        return f'{dst} exists and was not written by this converter (add --force to overwrite it)'
    return ''


def main(argv=None) -> int:
    parser = ToolArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('src', help='checkpoint to read')
    parser.add_argument('dst', help='file to write (written atomically)')
    parser.add_argument('--backbone-only', action='store_true', help='keep only the backbone weights')
    parser.add_argument('--use-ema', action='store_true', help='take state_dict_ema of a training checkpoint')
    parser.add_argument('--trusted', action='store_true',
                        help='the file is trusted: allow arbitrary pickled objects (runs code from it)')
    parser.add_argument('--force', action='store_true',
                        help='overwrite an existing DST that this converter did not write (never SRC)')
    args = parser.parse_args(argv)
    problem = check_paths(args.src, args.dst, args.trusted, args.force)
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
