"""Crafted checkpoints: raw pickle opcodes inside real torch zip archives, and real checkpoints.

``write_corpus(folder, marker)`` writes every crafted file and returns
``{name: Path}``. Each code payload would create ``marker`` (or change a
class, function or module attribute); each memory payload would allocate
gigabytes. ``write_real(folder)`` writes real checkpoints of every supported
layout. ``python -m tests.test_reliability.evil_pickles CORPUS MARKER
REAL...`` runs every in-process loader over the corpus under a memory limit
and prints one JSON line of results (see :func:`main`).

The pickles are written opcode by opcode (protocol 2, as ``torch.save``
writes); the archive writer is a minimal zip writer, so sizes and methods
can lie where a test needs them to.
"""
from __future__ import annotations

import copyreg
import io
import json
import pickle
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

# --------------------------------------------------------------------------
# Pickle opcodes.
# --------------------------------------------------------------------------
PROTO2 = b'\x80\x02'
STOP = b'.'
MARK = b'('
TUPLE = b't'
TUPLE1 = b'\x85'
TUPLE2 = b'\x86'
TUPLE3 = b'\x87'
EMPTY_TUPLE = b')'
EMPTY_LIST = b']'
EMPTY_DICT = b'}'
EMPTY_SET = b'\x8f'
APPEND = b'a'
SETITEM = b's'
SETITEMS = b'u'
REDUCE = b'R'
BUILD = b'b'
NEWOBJ = b'\x81'
NEWOBJ_EX = b'\x92'
STACK_GLOBAL = b'\x93'
INST = b'i'
OBJ = b'o'
NONE = b'N'
NEWTRUE = b'\x88'
NEWFALSE = b'\x89'
BINPERSID = b'Q'


def glob(module: str, name: str) -> bytes:
    """GLOBAL ``module.name``."""
    return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def s(text: str) -> bytes:
    """BINUNICODE."""
    data = text.encode('utf-8')
    return b'X' + struct.pack('<I', len(data)) + data


def i(n: int) -> bytes:
    """BININT for 32-bit ints, LONG1 otherwise."""
    if -2 ** 31 <= n < 2 ** 31:
        return b'J' + struct.pack('<i', n)
    data = pickle.encode_long(n)
    return b'\x8a' + bytes([len(data)]) + data


def put(k: int) -> bytes:
    """LONG_BINPUT."""
    return b'r' + struct.pack('<I', k)


def get(k: int) -> bytes:
    """LONG_BINGET."""
    return b'j' + struct.pack('<I', k)


def tup(*items: bytes) -> bytes:
    return MARK + b''.join(items) + TUPLE


def call(func: bytes, *args: bytes) -> bytes:
    """``func(*args)`` with REDUCE."""
    return func + tup(*args) + REDUCE


def dict_of(**items: bytes) -> bytes:
    """A dict with string keys (EMPTY_DICT, MARK, items, SETITEMS)."""
    return EMPTY_DICT + MARK + b''.join(s(k) + v for k, v in items.items()) + SETITEMS


def binfloat(x: float) -> bytes:
    """BINFLOAT."""
    return b'G' + struct.pack('>d', x)


def encode(text: str) -> bytes:
    """Bytes as protocol 2 writes them: ``_codecs.encode(text, 'latin1')``."""
    return call(glob('_codecs', 'encode'), s(text), s('latin1'))


def pickle_of(*body: bytes) -> bytes:
    return PROTO2 + b''.join(body) + STOP


def touch(marker: str) -> str:
    return f'touch {marker}'


def py_touch(marker: str) -> str:
    return f"open({marker!r}, 'w').close()"


# --------------------------------------------------------------------------
# A minimal zip writer (torch's reader accepts any plain zip whose members
# are in one folder).
# --------------------------------------------------------------------------
class Member:
    """One archive member; ``declared`` lies about the uncompressed size when set."""

    def __init__(self, name: str, data: bytes, deflate: bool = False, declared: Optional[int] = None,
                 payload: Optional[bytes] = None) -> None:
        self.name = name
        self.crc = zlib.crc32(data)
        if payload is not None:
            self.payload = payload
        elif deflate:
            c = zlib.compressobj(9, zlib.DEFLATED, -15)
            self.payload = c.compress(data) + c.flush()
        else:
            self.payload = data
        self.method = 8 if deflate else 0
        self.size = len(data) if declared is None else declared


def zip_bytes(members: List[Member], offsets_shift: int = 0) -> bytes:
    """The bytes of a zip archive holding ``members`` (no zip64; sizes < 4 GiB)."""
    out = io.BytesIO()
    central = io.BytesIO()
    for m in members:
        name = m.name.encode()
        offset = out.tell() + offsets_shift
        out.write(struct.pack('<IHHHHHIIIHH', 0x04034B50, 20, 0, m.method, 0, 0x21, m.crc, len(m.payload),
                              m.size, len(name), 0) + name + m.payload)
        central.write(struct.pack('<IHHHHHHIIIHHHHHII', 0x02014B50, 20, 20, 0, m.method, 0, 0x21, m.crc,
                                  len(m.payload), m.size, len(name), 0, 0, 0, 0, 0, offset) + name)
    cd = central.getvalue()
    start = out.tell() + offsets_shift
    out.write(cd)
    out.write(struct.pack('<IHHHHIIH', 0x06054B50, 0, 0, len(members), len(members), len(cd), start, 0))
    return out.getvalue()


def torch_archive(pkl: bytes, storages: Optional[Dict[str, bytes]] = None, deflate_pickle: bool = False,
                  extra: Optional[List[Member]] = None, prefix: str = 'archive') -> bytes:
    """A torch checkpoint archive with ``pkl`` as data.pkl and the given storages."""
    members = [Member(f'{prefix}/data.pkl', pkl, deflate=deflate_pickle),
               Member(f'{prefix}/byteorder', b'little'), Member(f'{prefix}/version', b'3\n')]
    members += [Member(f'{prefix}/data/{k}', v) for k, v in (storages or {}).items()]
    return zip_bytes(members + list(extra or []))


def rezip(real: bytes, pkl: Callable[[bytes], bytes]) -> bytes:
    """A real checkpoint's archive with its data.pkl replaced by ``pkl(old data.pkl)``."""
    with zipfile.ZipFile(io.BytesIO(real)) as zf:
        members = [Member(n, pkl(zf.read(n)) if n.endswith('/data.pkl') else zf.read(n)) for n in zf.namelist()]
    return zip_bytes(members)


def tensor_pickle(numel: int, size: Tuple[int, ...], stride: Tuple[int, ...], key: str = '0',
                  offset: int = 0) -> bytes:
    """A float tensor record as ``torch.save`` writes it (storage ``key`` of ``numel`` floats)."""
    pid = tup(s('storage'), glob('torch', 'FloatStorage'), s(key), s('cpu'), i(numel))
    return call(glob('torch._utils', '_rebuild_tensor_v2'), pid + BINPERSID, i(offset),
                tup(*map(i, size)), tup(*map(i, stride)), NEWFALSE,
                call(glob('collections', 'OrderedDict')))


# --------------------------------------------------------------------------
# The payloads.
# --------------------------------------------------------------------------
HB = ('mmengine.logging.history_buffer', 'HistoryBuffer')


def getattr_chain(marker: str) -> bytes:
    """The reported exploit: HistoryBuffer's __getattribute__ as a getattr, __globals__, eval.

    A HistoryBuffer whose state writes the class-level ``_statistics_methods``,
    then ``getattr(HistoryBuffer, '__getattribute__')`` (a general getattr),
    ``_rebuild_tensor_v2.__globals__['__builtins__']['eval'](...)``.
    """
    ga = glob('builtins', 'getattr')
    body = [
        # a HistoryBuffer whose state adds __getattribute__ to its statistics
        glob(*HB) + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT + s('_statistics_methods') + EMPTY_DICT
        + s('__getattribute__') + glob('builtins', 'getattr') + SETITEM + SETITEM + BUILD + put(0),
        # 1: getattr(HistoryBuffer, '__getattribute__') == object.__getattribute__
        call(ga, glob(*HB), s('__getattribute__')) + put(1),
        # 2: its __globals__ of torch's rebuild function
        get(1) + tup(glob('torch._utils', '_rebuild_tensor_v2'), s('__globals__')) + REDUCE + put(2),
        # 3: __globals__.get  4: ['__builtins__']  5: .get  6: ['eval']
        get(1) + tup(get(2), s('get')) + REDUCE + put(3),
        get(3) + tup(s('__builtins__')) + REDUCE + put(4),
        get(1) + tup(get(4), s('get')) + REDUCE + put(5),
        get(5) + tup(s('eval')) + REDUCE + put(6),
        get(6) + tup(s(py_touch(marker))) + REDUCE,
    ]
    return pickle_of(MARK, *body, TUPLE)


def corpus(marker: str) -> Dict[str, bytes]:
    """name -> file bytes of every crafted checkpoint (archives unless the name says otherwise)."""
    m = marker
    empty_state = dict_of(state_dict=EMPTY_DICT)
    out: Dict[str, bytes] = {}

    def add(name: str, *body: bytes, **kw: object) -> None:
        out[name] = torch_archive(pickle_of(*body), **kw)  # type: ignore[arg-type]

    # Calls of foreign callables: REDUCE, INST, OBJ, NEWOBJ, NEWOBJ_EX, STACK_GLOBAL, EXT.
    add('reduce_os_system', call(glob('os', 'system'), s(touch(m))))
    add('reduce_posix_system', call(glob('posix', 'system'), s(touch(m))))
    add('reduce_builtins_eval', call(glob('builtins', 'eval'), s(py_touch(m))))
    add('reduce_py2_builtin_exec', call(glob('__builtin__', 'exec'), s(py_touch(m))))
    add('reduce_subprocess', call(glob('subprocess', 'check_call'),
                                  EMPTY_LIST + MARK + s('touch') + s(m) + b'e'))
    add('inst_os_system', MARK + s(touch(m)) + INST + b'os\nsystem\n')
    add('obj_os_system', MARK + glob('os', 'system') + s(touch(m)) + OBJ)
    add('newobj_foreign', glob('subprocess', 'Popen') + tup(EMPTY_LIST + MARK + s('touch') + s(m) + b'e') + NEWOBJ)
    add('newobj_ex_foreign', glob('subprocess', 'Popen') + tup(EMPTY_LIST + MARK + s('touch') + s(m) + b'e')
        + EMPTY_DICT + NEWOBJ_EX)
    add('stack_global', s('os') + s('system') + STACK_GLOBAL + tup(s(touch(m))) + REDUCE)
    for op, code in ((b'\x82', bytes([0xF1])), (b'\x83', struct.pack('<H', 0xF1F1)),
                     (b'\x84', struct.pack('<i', 0xF1F1F1))):
        add(f'ext{len(code) if len(code) < 3 else 4}', op + code + tup(s(touch(m))) + REDUCE)
    # Allow-listed names used the wrong way: BUILD (setattr) on classes and functions, odd calls.
    add('build_rebuild_defaults', glob('torch._utils', '_rebuild_tensor_v2')
        + tup(NONE, dict_of(__defaults__=tup(i(1), i(2)))) + BUILD)
    add('build_history_buffer_class', glob(*HB) + tup(NONE, dict_of(_statistics_methods=EMPTY_DICT)) + BUILD)
    add('build_history_buffer_statistics', glob(*HB) + EMPTY_TUPLE + NEWOBJ
        + dict_of(_statistics_methods=dict_of(mean=glob('builtins', 'eval'))) + BUILD)
    add('build_ordereddict_class', glob('collections', 'OrderedDict') + dict_of(__init__=NONE) + BUILD)
    # argparse.Namespace (timm's train.py checkpoints) is allowed only as NEWOBJ + one BUILD of plain values.
    add('build_namespace_class', glob('argparse', 'Namespace') + tup(NONE, dict_of(__init__=NONE)) + BUILD)
    add('namespace_value_os_system', glob('argparse', 'Namespace') + EMPTY_TUPLE + NEWOBJ
        + dict_of(lr=call(glob('os', 'system'), s(touch(m)))) + BUILD)
    add('build_numpy_global_dtype', call(glob('numpy', 'dtype'), s('f8'), NEWFALSE, NEWFALSE)
        + tup(i(3), s('>'), NONE, NONE, NONE, i(-1), i(-1), i(0)) + BUILD)
    add('getattr_builtins', call(glob('builtins', 'getattr'), glob('torch._utils', '_rebuild_tensor_v2'),
                                 s('__globals__')))
    add('getattr_history_buffer', call(glob('builtins', 'getattr'), glob(*HB), s('__getattribute__')))
    out['getattr_chain'] = torch_archive(getattr_chain(m))
    add('layout_oddity', call(glob('torch.serialization', '_get_layout'), s('__class__')))
    add('rebuild_from_type_eval', call(glob('torch._tensor', '_rebuild_from_type_v2'), glob('builtins', 'eval'),
                                       glob('torch', 'Tensor'), tup(s(py_touch(m))), EMPTY_DICT))
    # Allocations from a few bytes.
    add('bytearray_huge', call(glob('builtins', 'bytearray'), i(2 ** 33)))
    add('bytearray_py2', call(glob('__builtin__', 'bytearray'), i(2 ** 31 - 1)))
    add('set_range', call(glob('builtins', 'set'), call(glob('builtins', 'range'), i(10 ** 10))))
    add('torch_tensor_new', call(glob('torch', 'Tensor'), i(2 ** 33)))
    add('torch_tensor_newobj', glob('torch', 'Tensor') + tup(i(2 ** 33)) + NEWOBJ)
    add('untyped_storage', call(glob('torch.storage', 'UntypedStorage'), i(2 ** 34)))
    add('rebuild_from_type_bytearray', call(glob('torch._tensor', '_rebuild_from_type_v2'),
                                            glob('builtins', 'bytearray'), glob('torch', 'Tensor'),
                                            tup(i(2 ** 33)), EMPTY_DICT))
    add('qtensor', call(glob('torch._utils', '_rebuild_qtensor'), NONE, i(0), tup(i(2 ** 34)), tup(i(1)),
                        tup(glob('torch', 'per_tensor_affine'), binfloat(1.0), i(0)), NEWFALSE,
                        call(glob('collections', 'OrderedDict'))))
    hexed = encode('A' * 64)
    for _ in range(40):  # each hex encoding doubles the bytes: 64 * 2**40
        hexed = call(glob('_codecs', 'encode'), hexed, s('hex_codec'))
    add('encode_chain', hexed)
    big = s('B' * 200_000)
    copies = EMPTY_LIST + put(1) + encode_memo(big, 2) + b''.join(
        get(1) + call(glob('builtins', 'bytearray'), get(2)) + APPEND for _ in range(20_000))
    add('bytearray_copies', copies)  # 4 GB of copies from 400 kB
    many = EMPTY_LIST + MARK + b''.join(i(k) for k in range(20_000)) + b'e' + put(3)
    add('set_copies', many + EMPTY_LIST + b''.join(call(glob('builtins', 'set'), get(3)) + APPEND
                                                    for _ in range(3_000)))  # 3 GB of sets from 160 kB
    add('empty_sets', EMPTY_LIST + (EMPTY_SET + APPEND) * 1_000_000)  # 2 MB -> 216 MB of empty sets
    nested = EMPTY_LIST * 1000 + APPEND * 999
    add('deep_nesting', nested)
    # Storages and tensors out of range.
    add('storage_out_of_range', dict_of(w=tensor_pickle(2 ** 32, (2 ** 32, ), (1, ))),
        storages={'0': b'\0' * 16})
    add('storage_missing', dict_of(w=tensor_pickle(4, (4, ), (1, ), key='7')), storages={'0': b'\0' * 16})
    add('storage_path_key', dict_of(w=tensor_pickle(4, (4, ), (1, ), key='../../etc/passwd')),
        storages={'0': b'\0' * 16})
    add('tensor_view_out_of_range', dict_of(w=tensor_pickle(4, (10 ** 9, ), (1, ))), storages={'0': b'\0' * 16})
    add('tensor_expanded_view', dict_of(w=tensor_pickle(4, (10 ** 9, 4), (0, 1))), storages={'0': b'\0' * 16})
    # Zip bombs: a real deflate bomb, and members that lie about their sizes.
    padding = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b'\0' * (1 << 20)
    bomb = padding.compress(pickle_of(empty_state)[:-1]) + b''.join(padding.compress(chunk) for _ in range(64))
    bomb += padding.flush()
    out['zip_bomb_deflate'] = zip_bytes([
        Member('archive/data.pkl', b'', payload=bomb, declared=64 << 20, deflate=True),
        Member('archive/byteorder', b'little'), Member('archive/version', b'3\n')])
    out['zip_bomb_declared'] = zip_bytes([
        Member('archive/data.pkl', pickle_of(empty_state), deflate=True, declared=0xFFFF0000),
        Member('archive/byteorder', b'little'), Member('archive/version', b'3\n')])
    out['zip_stored_size_lie'] = zip_bytes([
        Member('archive/data.pkl', pickle_of(empty_state), declared=0xFFFF0000),
        Member('archive/byteorder', b'little'), Member('archive/version', b'3\n')])
    out['zip_duplicate_member'] = torch_archive(pickle_of(empty_state), extra=[
        Member('archive/data.pkl', pickle_of(call(glob('os', 'system'), s(touch(m)))))])
    out.update(round3_corpus())
    payload = pickle_of(call(glob('os', 'system'), s(touch(m))))
    out['legacy_format'] = payload + pickle_of(empty_state)
    out['not_a_checkpoint'] = b'this is not a checkpoint\n' * 8
    return out


#: ints whose hash is 0 (Python hashes ints modulo this prime): keys that all collide.
HASH_MODULUS = 2 ** 61 - 1


def shared_halves(levels: int) -> bytes:
    """A list holding the previous level twice, ``levels`` deep: 2**levels nodes as a tree from a few bytes.

    What torch's ``Optimizer.load_state_dict`` walks (optimizer state) as a tree.
    Level k is memo ``k``; every level stays on the stack (the top one last).
    """
    body = EMPTY_DICT + put(0)
    for k in range(levels):
        body += EMPTY_LIST + get(k) + APPEND + get(k) + APPEND + put(k + 1)
    return body


def colliding_ints(n: int) -> List[int]:
    """``n`` distinct ints that all hash to 0."""
    return [k * HASH_MODULUS for k in range(n)]


def local_extra_archive() -> bytes:
    """An archive whose storage member's local header claims 8 bytes of extra field the directory does not.

    A reader finds the data after the local header's name and extra fields,
    so the storage's 16 bytes would be read 8 bytes into the next member.
    """
    data = torch_archive(pickle_of(dict_of(w=tensor_pickle(4, (4, ), (1, )))), storages={'0': b'\x01' * 16},
                         extra=[Member('archive/zz', b'\x02' * 16)])
    name = b'archive/data/0'
    at = data.index(name) - 30  # its local header (the first occurrence; the directory's comes last)
    assert data[at:at + 4] == b'PK\x03\x04'
    return data[:at + 28] + struct.pack('<H', 8) + data[at + 30:]


def _tensor_args() -> Tuple[bytes, ...]:
    """The arguments of ``_rebuild_tensor_v2`` for a tensor of 4 floats in storage ``'0'``."""
    pid = tup(s('storage'), glob('torch', 'FloatStorage'), s('0'), s('cpu'), i(4))
    return (pid + BINPERSID, i(0), tup(i(4)), tup(i(1)), NEWFALSE, call(glob('collections', 'OrderedDict')))


def safetensors_bytes(entries: Dict[str, Dict[str, object]], data: bytes = b'') -> bytes:
    """A safetensors file with the given header entries (written as is) and data."""
    header = json.dumps(entries).encode()
    return struct.pack('<Q', len(header)) + header + data


def round3_corpus() -> Dict[str, bytes]:
    """Shared and cyclic containers, hash-colliding keys, complex overflow, zip local headers, safetensors."""
    out: Dict[str, bytes] = {}

    def add(name: str, *body: bytes, **kw: object) -> None:
        out[name] = torch_archive(pickle_of(*body), **kw)  # type: ignore[arg-type]

    add('cyclic_list', dict_of(state_dict=EMPTY_DICT, meta=EMPTY_LIST + put(0) + get(0) + APPEND))
    add('cyclic_dict', dict_of(state_dict=EMPTY_DICT, meta=EMPTY_DICT + put(0) + s('self') + get(0) + SETITEM))
    # the levels stay on the stack (the unpickler returns the top one): then the checkpoint, holding level 60
    add('shared_halves', shared_halves(60), dict_of(state_dict=EMPTY_DICT, optimizer=dict_of(
        state=EMPTY_DICT + i(0) + get(60) + SETITEM, param_groups=EMPTY_LIST)))
    keys = colliding_ints(20_000)
    add('hash_colliding_keys', dict_of(state_dict=EMPTY_DICT, meta=EMPTY_DICT + MARK
                                       + b''.join(i(k) + NONE for k in keys) + SETITEMS))
    add('hash_colliding_set', dict_of(state_dict=EMPTY_DICT, meta=call(glob('builtins', 'set'), EMPTY_LIST + MARK
                                                                        + b''.join(i(k) for k in keys) + b'e')))
    # built, so hashed, but not part of the result (left on the stack below it)
    add('hash_colliding_unreachable', EMPTY_DICT + MARK + b''.join(i(k) + NONE for k in keys) + SETITEMS,
        dict_of(state_dict=EMPTY_DICT))
    # a set of one tuple holding the previous one twice, 60 deep: hashing it visits 2**60 elements
    halves = i(0) + TUPLE1 + put(0) + b''.join(get(k) + TUPLE2 + put(k + 1) for k in range(60))
    add('shared_tuple_set', halves, dict_of(state_dict=EMPTY_DICT, meta=call(glob('builtins', 'set'),
                                                                              EMPTY_LIST + get(60) + APPEND)))
    # the same as a dict key left on the stack (built, so hashed), and a dict key nesting 5000 tuples
    add('shared_tuple_key_unreachable', halves, EMPTY_DICT + get(60) + NONE + SETITEM, dict_of(state_dict=EMPTY_DICT))
    add('deep_tuple_key', dict_of(state_dict=EMPTY_DICT, meta=EMPTY_DICT + i(0) + TUPLE1 * 5000 + NONE + SETITEM))
    # a tensor whose attribute holds a list that holds the tensor
    attrs = EMPTY_LIST + put(1)
    tensor = call(glob('torch._tensor', '_rebuild_from_type_v2'), glob('torch._utils', '_rebuild_tensor_v2'),
                  glob('torch', 'Tensor'), tup(*_tensor_args()), dict_of(a=get(1))) + put(2)
    add('cyclic_tensor_attribute', attrs, dict_of(state_dict=dict_of(w=tensor), meta=get(1) + get(2) + APPEND),
        storages={'0': b'\0' * 16})
    add('complex_overflow', dict_of(state_dict=EMPTY_DICT, meta=call(glob('builtins', 'complex'), i(2 ** 1050),
                                                                      i(0))))
    out['zip_local_header_extra'] = local_extra_archive()
    for dtype in ('F4', 'F6_E2M3', 'F8_E8M0'):
        out[f'safetensors_dtype_{dtype.lower()}'] = safetensors_bytes(
            {'w': {'dtype': dtype, 'shape': [2], 'data_offsets': [0, 2]}}, b'\0\0')
    out['safetensors_shape_2_63'] = safetensors_bytes({'w': {'dtype': 'F32', 'shape': [2 ** 63, 0],
                                                             'data_offsets': [0, 0]}}, b'')
    return out


def encode_memo(text_op: bytes, k: int) -> bytes:
    """``_codecs.encode(<text_op>, 'latin1')`` kept in memo slot ``k``."""
    return call(glob('_codecs', 'encode'), text_op, s('latin1')) + put(k)


def prefixed(real: bytes, marker: str) -> Dict[str, bytes]:
    """A real checkpoint with a malicious prefix: inside its pickle, and before its archive."""
    evil = call(glob('os', 'system'), s(touch(marker)))
    chain = getattr_chain(marker)[len(PROTO2):-1]
    return {
        # The payload runs first and stays on the stack; the real pickle's result is returned.
        'prefix_pickle_os_system': rezip(real, lambda pkl: PROTO2 + evil + pkl),
        'prefix_pickle_getattr_chain': rezip(real, lambda pkl: PROTO2 + chain + pkl),
        'prefix_pickle_bytearray': rezip(real, lambda pkl: PROTO2 + call(glob('builtins', 'bytearray'),
                                                                          i(2 ** 33)) + pkl),
        # Bytes before the archive: torch would read the file as a legacy pickle.
        'prefix_file_pickle': pickle_of(evil) + real,
    }


def write_corpus(folder: Path, marker: Path, real: Path) -> Dict[str, Path]:
    """Write every crafted file into ``folder``; ``real`` is a real checkpoint to prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    files = corpus(str(marker))
    files.update(prefixed(real.read_bytes(), str(marker)))
    paths = {}
    for name, data in files.items():
        path = folder / f'{name}.pth'
        path.write_bytes(data)
        paths[name] = path
    return paths


# --------------------------------------------------------------------------
# Real checkpoints of every supported layout.
# --------------------------------------------------------------------------
class CfgNode(dict):
    """Pickles exactly like yacs' CfgNode (a dict subclass with flags in its __dict__)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.__dict__.update({'__immutable__': True, '__deprecated_keys__': set(), '__renamed_keys__': {},
                              '__new_allowed__': False})


class _YacsPickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes this module's CfgNode under yacs' name, as the published training code's files have it."""

    def save_global(self, obj: object, name: Optional[str] = None) -> None:
        if obj is CfgNode:
            self.write(glob('yacs.config', 'CfgNode'))
            self.memoize(obj)
            return
        super().save_global(obj, name)


class YacsPickle:
    """A ``pickle_module`` for ``torch.save``."""
    Pickler = _YacsPickler


def write_real(folder: Path, golden_dir: Path) -> Dict[str, Path]:
    """Real checkpoints: the golden files, an mmengine resume checkpoint, an ImageNet training checkpoint."""
    import random

    import numpy as np
    import torch
    from mmengine.logging import MessageHub
    folder.mkdir(parents=True, exist_ok=True)
    paths = {p.stem: p for p in sorted(golden_dir.glob('*.pth'))}
    det = torch.load(golden_dir / 'mlla_small_official_det.pth', weights_only=True)
    cls = torch.load(golden_dir / 'mlla_small_official_cls.pth', weights_only=True)

    # mmengine: message hub with HistoryBuffers, numpy scalars, random state, optimizer, schedulers.
    hub = MessageHub.get_instance('mlla_mm_evil_pickles')
    for step in range(3):
        hub.update_scalar('train/loss', 1.5 - 0.1 * step)
        hub.update_scalar('train/lr', 0.01)
    hub.update_info('epoch', 1)
    hub.update_info('iter', 3)
    hub.update_info('last_ckpt', 'epoch_1.pth')
    model = torch.nn.Linear(4, 2)
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.ones(1, 4)).sum().backward()
    optim.step()
    sched = torch.optim.lr_scheduler.LinearLR(optim, start_factor=0.1, total_iters=4)
    mm = {'meta': {'epoch': 1, 'iter': 3, 'seed': np.int64(42), 'mean_loss': np.float64(1.4),
                   'dataset_meta': {'classes': ('a', 'b'), 'palette': [(1, 2, 3)]}, 'mmengine_version': '0.10.7'},
          'state_dict': det['state_dict'], 'message_hub': hub.state_dict(), 'optimizer': optim.state_dict(),
          'param_schedulers': [sched.state_dict()],
          'rng_state': {'python': random.getstate(), 'numpy': np.random.get_state(),
                        'torch': torch.get_rng_state(), 'seed': 42},
          'np_array': np.arange(6, dtype=np.float32).reshape(2, 3)}
    torch.save(mm, folder / 'mmengine_resume.pth')
    paths['mmengine_resume'] = folder / 'mmengine_resume.pth'

    # The published ImageNet training code: model + EMA + its yacs config.
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in cls['model'].items()}
    config = CfgNode(MODEL=CfgNode(TYPE='mlla', NAME='mlla_small'), TRAIN=CfgNode(EPOCHS=300, BASE_LR=1e-3))
    imagenet = {'model': cls['model'], 'state_dict_ema': ema, 'config': config, 'epoch': 299,
                'max_accuracy': 83.5, 'optimizer': {'state': {}, 'param_groups': []}, 'lr_scheduler': {}}
    torch.save(imagenet, folder / 'imagenet_training.pth', pickle_module=YacsPickle)
    paths['imagenet_training'] = folder / 'imagenet_training.pth'
    return paths


# --------------------------------------------------------------------------
# The in-process loaders, over the whole corpus, in one process with a memory limit.
# --------------------------------------------------------------------------
def state_snapshot() -> Dict[str, str]:
    """Class, function and module state that crafted files try to change."""
    import numpy as np
    import torch
    from mmengine.logging.history_buffer import HistoryBuffer
    return {
        'HistoryBuffer._statistics_methods': repr(sorted(HistoryBuffer._statistics_methods.items())),
        'HistoryBuffer.__dict__': repr(sorted(HistoryBuffer.__dict__)),
        '_rebuild_tensor_v2.__defaults__': repr(torch._utils._rebuild_tensor_v2.__defaults__),
        '_rebuild_tensor_v2.__dict__': repr(torch._utils._rebuild_tensor_v2.__dict__),
        'OrderedDict.__dict__': repr(sorted(vars(OrderedDict))),
        'numpy float64 byteorder': np.dtype('f8').byteorder + np.dtype('f8').str,
        'torch safe globals': repr(sorted(map(repr, torch.serialization.get_safe_globals()))),
        'copyreg extensions': repr(sorted(copyreg._extension_registry.items())),
    }


def _limit_memory(extra: int) -> int:
    """Limit this process's address space to its current size + ``extra`` bytes; returns the limit."""
    import resource
    with open('/proc/self/status') as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmSize:'))
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, vm + extra))
    return vm + extra


#: The corpus by kind: code payloads (run code or change state), memory payloads, format payloads.
CODE = ('reduce_os_system', 'reduce_posix_system', 'reduce_builtins_eval', 'reduce_py2_builtin_exec',
        'reduce_subprocess', 'inst_os_system', 'obj_os_system', 'newobj_foreign', 'newobj_ex_foreign',
        'stack_global', 'ext1', 'ext2', 'ext4', 'getattr_chain', 'getattr_builtins', 'getattr_history_buffer',
        'rebuild_from_type_eval', 'build_rebuild_defaults', 'build_history_buffer_class',
        'build_history_buffer_statistics', 'build_ordereddict_class', 'build_numpy_global_dtype', 'layout_oddity',
        'build_namespace_class', 'namespace_value_os_system')
MEMORY = ('bytearray_huge', 'bytearray_py2', 'set_range', 'torch_tensor_new', 'torch_tensor_newobj',
          'untyped_storage', 'rebuild_from_type_bytearray', 'qtensor', 'encode_chain', 'bytearray_copies',
          'set_copies', 'empty_sets', 'deep_nesting', 'storage_out_of_range', 'storage_missing',
          'storage_path_key', 'tensor_view_out_of_range', 'tensor_expanded_view', 'zip_bomb_deflate',
          'zip_bomb_declared', 'zip_stored_size_lie', 'zip_duplicate_member',
          # round 3 (issue 26): shared/cyclic containers, hash-colliding keys, overflowing numbers
          'cyclic_list', 'cyclic_dict', 'shared_halves', 'hash_colliding_keys', 'hash_colliding_set',
          'hash_colliding_unreachable', 'shared_tuple_set', 'shared_tuple_key_unreachable', 'deep_tuple_key',
          'cyclic_tensor_attribute', 'complex_overflow',
          'zip_local_header_extra')
FORMAT = ('legacy_format', 'not_a_checkpoint', 'prefix_pickle_os_system', 'prefix_pickle_getattr_chain',
          'prefix_pickle_bytearray', 'prefix_file_pickle',
          # round 3: safetensors with dtypes or shapes torch cannot hold
          'safetensors_dtype_f4', 'safetensors_dtype_f6_e2m3', 'safetensors_dtype_f8_e8m0',
          'safetensors_shape_2_63')
#: The round-3 entries (issue 26), all refused by every loader.
ROUND3 = MEMORY[MEMORY.index('cyclic_list'):] + FORMAT[FORMAT.index('safetensors_dtype_f4'):]
#: Code payloads that torch's weights_only unpickler with mlla-mm's stand-ins refuses even without the scan.
UNSCANNED = CODE + ('prefix_pickle_os_system', 'prefix_pickle_getattr_chain', 'prefix_file_pickle',
                    'legacy_format')
#: Payloads that do create the marker when read with plain pickle (``trusted=True``).
LIVE = ('reduce_os_system', 'reduce_posix_system', 'reduce_builtins_eval', 'reduce_py2_builtin_exec',
        'reduce_subprocess', 'inst_os_system', 'obj_os_system', 'stack_global', 'ext1', 'ext2', 'ext4',
        'getattr_chain', 'rebuild_from_type_eval', 'prefix_pickle_os_system', 'prefix_pickle_getattr_chain',
        'prefix_file_pickle', 'legacy_format')
#: Payloads that torch's own ``weights_only`` load (without mlla-mm's checks) turns into an allocation failure.
UNGUARDED_BOMBS = ('bytearray_huge', 'torch_tensor_new', 'untyped_storage', 'prefix_pickle_bytearray')


#: The EXT1/EXT2/EXT4 codes of the ext payloads and what :func:`register_extensions` makes them name.
EXTENSIONS = {0xF1: ('os', 'system'), 0xF1F1: ('posix', 'system'), 0xF1F1F1: ('subprocess', 'getoutput')}


def register_extensions() -> None:
    """Register the ext payloads' codes (shell-running callables), so they are live for plain pickle."""
    for code, key in EXTENSIONS.items():
        if copyreg._inverted_registry.get(code) != key:
            copyreg.add_extension(key[0], key[1], code)


def main(argv: List[str]) -> int:
    """``CORPUS_DIR MARKER REAL_DIR``: run load_file, MLLA init_cfg and mmengine's loader on each file.

    Runs under an address-space limit of the process's size after imports
    + 3 GiB. Prints one JSON object: ``results[file][loader]`` is ``ok``
    (it loaded), ``error`` (the CheckpointError message) or ``other`` (any
    other exception, e.g. MemoryError), with ``marker`` (the payload ran) and
    ``changed`` (watched class/function/module state that changed);
    ``real[name]``: the keys of each real checkpoint read afterwards (or the
    error); ``unscanned[file]``: the same for code payloads read with the scan
    switched off; ``live[file]``: the payload created the marker when read as a
    trusted file; ``unguarded[file]``: what plain ``torch.load(weights_only=True)``
    raised under the limit.
    """
    corpus_dir, marker, real_dir = Path(argv[0]), Path(argv[1]), Path(argv[2])
    import torch
    from mmengine.runner.checkpoint import _load_checkpoint

    import mlla_mm  # noqa: F401  (registers the loader into mmengine)
    from mlla_mm.checkpoint import CheckpointError, load_file
    from mlla_mm.models import MLLA
    from tests.helpers import TINY_ARCH as tiny  # run as ``python -m tests.test_reliability.evil_pickles``
    register_extensions()
    MLLA(tiny)  # first model build outside the limit
    limit = _limit_memory(3 << 30)
    before = state_snapshot()
    loaders: Dict[str, Callable[[Path], object]] = {
        'load_file': load_file,
        'init_cfg': lambda p: MLLA(tiny, init_cfg=dict(type='Pretrained', checkpoint=str(p))).init_weights(),
        'mmengine': lambda p: _load_checkpoint(str(p), map_location='cpu'),
    }
    results: Dict[str, Dict[str, object]] = {}
    for path in sorted(corpus_dir.glob('*.pth')):
        row: Dict[str, object] = {}
        for name, load in loaders.items():
            try:
                load(path)
                row[name] = {'ok': True}
            except CheckpointError as err:
                row[name] = {'error': str(err)}
            except BaseException as err:  # noqa: BLE001 (reported to the test)
                row[name] = {'other': f'{type(err).__name__}: {err}'[:500]}
        row['marker'] = marker.exists()
        after = state_snapshot()
        row['changed'] = sorted(k for k in before if before[k] != after[k])
        results[path.stem] = row
    real: Dict[str, object] = {}
    for path in sorted(real_dir.glob('*.pth')):
        try:
            real[path.stem] = sorted(map(str, load_file(path)))
        except BaseException as err:  # noqa: BLE001
            real[path.stem] = f'{type(err).__name__}: {err}'[:500]
    unguarded: Dict[str, str] = {}
    for name in UNGUARDED_BOMBS:
        try:
            torch.load(corpus_dir / f'{name}.pth', weights_only=True)
            unguarded[name] = 'loaded'
        except BaseException as err:  # noqa: BLE001
            unguarded[name] = type(err).__name__
    # Without the scan: torch's weights_only unpickler and the stand-ins alone still refuse the code
    # payloads (defence in depth; the memory payloads are not run this way).
    from mlla_mm import checkpoint_guard
    check_file = checkpoint_guard.check_file
    checkpoint_guard.check_file = lambda f: None  # type: ignore[assignment]
    unscanned: Dict[str, object] = {}
    before = state_snapshot()  # reading the real files registered mmengine's default statistics
    try:
        for name in UNSCANNED:
            try:
                load_file(corpus_dir / f'{name}.pth')
                outcome: Dict[str, object] = {'ok': True}
            except CheckpointError as err:
                outcome = {'error': str(err)}
            except BaseException as err:  # noqa: BLE001
                outcome = {'other': f'{type(err).__name__}: {err}'[:500]}
            after = state_snapshot()
            outcome.update(marker=marker.exists(), changed=sorted(k for k in before if before[k] != after[k]))
            unscanned[name] = outcome
    finally:
        checkpoint_guard.check_file = check_file  # type: ignore[assignment]
    live: Dict[str, bool] = {}
    for name in LIVE:
        if marker.exists():
            marker.unlink()
        try:
            load_file(corpus_dir / f'{name}.pth', trusted=True)
        except BaseException:  # noqa: BLE001 (the payload's own result may not be a checkpoint)
            pass
        live[name] = marker.exists()
    if marker.exists():
        marker.unlink()
    print(json.dumps({'results': results, 'real': real, 'unscanned': unscanned, 'live': live,
                      'unguarded': unguarded, 'limit': limit,
                      'torch': torch.__version__}))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
