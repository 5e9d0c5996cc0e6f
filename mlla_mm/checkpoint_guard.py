"""What a checkpoint may contain, checked before torch's ``weights_only`` unpickler reads it.

:func:`mlla_mm.checkpoint.load_file` reads every checkpoint with
``torch.load(weights_only=True)``. That unpickler never imports or calls
anything outside its allow-list, but the allow-list itself can be talked into
allocating without bound (``bytearray(2**31)``, ``torch.Tensor(2**40)``,
``UntypedStorage(n)``, chains of ``_codecs.encode``, storages that claim more
elements than the archive holds) and a zip archive can expand without bound.
This module checks a file first, without running anything from it:

1. :func:`inspect_archive`: the file must be a torch zip archive (legacy
   pre-1.6 files and TorchScript archives are refused); members must not
   overlap, and their declared uncompressed sizes together must stay within
   ``MAX_EXPANSION`` times the file size (+ ``EXPANSION_SLACK``), which
   refuses zip bombs (torch stores its members uncompressed).
2. :func:`scan_pickle`: an abstract interpretation of ``data.pkl`` with
   :func:`pickletools.genops`. Only the opcodes torch's unpickler knows are
   accepted, only the globals in :data:`ROLES`, and every call, object
   creation and ``BUILD`` must have the exact form that ``torch.save``,
   NumPy, mmengine or yacs write (e.g. ``bytearray`` only of bytes the pickle
   holds, ``set`` only of a list it holds). Every storage it declares must
   fit its archive member, every tensor must fit its storage, and the Python
   objects it builds are costed: more than ``OBJECT_BUDGET_BASE +
   OBJECT_BUDGET_PER_BYTE`` x (pickle size) is refused, as is nesting
   deeper than ``MAX_DEPTH``, a container that contains itself, a graph
   whose size as a tree (shared containers counted once per use, as
   readers walk it) exceeds ``MAX_TREE_NODES_BASE +
   MAX_TREE_NODES_PER_BYTE`` x (pickle size), and a dict or set with more
   than ``MAX_SAME_HASH`` distinct keys of one hash (quadratic to build).
3. :func:`safe_globals`: the names torch's unpickler may resolve, with three
   foreign names mapped to inert stand-ins of this module (yacs' ``CfgNode``
   and argparse's ``Namespace`` become a plain ``OrderedDict``, whose
   identifier-named attributes the file may set; mmengine's ``HistoryBuffer`` becomes
   :class:`LoadedHistoryBuffer`, whose ``__setstate__`` accepts only the
   buffer's own three fields and writes nothing but them, on the instance).

So nothing in a file can write to a class, a function or module state, and
reading a file of N bytes allocates at most about ``MAX_EXPANSION`` x N
bytes for its members plus the costed Python objects.
"""
from __future__ import annotations

import functools
import io
import math
import os
import pickletools
import re
import struct
import zipfile
import zlib
from collections import OrderedDict
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

import numpy as np
import torch

#: Declared uncompressed bytes of all archive members per byte of file.
MAX_EXPANSION = 4
#: ... plus this many bytes (small files).
EXPANSION_SLACK = 1 << 20
#: Python objects the pickle may build: this many bytes ...
OBJECT_BUDGET_BASE = 64 << 20
#: ... plus this many per byte of pickle (real checkpoints cost 16-25 per byte by this account).
OBJECT_BUDGET_PER_BYTE = 64
#: Deepest nesting of containers in a checkpoint.
MAX_DEPTH = 100
#: Nodes of the pickle's object graph as a tree walk sees them (a container shared by N others counts N
#: times; torch's ``Optimizer.load_state_dict`` and mmengine walk it that way): this many ...
MAX_TREE_NODES_BASE = 1 << 20
#: ... plus this many per byte of pickle (a pickle without shared containers has at most one per byte).
MAX_TREE_NODES_PER_BYTE = 2
#: Distinct keys of one dict (or items of one set) with the same hash: more make building it quadratic.
MAX_SAME_HASH = 8
#: Keys of one dict (or items of one set) whose hash the scan cannot compute but a file can choose
#: (numpy scalars, complex numbers, devices): more are refused.
MAX_OPAQUE_KEYS = 1024
#: Most dimensions of one tensor or array.
MAX_NDIM = 64

HISTORY_BUFFER = 'mmengine.logging.history_buffer.HistoryBuffer'
CFG_NODE = 'yacs.config.CfgNode'
#: timm's train.py saves its arguments (an argparse.Namespace) under ``args``.
NAMESPACE = 'argparse.Namespace'
#: The instance fields of mmengine's HistoryBuffer (mmengine 0.x).
HISTORY_BUFFER_FIELDS = frozenset({'max_length', '_log_history', '_count_history'})
#: mmengine's HistoryBuffer.__getstate__ adds its class-level statistics methods under this key ...
HISTORY_BUFFER_STATISTICS = 'statistics_methods'
#: ... which pickle as ``getattr(HistoryBuffer, name)`` for these names.
DEFAULT_STATISTICS = frozenset({'min', 'max', 'current', 'mean'})
_NUMPY_DTYPES = frozenset(f'{k}{n}' for k, ns in (('b', (1, )), ('i', (1, 2, 4, 8)), ('u', (1, 2, 4, 8)),
                                                   ('f', (2, 4, 8)), ('c', (8, 16))) for n in ns)
_IDENT = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')
_STORAGE_KEY = re.compile(r'^[A-Za-z0-9_.]{1,64}$')
_ALLOWED_OPS = frozenset({
    'PROTO', 'STOP', 'GLOBAL', 'NEWOBJ', 'REDUCE', 'BUILD', 'APPEND', 'APPENDS', 'SETITEM', 'SETITEMS', 'MARK',
    'TUPLE', 'TUPLE1', 'TUPLE2', 'TUPLE3', 'NONE', 'NEWFALSE', 'NEWTRUE', 'EMPTY_TUPLE', 'EMPTY_LIST',
    'EMPTY_DICT', 'EMPTY_SET', 'BININT', 'BININT1', 'BININT2', 'BINFLOAT', 'BINUNICODE', 'SHORT_BINSTRING',
    'BINPERSID', 'BINGET', 'LONG_BINGET', 'BINPUT', 'LONG_BINPUT', 'LONG1'})


class Refused(Exception):
    """The file may not be read; ``args[0]`` says why.

    ``names_code`` is set when the file names or calls something outside the
    allow-list (a trusted file could still be read with plain pickle).
    """

    def __init__(self, reason: str, names_code: bool = False) -> None:
        super().__init__(reason)
        self.names_code = names_code


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ('bytes', 'KiB', 'MiB', 'GiB', 'TiB'):
        if abs(n) < 1024 or unit == 'TiB':
            return f'{n:.0f} {unit}' if unit == 'bytes' else f'{n:.1f} {unit}'
        n /= 1024
    return f'{n:.1f} TiB'  # pragma: no cover


# --------------------------------------------------------------------------
# The inert stand-ins.
# --------------------------------------------------------------------------
class NamespaceStandIn:
    """Stand-in for ``argparse.Namespace`` (timm's ``train.py`` checkpoints keep their arguments in one).

    Creating it returns a fresh ``OrderedDict``; the file's arguments land in
    that instance's ``__dict__`` (so ``ckpt['args'].lr`` still reads). Only
    identifier-named attributes, as for :class:`CfgNodeStandIn`.
    """

    def __new__(cls) -> 'OrderedDict[Any, Any]':  # type: ignore[misc]
        return OrderedDict()


class CfgNodeStandIn:
    """Stand-in for yacs' ``CfgNode``: the file's node becomes a plain ``OrderedDict``.

    Published ImageNet training checkpoints store their yacs config under
    ``config``. Creating the stand-in returns a fresh ``OrderedDict`` (torch's
    unpickler then fills in its items); yacs' own flags land in that
    instance's ``__dict__``. Nothing of yacs is imported or run.
    """

    def __new__(cls) -> 'OrderedDict[Any, Any]':  # type: ignore[misc]
        return OrderedDict()


@functools.lru_cache(maxsize=None)
def history_buffer_class() -> type:
    """:class:`LoadedHistoryBuffer` (made on first use: it subclasses mmengine's ``HistoryBuffer``)."""
    from mmengine.logging.history_buffer import HistoryBuffer
    # The default statistics are registered (class-level, by mmengine itself) when the first buffer
    # is made; make one now, so reading a file never changes HistoryBuffer's class state.
    HistoryBuffer()

    class LoadedHistoryBuffer(HistoryBuffer):
        """What a checkpoint's ``HistoryBuffer`` is created as; it ends up a plain ``HistoryBuffer``.

        The unpickler can only create it empty and then call this class's
        ``__setstate__``. Unlike mmengine's, which writes the file's
        ``statistics_methods`` into the class-level registry, it takes the
        three instance fields, checks them, sets them on the instance and
        turns the instance into a plain mmengine ``HistoryBuffer`` (what
        mmengine's resume expects, and what it pickles as again). The file's
        statistics may only name mmengine's four defaults (see
        :func:`history_buffer_statistic`) and are otherwise ignored: the
        registry stays mmengine's own.
        """

        def __setstate__(self, state: Any) -> None:
            keys = set(state) if isinstance(state, dict) else set()
            if not (isinstance(state, dict) and HISTORY_BUFFER_FIELDS <= keys
                    <= HISTORY_BUFFER_FIELDS | {HISTORY_BUFFER_STATISTICS}):
                got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
                raise ValueError(f'HistoryBuffer state must have the fields {sorted(HISTORY_BUFFER_FIELDS)} '
                                 f'(and {HISTORY_BUFFER_STATISTICS!r}), got {got}')
            stats = state.get(HISTORY_BUFFER_STATISTICS, {})
            if not isinstance(stats, dict) or any(k not in DEFAULT_STATISTICS or v != k for k, v in stats.items()):
                raise ValueError(f'HistoryBuffer {HISTORY_BUFFER_STATISTICS} may only name '
                                 f'{sorted(DEFAULT_STATISTICS)}')
            log, count, max_length = state['_log_history'], state['_count_history'], state['max_length']
            if type(max_length) is not int or max_length < 1:
                raise ValueError(f'HistoryBuffer max_length must be a positive int, got {max_length!r}')
            for name, arr in (('_log_history', log), ('_count_history', count)):
                if type(arr) is not np.ndarray or arr.ndim != 1 or arr.dtype.kind not in 'biuf':
                    raise ValueError(f'HistoryBuffer {name} must be a 1-d numeric array')
            if len(log) != len(count):
                raise ValueError('HistoryBuffer _log_history and _count_history differ in length')
            vars(self).update(max_length=max_length, _log_history=log, _count_history=count)
            self.__class__ = HistoryBuffer  # this instance only: a plain HistoryBuffer from here on

    LoadedHistoryBuffer.__module__ = __name__
    LoadedHistoryBuffer.__qualname__ = 'LoadedHistoryBuffer'
    return LoadedHistoryBuffer


def history_buffer_statistic(cls: Any, name: Any) -> str:
    """What the name ``builtins.getattr`` resolves to while a checkpoint is read: never ``getattr``.

    mmengine's HistoryBuffer pickles its statistics methods as
    ``getattr(HistoryBuffer, 'mean')``. This accepts exactly that, for
    mmengine's four default statistics, and returns the name (the stand-in
    ignores it; mmengine's registry already holds them). Anything else is
    refused.
    """
    if cls is not history_buffer_class() or name not in DEFAULT_STATISTICS:
        import pickle
        raise pickle.UnpicklingError(f'getattr({getattr(cls, "__name__", cls)!r}, {name!r}) is not allowed')
    return name


def _numpy_reconstruct() -> Any:
    core = getattr(np, '_core', None) or np.core
    return core.multiarray._reconstruct, core.multiarray.scalar


def safe_globals() -> List[Any]:
    """What torch's unpickler may resolve besides its own names: NumPy's and the stand-ins.

    Entries are ``(object, 'qualified.name')`` pairs (torch's safe-globals
    API), so a name in a file maps to exactly the object given here.
    """
    reconstruct, scalar = _numpy_reconstruct()
    out: List[Any] = [(history_buffer_class(), HISTORY_BUFFER), (history_buffer_statistic, 'builtins.getattr'),
                      (CfgNodeStandIn, CFG_NODE), (NamespaceStandIn, NAMESPACE),
                      (np.ndarray, 'numpy.ndarray'), (np.dtype, 'numpy.dtype')]
    for core in ('numpy.core', 'numpy._core'):
        out += [(reconstruct, f'{core}.multiarray._reconstruct'), (scalar, f'{core}.multiarray.scalar')]
    # torch's BUILD needs the type of a fresh numeric dtype among the allowed objects (the scan
    # allows BUILD only on dtypes a file made with copy=True, with numeric dtypes' state).
    for code in sorted(_NUMPY_DTYPES):
        cls = type(np.dtype(code))
        out.append((cls, f'{cls.__module__}.{cls.__qualname__}'))
    return out


# --------------------------------------------------------------------------
# What each allowed global may be used for.
# --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def roles() -> Dict[str, Tuple[str, Any]]:
    """Qualified name -> (role, detail) for every global a checkpoint may name."""
    from torch import _weights_only_unpickler as wou
    from torch.serialization import StorageType
    out: Dict[str, Tuple[str, Any]] = {}
    for name, obj in wou._get_allowed_globals().items():
        if isinstance(obj, torch.dtype):
            out[name] = ('dtype', obj)
        elif isinstance(obj, StorageType):
            out[name] = ('storage_type', obj.dtype)
        elif obj is torch.UntypedStorage:
            out[name] = ('storage_type', torch.uint8)
    u = torch._utils
    for fn, role in ((u._rebuild_tensor_v2, 'rebuild_tensor_v2'), (u._rebuild_tensor, 'rebuild_tensor'),
                     (u._rebuild_parameter, 'rebuild_parameter'),
                     (u._rebuild_parameter_with_state, 'rebuild_parameter_with_state')):
        out[f'torch._utils.{fn.__name__}'] = (role, fn)
    out['torch._tensor._rebuild_from_type_v2'] = ('rebuild_from_type_v2', None)
    out.update({
        'torch.Tensor': ('tensor_type', torch.Tensor),
        'torch.nn.parameter.Parameter': ('tensor_type', torch.nn.Parameter),
        'torch.Size': ('size', None), 'torch.device': ('device', None),
        'torch.serialization._get_layout': ('layout', None),
        'collections.OrderedDict': ('odict', None), 'collections.Counter': ('counter', None),
        '_codecs.encode': ('encode', None), 'builtins.bytearray': ('bytearray', None),
        'builtins.set': ('set', None), 'builtins.complex': ('complex', None),
        'numpy.ndarray': ('np_ndarray', None), 'numpy.dtype': ('np_dtype', None),
        HISTORY_BUFFER: ('history_buffer', None), CFG_NODE: ('cfg_node', None), NAMESPACE: ('cfg_node', None),
        'builtins.getattr': ('hb_statistic', None)})
    for core in ('numpy.core', 'numpy._core'):
        out[f'{core}.multiarray._reconstruct'] = ('np_reconstruct', None)
        out[f'{core}.multiarray.scalar'] = ('np_scalar', None)
    return out


@functools.lru_cache(maxsize=None)
def _layout_names() -> frozenset:
    return frozenset(str(v) for v in vars(torch).values() if isinstance(v, torch.layout))


# --------------------------------------------------------------------------
# 1. The archive.
# --------------------------------------------------------------------------
class Archive:
    """What :func:`inspect_archive` found: the record prefix, member sizes and ``data.pkl``."""

    def __init__(self, prefix: str, sizes: Dict[str, int], pickle: bytes) -> None:
        self.prefix = prefix
        self.sizes = sizes
        self.pickle = pickle


def inspect_archive(f: BinaryIO) -> Archive:
    """Check the zip structure of a torch checkpoint (an open binary file) and return its ``data.pkl``.

    Raises:
        Refused: Not a torch zip archive, inconsistent or overlapping members,
            too much declared expansion (a zip bomb), no ``data.pkl``.
    """
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head = f.read(512)
    f.seek(0)
    if not head.startswith(b'PK\x03\x04'):
        if head[:1] == b'\x80' or head[257:262] == b'ustar':
            raise Refused('it is in the legacy (torch < 1.6) format, which cannot be read safely '
                          '(re-save it with a current torch, or convert it once as a trusted file)',
                          names_code=True)
        raise Refused('it is not a PyTorch checkpoint (no zip archive at the start of the file)')
    # torch.save writes no archive comment: the end record is the last 22 bytes. Requiring that (and
    # no data before the archive) makes Python's zipfile and torch's reader see the same members.
    f.seek(max(size - 22, 0))
    tail = f.read(22)
    f.seek(0)
    if len(tail) != 22 or tail[:4] != b'PK\x05\x06' or tail[20:22] != b'\0\0':
        raise Refused('the zip archive is truncated or corrupt (no end record at the end of the file)')
    try:
        zf = zipfile.ZipFile(f)
        endrec = zipfile._EndRecData(f)  # type: ignore[attr-defined]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as err:
        raise Refused(f'the zip archive is truncated or corrupt ({err})') from None
    with zf:
        if not endrec or zf.start_dir != endrec[zipfile._ECD_OFFSET]:  # type: ignore[attr-defined]
            raise Refused('the zip archive does not start at the start of the file (data before it)')
        infos = zf.infolist()
        if not infos:
            raise Refused('the zip archive is empty')
        first = infos[0].filename
        if '/' not in first:
            raise Refused(f'archive member {first!r} is not in a folder (not written by torch.save)')
        prefix = first.split('/', 1)[0]
        sizes: Dict[str, int] = {}
        folded = set()
        for info in infos:
            if info.orig_filename != info.filename or not info.filename.isascii() or '\\' in info.filename:
                raise Refused(f'archive member {info.orig_filename!r} has an unusual name')
            if info.filename.lower() in folded:
                raise Refused(f'archive member {info.filename!r} appears twice')
            folded.add(info.filename.lower())
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise Refused(f'archive member {info.filename!r} uses compression method {info.compress_type}')
            if info.flag_bits & 0x1:
                raise Refused(f'archive member {info.filename!r} is encrypted')
            if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
                raise Refused(f'archive member {info.filename!r} has inconsistent sizes')
            sizes[info.filename] = info.file_size
        spans = sorted(_member_span(f, info, size) for info in infos)
        end_of_data = zf.start_dir
        for (start, stop, name), nxt in zip(spans, spans[1:] + [(end_of_data, 0, '')]):
            if stop > nxt[0] or stop > size:
                raise Refused(f'archive member {name!r} overlaps {"the next member" if nxt[2] else "the end"}: '
                              'a crafted archive')
        declared = sum(sizes.values())
        limit = MAX_EXPANSION * size + EXPANSION_SLACK
        if declared > limit:
            raise Refused(f'its members declare {human_bytes(declared)} uncompressed from a '
                          f'{human_bytes(size)} file (more than {MAX_EXPANSION}x + {human_bytes(EXPANSION_SLACK)}): '
                          'a zip bomb?')
        if f'{prefix}/constants.pkl' in sizes:
            raise Refused('it is a TorchScript archive (torch.jit.save), not a checkpoint')
        name = f'{prefix}/data.pkl'
        if name not in sizes:
            raise Refused('the archive has no data.pkl (not written by torch.save)')
        try:
            data = zf.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as err:
            raise Refused(f'the zip archive is truncated or corrupt ({err})') from None
    return Archive(prefix, sizes, data)


def _member_span(f: BinaryIO, info: zipfile.ZipInfo, size: int) -> Tuple[int, int, str]:
    """``(start, end, name)`` of a member's local header and data, by its local header's own lengths.

    A reader (torch's included) finds a member's data after the local header's
    name and extra fields, whose lengths may differ from the central
    directory's: a crafted local header could point into the next member.
    """
    if info.header_offset < 0 or info.header_offset + 30 > size:
        raise Refused(f'archive member {info.filename!r} starts outside the file: a crafted archive')
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b'PK\x03\x04':
        raise Refused(f'archive member {info.filename!r} has no local header where the directory says: '
                      'a crafted archive')
    name_len, extra_len = struct.unpack('<HH', head[26:30])
    return info.header_offset, info.header_offset + 30 + name_len + extra_len + info.compress_size, info.filename


# --------------------------------------------------------------------------
# 2. The pickle.
# --------------------------------------------------------------------------
class _G:
    """An allowed global named by the pickle."""
    __slots__ = ('name', 'role', 'detail')

    def __init__(self, name: str, role: str, detail: Any) -> None:
        self.name, self.role, self.detail = name, role, detail


class _O:
    """An object the pickle builds (abstractly): its kind, contents and facts."""
    __slots__ = ('kind', 'items', 'keys', 'n', 'built', 'info')

    def __init__(self, kind: str, n: int = 0, info: Any = None) -> None:
        self.kind = kind          # list, dict, set, bytes, storage, tensor, hb, ndarray, npdtype, ...
        self.items: List[Any] = []
        self.keys: List[Any] = []
        self.n = n                # bytes of a bytes object; elements of a storage
        self.built = False
        self.info = info


def _describe(v: Any, depth: int = 0) -> str:
    if isinstance(v, _G):
        return v.name
    if isinstance(v, _O):
        return {'hb': 'a HistoryBuffer', 'npdtype': 'a numpy dtype', 'ndarray': 'a numpy array'}.get(v.kind, v.kind)
    if isinstance(v, tuple):
        if depth > 2:
            return '(...)'
        return '(' + ', '.join(_describe(x, depth + 1) for x in v[:4]) + (', ...' if len(v) > 4 else '') + ')'
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + '...'


def _is_int(v: Any) -> bool:
    return type(v) is int


def _ints(v: Any) -> Optional[Tuple[int, ...]]:
    if isinstance(v, _O) and v.kind == 'size':
        return v.info
    if isinstance(v, tuple) and len(v) <= MAX_NDIM and all(_is_int(x) and x >= 0 for x in v):
        return v
    return None


class _Scanner:
    """Abstract interpretation of a ``weights_only`` pickle; see the module docstring."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.budget = OBJECT_BUDGET_BASE + OBJECT_BUDGET_PER_BYTE * len(archive.pickle)
        self.used = 0
        self.storages: Dict[str, Tuple[torch.dtype, int]] = {}
        self.hashed: List[_O] = []  # every dict and set built (reachable from the result or not)

    def _hashed(self, obj: _O) -> _O:
        """Note a dict or set: the unpickler hashes its keys when it builds it (see :func:`_check_keys`)."""
        self.hashed.append(obj)
        return obj

    def charge(self, nbytes: int, what: str) -> None:
        self.used += nbytes
        if self.used > self.budget:
            raise Refused(f'its pickle builds more than {human_bytes(self.budget)} of Python objects from '
                          f'{human_bytes(len(self.archive.pickle))} (at {what}): a memory bomb?')

    # -- the interpreter ----------------------------------------------------
    def run(self) -> None:
        stack: List[Any] = []
        metastack: List[List[Any]] = []
        memo: Dict[int, Any] = {}
        from torch._utils import IMPORT_MAPPING, NAME_MAPPING
        try:
            for op, arg, pos in pickletools.genops(io.BytesIO(self.archive.pickle)):
                name = op.name
                if name not in _ALLOWED_OPS:
                    raise Refused(f'its pickle uses opcode {name} (at byte {pos}), which checkpoints '
                                  'never contain', names_code=name in (
                                      'INST', 'OBJ', 'NEWOBJ_EX', 'STACK_GLOBAL', 'EXT1', 'EXT2', 'EXT4'))
                if name == 'GLOBAL':
                    module, _, attr = arg.partition(' ')
                    if (module, attr) in NAME_MAPPING:
                        module, attr = NAME_MAPPING[(module, attr)]
                    elif module in IMPORT_MAPPING:
                        module = IMPORT_MAPPING[module]
                    full = f'{module}.{attr}'
                    found = roles().get(full)
                    if found is None:
                        raise Refused(f'its pickle names {full}, which is not on the allow-list '
                                      '(reading it could run code)', names_code=True)
                    stack.append(_G(full, *found))
                    self.charge(8, full)
                elif name in ('BININT', 'BININT1', 'BININT2', 'LONG1', 'BINFLOAT'):
                    stack.append(arg)
                    self.charge(32, name)
                elif name in ('BINUNICODE', 'SHORT_BINSTRING'):
                    stack.append(arg)
                    self.charge(64 + 2 * len(arg), name)
                elif name in ('NONE', 'NEWTRUE', 'NEWFALSE'):
                    stack.append({'NONE': None, 'NEWTRUE': True, 'NEWFALSE': False}[name])
                    self.charge(8, name)
                elif name == 'EMPTY_TUPLE':
                    stack.append(())
                    self.charge(8, name)
                elif name == 'EMPTY_LIST':
                    stack.append(_O('list'))
                    self.charge(64, name)
                elif name == 'EMPTY_DICT':
                    stack.append(self._hashed(_O('dict', info='dict')))
                    self.charge(64, name)
                elif name == 'EMPTY_SET':
                    stack.append(_O('set'))
                    self.charge(216, name)
                elif name == 'MARK':
                    metastack.append(stack)
                    stack = []
                    self.charge(64, name)
                elif name == 'TUPLE':
                    items = stack
                    stack = metastack.pop()
                    stack.append(tuple(items))
                    self.charge(48 + 8 * len(items), name)
                elif name in ('TUPLE1', 'TUPLE2', 'TUPLE3'):
                    k = int(name[-1])
                    if len(stack) < k:
                        raise IndexError
                    stack[-k:] = [tuple(stack[-k:])]
                    self.charge(48 + 8 * k, name)
                elif name in ('BINPUT', 'LONG_BINPUT'):
                    memo[arg] = stack[-1]
                    self.charge(64, name)
                elif name in ('BINGET', 'LONG_BINGET'):
                    if arg not in memo:
                        raise Refused(f'its pickle is corrupt (memo {arg} used before it is set, at byte {pos})')
                    stack.append(memo[arg])
                    self.charge(8, name)
                elif name == 'APPEND':
                    item = stack.pop()
                    self._append(stack[-1], [item])
                elif name == 'APPENDS':
                    items = stack
                    stack = metastack.pop()
                    self._append(stack[-1], items)
                elif name == 'SETITEM':
                    value, key = stack.pop(), stack.pop()
                    self._setitems(stack[-1], [key, value])
                elif name == 'SETITEMS':
                    items = stack
                    stack = metastack.pop()
                    self._setitems(stack[-1], items)
                elif name == 'BINPERSID':
                    stack.append(self._storage(stack.pop()))
                elif name == 'REDUCE':
                    args = stack.pop()
                    stack[-1] = self._call(stack[-1], args)
                elif name == 'NEWOBJ':
                    args = stack.pop()
                    stack[-1] = self._new(stack[-1], args)
                elif name == 'BUILD':
                    state = stack.pop()
                    self._build(stack[-1], state)
                elif name == 'STOP':
                    self._check_structure(stack[-1])
                    budget = _KeyBudget(MAX_TREE_NODES_BASE + MAX_TREE_NODES_PER_BYTE * len(self.archive.pickle))
                    for obj in self.hashed:  # built, so hashed, even when not part of the result
                        _check_keys(obj.keys if obj.kind == 'dict' else obj.items, obj.kind, budget)
                    return
                # PROTO: nothing to check (torch's unpickler only warns on protocols other than 2).
        except Refused:
            raise
        except (IndexError, KeyError) as err:
            raise Refused(f'its pickle is corrupt (stack or mark underflow: {type(err).__name__})') from None
        except (ValueError, UnicodeDecodeError) as err:
            raise Refused(f'its pickle is corrupt or truncated ({err})') from None
        raise Refused('its pickle is corrupt (no STOP)')

    # -- containers ----------------------------------------------------------
    def _append(self, target: Any, items: List[Any]) -> None:
        if not (isinstance(target, _O) and target.kind == 'list'):
            raise Refused(f'its pickle appends to {_describe(target)}, which only lists allow')
        target.items.extend(items)
        self.charge(16 * len(items), 'APPEND')

    def _setitems(self, target: Any, items: List[Any]) -> None:
        if not (isinstance(target, _O) and target.kind == 'dict'):
            raise Refused(f'its pickle sets items on {_describe(target)}, which only dicts allow')
        if len(items) % 2:
            raise Refused('its pickle is corrupt (odd SETITEMS)')
        target.keys.extend(items[0::2])
        target.items.extend(items)
        self.charge(112 * (len(items) // 2), 'SETITEMS')

    # -- storages ------------------------------------------------------------
    def _storage(self, pid: Any) -> _O:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
            raise Refused(f'its pickle has a persistent id {_describe(pid)} that is not a storage record')
        _, stype, key, location, numel = pid
        if not (isinstance(stype, _G) and stype.role == 'storage_type'):
            raise Refused(f'its pickle declares a storage of type {_describe(stype)}')
        if not (isinstance(key, str) and _STORAGE_KEY.match(key)) or not (
                isinstance(location, str) and len(location) <= 32) or not (_is_int(numel) and numel >= 0):
            raise Refused(f'its pickle has a malformed storage record {_describe(pid)}')
        dtype: torch.dtype = stype.detail
        nbytes = numel * dtype.itemsize
        member = f'{self.archive.prefix}/data/{key}'
        have = self.archive.sizes.get(member)
        if have is None:
            raise Refused(f'its pickle declares storage {key!r}, which the archive does not hold')
        if nbytes > have:
            raise Refused(f'its pickle declares storage {key!r} of {numel} x {dtype} ({human_bytes(nbytes)}), '
                          f'but the archive holds {human_bytes(have)} for it: an out-of-range storage')
        known = self.storages.setdefault(key, (dtype, numel))
        if known != (dtype, numel):
            raise Refused(f'its pickle declares storage {key!r} twice with different types or sizes')
        self.charge(256, 'a storage')
        return _O('storage', n=numel, info=dtype)

    # -- calls ---------------------------------------------------------------
    def _refuse_call(self, func: Any, args: Any, how: str = 'calls') -> Refused:
        return Refused(f'its pickle {how} {_describe(func)}{_describe(args) if isinstance(args, tuple) else ""}, '
                       'which no checkpoint does (it could allocate without bound or run code)', names_code=True)

    def _call(self, func: Any, args: Any) -> Any:
        if not isinstance(func, _G) or not isinstance(args, tuple):
            raise self._refuse_call(func, args)
        role = func.role
        if role == 'odict' and args == ():
            self.charge(128, 'OrderedDict')
            return self._hashed(_O('dict', info='odict'))
        if role == 'counter' and (args == () or (len(args) == 1 and isinstance(args[0], _O)
                                                 and args[0].kind == 'dict')):
            n = len(args[0].keys) if args else 0
            self.charge(128 + 112 * n, 'Counter')
            counter = self._hashed(_O('dict', info='counter'))
            if args:  # a copy of the dict: its items are the Counter's (walked and checked with it)
                counter.keys, counter.items = list(args[0].keys), list(args[0].items)
            return counter
        if role == 'set' and (args == () or (len(args) == 1 and (
                (isinstance(args[0], _O) and args[0].kind == 'list') or isinstance(args[0], tuple)))):
            members = (args[0].items if isinstance(args[0], _O) else list(args[0])) if args else []
            self.charge(216 + 64 * len(members), 'set')
            result = self._hashed(_O('set'))
            result.items = list(members)  # walked and its hashes checked with it (_check_structure)
            return result
        if role == 'complex' and len(args) <= 2 and all(type(a) in (int, float) for a in args):
            try:
                complex(*args)
            except OverflowError:
                raise Refused(f'its pickle calls complex{_describe(args)}, whose parts do not fit a float') from None
            self.charge(32, 'complex')
            return _O('complex')
        if role == 'encode' and len(args) == 2 and isinstance(args[0], str) and args[1] == 'latin1':
            self.charge(33 + len(args[0]), 'bytes')
            return _O('bytes', n=len(args[0]))
        if role == 'bytearray':
            if args == ():
                n = 0
            elif len(args) == 1 and isinstance(args[0], _O) and args[0].kind == 'bytes':
                n = args[0].n
            elif len(args) == 2 and isinstance(args[0], str) and args[1] in ('latin-1', 'latin1'):
                n = len(args[0])
            else:
                if len(args) == 1 and _is_int(args[0]):
                    raise Refused(f'its pickle calls bytearray({args[0]}), which would allocate '
                                  f'{human_bytes(args[0])}; checkpoints only hold bytearrays of bytes they contain')
                raise self._refuse_call(func, args)
            self.charge(57 + n, 'bytearray')
            return _O('bytes', n=n)
        if role == 'size' and len(args) == 1 and _ints(args[0]) is not None:
            self.charge(48 + 8 * len(args[0]), 'torch.Size')
            return _O('size', info=tuple(args[0]))
        if role == 'device' and 1 <= len(args) <= 2 and isinstance(args[0], str) and len(args[0]) <= 32 and (
                len(args) == 1 or _is_int(args[1])):
            self.charge(64, 'torch.device')
            return _O('device')
        if role == 'layout' and len(args) == 1 and args[0] in _layout_names():
            return _O('layout')
        if role in ('rebuild_tensor_v2', 'rebuild_tensor', 'rebuild_parameter', 'rebuild_parameter_with_state',
                    'rebuild_from_type_v2'):
            return self._tensor(func, args)
        if role == 'hb_statistic' and len(args) == 2 and isinstance(args[0], _G) and \
                args[0].role == 'history_buffer' and args[1] in DEFAULT_STATISTICS:
            self.charge(64, 'a HistoryBuffer statistic')
            return args[1]
        if role == 'np_reconstruct' and len(args) == 3 and isinstance(args[0], _G) and \
                args[0].role == 'np_ndarray' and args[1] == (0, ) and isinstance(args[2], _O) and \
                args[2].kind == 'bytes' and args[2].n <= 8:
            self.charge(128, 'numpy array')
            return _O('ndarray')
        if role == 'np_dtype' and len(args) == 3 and args[0] in _NUMPY_DTYPES and args[1] is False and \
                args[2] is True:
            self.charge(128, 'numpy dtype')
            return _O('npdtype', info=np.dtype(args[0]).itemsize)
        if role == 'np_scalar' and len(args) == 2 and isinstance(args[0], _O) and args[0].kind == 'npdtype' \
                and args[0].built and isinstance(args[1], _O) and args[1].kind == 'bytes' and \
                args[1].n == args[0].info:
            self.charge(64, 'numpy scalar')
            return _O('npscalar')
        raise self._refuse_call(func, args)

    def _state_ok(self, state: Any) -> bool:
        """A tensor's extra attributes: nothing, or a dict of plain attribute names."""
        if state is None:
            return True
        if isinstance(state, tuple) and len(state) == 2:
            return all(self._state_ok(s) for s in state)
        return isinstance(state, _O) and state.kind == 'dict' and all(
            isinstance(k, str) and _IDENT.match(k) and not k.startswith('__') for k in state.keys)

    def _tensor(self, func: _G, args: Tuple[Any, ...]) -> _O:
        role = func.role
        if role == 'rebuild_from_type_v2':
            if len(args) == 4 and isinstance(args[0], _G) and args[0].role == 'rebuild_tensor_v2' and \
                    isinstance(args[1], _G) and args[1].role == 'tensor_type' and isinstance(args[2], tuple) \
                    and self._state_ok(args[3]):
                return self._with_state(self._tensor(args[0], args[2]), args[3])
        elif role in ('rebuild_parameter', 'rebuild_parameter_with_state'):
            n = 3 if role == 'rebuild_parameter' else 4
            if len(args) == n and isinstance(args[0], _O) and args[0].kind == 'tensor' and \
                    type(args[1]) is bool and self._hooks_ok(args[2]) and (n == 3 or self._state_ok(args[3])):
                self.charge(256, 'a parameter')
                return self._with_state(_O('tensor'), args[0], *args[3:])
        elif role in ('rebuild_tensor_v2', 'rebuild_tensor'):
            if role == 'rebuild_tensor_v2':
                ok = len(args) in (6, 7) and type(args[4]) is bool and self._hooks_ok(args[5]) and (
                    len(args) == 6 or args[6] is None or (isinstance(args[6], _O) and args[6].kind == 'dict'))
            else:
                ok = len(args) == 4
            storage = args[0] if args else None
            if ok and isinstance(storage, _O) and storage.kind == 'storage' and _is_int(args[1]) and args[1] >= 0:
                size, stride = _ints(args[2]), _ints(args[3])
                if size is not None and stride is not None and len(size) == len(stride):
                    numel = math.prod(size)
                    extent = 0 if numel == 0 else args[1] + sum((s - 1) * st for s, st in zip(size, stride)) + 1
                    if extent > storage.n or numel > storage.n:
                        raise Refused(f'its pickle makes a tensor of size {list(size)} (stride {list(stride)}, '
                                      f'offset {args[1]}) over a storage of {storage.n} elements: out of range')
                    self.charge(512 + 16 * len(size), 'a tensor')
                    return self._with_state(_O('tensor'), *args[6:])
        raise self._refuse_call(func, args)

    @staticmethod
    def _with_state(tensor: _O, *state: Any) -> _O:
        """``tensor`` holding what it was built with (attributes, metadata, the tensor of a Parameter).

        They become the tensor's attributes, so the structure walk sees them (cycles, size as a tree).
        """
        tensor.items += [s for s in state if isinstance(s, (tuple, _O))]
        return tensor

    @staticmethod
    def _hooks_ok(hooks: Any) -> bool:
        return hooks is None or (isinstance(hooks, _O) and hooks.kind == 'dict' and hooks.info == 'odict'
                                 and not hooks.items)

    def _new(self, cls: Any, args: Any) -> _O:
        if isinstance(cls, _G) and args == ():
            if cls.role == 'history_buffer':
                self.charge(256, 'HistoryBuffer')
                return _O('hb')
            if cls.role == 'cfg_node':
                self.charge(128, 'CfgNode')
                return self._hashed(_O('dict', info='odict'))
        raise self._refuse_call(cls, args, how='creates an object of')

    def _build(self, inst: Any, state: Any) -> None:
        kind = inst.kind if isinstance(inst, _O) else None
        if kind == 'hb' and not inst.built and isinstance(state, _O) and state.kind == 'dict' and \
                len(set(state.keys)) == len(state.keys) and \
                HISTORY_BUFFER_FIELDS <= set(state.keys) <= HISTORY_BUFFER_FIELDS | {HISTORY_BUFFER_STATISTICS}:
            stats = dict(zip(state.items[0::2], state.items[1::2])).get(HISTORY_BUFFER_STATISTICS)
            if stats is None or (isinstance(stats, _O) and stats.kind == 'dict' and stats.info == 'dict' and all(
                    k in DEFAULT_STATISTICS and v == k for k, v in zip(stats.items[0::2], stats.items[1::2]))):
                inst.built, inst.items = True, [state]
                return
        if kind == 'dict' and inst.info == 'odict' and not inst.built and isinstance(state, _O) and \
                state.kind == 'dict' and all(isinstance(k, str) and _IDENT.match(k) for k in state.keys):
            inst.built = True
            inst.items.append(state)
            return
        if kind == 'ndarray' and not inst.built and isinstance(state, tuple) and len(state) == 5:
            version, shape, dtype, fortran, raw = state
            shape = _ints(shape)
            if _is_int(version) and shape is not None and isinstance(dtype, _O) and dtype.kind == 'npdtype' \
                    and dtype.built and type(fortran) is bool and isinstance(raw, _O) and raw.kind == 'bytes':
                need = math.prod(shape) * dtype.info
                if need != raw.n:
                    raise Refused(f'its pickle makes a numpy array of shape {list(shape)} from {raw.n} bytes '
                                  f'(it needs {need})')
                inst.built = True
                return
        if kind == 'npdtype' and not inst.built and isinstance(state, tuple) and len(state) == 8 and \
                state[0] == 3 and state[1] in ('<', '>', '|', '=') and state[2:] == (None, None, None, -1, -1, 0):
            inst.built = True
            return
        raise Refused(f'its pickle sets the state of {_describe(inst)} (BUILD with {_describe(state)}), '
                      'which no checkpoint does (it could change a class, a function or module state)',
                      names_code=True)

    # -- the object graph ------------------------------------------------------
    @staticmethod
    def _children(v: Any) -> List[Any]:
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, _O):
            return v.items
        return []

    def _check_structure(self, root: Any) -> None:
        """Refuse cycles, nesting deeper than ``MAX_DEPTH``, too large a tree and hash-colliding keys.

        One walk over the object graph the pickle builds (each object once):
        for each container its depth and its size as a tree walk sees it (a
        shared container counted once per use, so a chain of lists holding
        the previous one twice doubles per level). Readers of checkpoints walk
        them as trees (torch's ``Optimizer.load_state_dict`` copies the
        optimizer state that way), so the tree size bounds their time.
        """
        limit = MAX_TREE_NODES_BASE + MAX_TREE_NODES_PER_BYTE * len(self.archive.pickle)
        done: Dict[int, Tuple[int, int]] = {}  # id -> (depth, tree size)
        active = set()  # ids on the current path
        todo: List[Tuple[Any, bool]] = [(root, False)]
        while todo:
            v, finished = todo.pop()
            if finished:
                active.discard(id(v))
                depth, size = 1, 1
                for c in self._children(v):
                    d, n = done.get(id(c), (0, 1)) if isinstance(c, (tuple, _O)) else (0, 1)
                    depth, size = max(depth, d + 1), size + n
                if depth > MAX_DEPTH:
                    raise Refused(f'its pickle nests containers more than {MAX_DEPTH} deep')
                if size > limit:
                    raise Refused(f'its pickle builds containers that, walked as a tree (shared ones once per '
                                  f'use), hold more than {limit} objects from {human_bytes(len(self.archive.pickle))}'
                                  ': shared containers nested to blow up whoever reads it?')
                done[id(v)] = (depth, size)
                continue
            if not isinstance(v, (tuple, _O)) or id(v) in done:
                continue
            if id(v) in active:
                raise Refused(f'its pickle builds a container that contains itself ({_describe(v)} in a cycle), '
                              'which no checkpoint does')
            active.add(id(v))
            todo.append((v, True))
            todo.extend((c, False) for c in self._children(v) if isinstance(c, (tuple, _O)) and id(c) not in done)


#: What a key is for :func:`_check_keys`: its hash cannot be chosen by the file (an identity hash or a
#: randomised one) ...
_FREE = object()
#: ... or a hash the file may choose that the scan does not compute.
_OPAQUE = object()
_ID_HASHED = frozenset({'tensor', 'storage', 'bytes', 'hb', 'list', 'dict', 'set', 'ndarray', 'layout'})


class _KeyBudget:
    """Tuple elements hashing may still visit (shared tuples once per use), and what was already worked out."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.seen: Dict[int, Tuple[Any, int]] = {}  # id(tuple) -> (its _hashable value, elements it holds)


def _hashable(key: Any, budget: _KeyBudget, depth: int = 0) -> Any:
    """``key`` as the value whose hash the real key will have, or ``_FREE`` / ``_OPAQUE``.

    Hashing a tuple visits every element, shared ones once per use: each
    visit is taken from ``budget`` (a shared tuple is worked out once).
    """
    if key is None or type(key) in (int, float, bool, str):
        return key
    if isinstance(key, _G):
        return _FREE  # a class or function: hashed by identity
    if isinstance(key, _O):
        if key.kind == 'size':
            return tuple(key.info)
        return _FREE if key.kind in _ID_HASHED else _OPAQUE
    if not isinstance(key, tuple):
        return _OPAQUE
    known = budget.seen.get(id(key))
    if known is None:
        if depth >= MAX_DEPTH:
            raise Refused(f'its pickle builds dict keys or set items that nest tuples more than {MAX_DEPTH} deep')
        left = budget.left
        parts = [_hashable(k, budget, depth + 1) for k in key]
        size = len(key) + left - budget.left  # this tuple's elements and everything below them
        budget.left = left  # charged below, once per use
        if any(p is _OPAQUE for p in parts):
            value: Any = _OPAQUE
        else:
            value = _FREE if any(p is _FREE for p in parts) else tuple(parts)
        known = budget.seen[id(key)] = (value, size)
    budget.left -= known[1]
    if budget.left < 0:
        raise Refused('its pickle builds dict keys or set items that are tuples too large to hash '
                      '(shared tuples nested to blow up whoever reads it?)')
    return known[0]


def _check_keys(keys: List[Any], what: str, budget: _KeyBudget) -> None:
    """Refuse keys of one dict (or items of one set) that make building it quadratic.

    Python finds a key by its hash; distinct keys with one hash (ints that are
    equal modulo ``2**61 - 1``, ``-1`` and ``-2``, crafted floats or tuples)
    are compared one by one, so N of them cost N**2 / 2. A checkpoint's keys
    (names, parameter indices) have distinct hashes.
    """
    # str hashes are randomised (PYTHONHASHSEED): a file cannot make them collide
    rest = [k for k in keys if type(k) is not str]
    if not rest or (all(type(k) is int for k in rest) and len(set(map(hash, rest))) == len(rest)):
        return  # the common case (names, parameter indices): no two hashes alike
    buckets: Dict[int, List[Any]] = {}
    opaque = 0
    for key in rest:
        value = key if type(key) is int else _hashable(key, budget)
        if value is _FREE:
            continue
        if value is _OPAQUE:
            opaque += 1
            if opaque > MAX_OPAQUE_KEYS:
                raise Refused(f'its pickle builds a {what} with more than {MAX_OPAQUE_KEYS} keys of a kind '
                              'no checkpoint uses as keys (numpy scalars, complex numbers, devices)')
            continue
        try:
            h = hash(value)
        except TypeError:
            continue  # unhashable: the load fails on it anyway
        same = buckets.setdefault(h, [])
        if value in same:
            continue
        same.append(value)
        if len(same) > MAX_SAME_HASH:
            raise Refused(f'its pickle builds a {what} with more than {MAX_SAME_HASH} distinct keys of one hash '
                          f'(e.g. {_describe(same[0])} and {_describe(same[1])}): reading it would take '
                          'quadratic time')


def scan_pickle(archive: Archive) -> Dict[str, Tuple[torch.dtype, int]]:
    """Check ``data.pkl`` of an archive without running it; returns the storages it declares.

    Raises:
        Refused: anything outside what checkpoints contain (see the module docstring).
    """
    scanner = _Scanner(archive)
    scanner.run()
    return scanner.storages


def check_file(f: BinaryIO) -> Archive:
    """:func:`inspect_archive` and :func:`scan_pickle` together, on an open binary file."""
    archive = inspect_archive(f)
    scan_pickle(archive)
    return archive


__all__ = ['Refused', 'Archive', 'inspect_archive', 'scan_pickle', 'check_file', 'safe_globals', 'roles',
           'history_buffer_class', 'CfgNodeStandIn', 'NamespaceStandIn', 'MAX_EXPANSION', 'EXPANSION_SLACK',
           'OBJECT_BUDGET_BASE',
           'OBJECT_BUDGET_PER_BYTE', 'MAX_DEPTH', 'MAX_TREE_NODES_BASE', 'MAX_TREE_NODES_PER_BYTE',
           'MAX_SAME_HASH', 'MAX_OPAQUE_KEYS', 'human_bytes']
