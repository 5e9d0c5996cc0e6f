"""Crafted archive structures and malformed pickles: each refused with its own reason, before anything is unpickled.

``test_malicious_checkpoints.py`` attacks the loaders with code and memory
payloads; this file walks the checks of ``mlla_mm/checkpoint_guard.py`` one by
one (zip structure, pickle machine, storage records, numpy arrays) with the
smallest file that breaks each, and checks that the allowed forms those checks
guard (Counter, complex, torch.Size, devices, layouts, Parameters, numpy arrays
and scalars) still load with their values.
"""
import collections
import struct
import zipfile

import numpy as np
import pytest
import torch

from mlla_mm.checkpoint import CheckpointError, load_file
from tests.test_reliability import evil_pickles as ep
from tests.test_reliability.evil_pickles import (APPEND, BINPERSID, BUILD, EMPTY_DICT, EMPTY_LIST, MARK, NEWFALSE,
                                                 NEWTRUE, SETITEMS, Member, call, get, glob, i, pickle_of, s, tup,
                                                 zip_bytes)

OK_PICKLE = pickle_of(EMPTY_DICT)
CENTRAL_SIG = b'PK\x01\x02'


def members(pkl=OK_PICKLE, prefix='archive'):
    return [Member(f'{prefix}/data.pkl', pkl), Member(f'{prefix}/byteorder', b'little'),
            Member(f'{prefix}/version', b'3\n')]


def patch_central(data: bytes, index: int, field_offset: int, fmt: str, value: int) -> bytes:
    """``data`` with one field of the ``index``-th central-directory entry replaced."""
    pos = -1
    for _ in range(index + 1):
        pos = data.index(CENTRAL_SIG, pos + 1)
    at = pos + field_offset
    return data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt):]


def stored_with_method(method: int) -> bytes:
    data = zip_bytes(members())
    return patch_central(data, 0, 10, '<H', method)  # central header: compression method at byte 10


def encrypted() -> bytes:
    return patch_central(zip_bytes(members()), 0, 8, '<H', 0x1)  # general purpose flags at byte 8


def overlapping() -> bytes:
    data = zip_bytes(members())
    longer = len(OK_PICKLE) + 40  # the first member claims to run into the second
    data = patch_central(data, 0, 20, '<I', longer)  # compressed size
    return patch_central(data, 0, 24, '<I', longer)  # uncompressed size (equal: a consistent stored member)


def data_before_archive() -> bytes:
    # A local-header signature, then an archive whose offsets assume it starts at byte 0.
    return b'PK\x03\x04' + b'\0' * 26 + zip_bytes(members())


def empty_archive() -> bytes:
    local = b'PK\x03\x04' + b'\0' * 26
    return local + struct.pack('<IHHHHIIH', 0x06054B50, 0, 0, 0, 0, 0, len(local), 0)


def bad_central_directory() -> bytes:
    local = b'PK\x03\x04' + b'\0' * 60
    return local + struct.pack('<IHHHHIIH', 0x06054B50, 0, 0, 1, 1, 46, 10, 0)  # points at no central header


def corrupt_deflate() -> bytes:
    bad = Member('archive/data.pkl', OK_PICKLE, deflate=True, payload=b'\xff\xff\xff\xff not deflate')
    return zip_bytes([bad] + members()[1:])


def storage_record(key='0', numel=2, stype=('torch', 'FloatStorage')):
    return tup(s('storage'), glob(*stype), s(key), s('cpu'), i(numel)) + BINPERSID


def tensor_of(record, size):
    return call(glob('torch._utils', '_rebuild_tensor_v2'), record, i(0), tup(*map(i, size)),
                tup(*map(i, [1] * len(size))), NEWFALSE, call(glob('collections', 'OrderedDict')))


def numpy_array(shape, raw: str):
    """``np.ndarray`` as NumPy pickles it: _reconstruct, then BUILD with (version, shape, dtype, fortran, bytes)."""
    dtype = call(glob('numpy', 'dtype'), s('f4'), NEWFALSE, NEWTRUE) + \
        tup(i(3), s('<'), b'N', b'N', b'N', i(-1), i(-1), i(0)) + BUILD
    arr = call(glob('numpy.core.multiarray', '_reconstruct'), glob('numpy', 'ndarray'), tup(i(0)), ep.encode('b'))
    return arr + tup(i(1), tup(*map(i, shape)), dtype, NEWFALSE, ep.encode(raw)) + BUILD


ARCHIVES = {
    'data_before_archive': (data_before_archive, 'does not start at the start of the file'),
    'empty_archive': (empty_archive, 'the zip archive is empty'),
    'bad_central_directory': (bad_central_directory, 'the zip archive is truncated or corrupt'),
    'member_outside_a_folder': (lambda: zip_bytes([Member('data.pkl', OK_PICKLE)]),
                                "archive member 'data.pkl' is not in a folder"),
    'backslash_in_a_name': (lambda: zip_bytes(members() + [Member('archive/data\\x', b'')]), 'has an unusual name'),
    'name_not_ascii': (lambda: zip_bytes(members() + [Member('archive/d\u00e4ta', b'')]), 'has an unusual name'),
    'same_name_twice': (lambda: zip_bytes(members() + [Member('archive/DATA.pkl', b'')]), 'appears twice'),
    'bzip2_member': (lambda: stored_with_method(12), 'uses compression method 12'),
    'encrypted_member': (encrypted, 'is encrypted'),
    'overlapping_members': (overlapping, "archive member 'archive/data.pkl' overlaps the next member"),
    'torchscript_archive': (lambda: zip_bytes(members() + [Member('archive/constants.pkl', OK_PICKLE)]),
                            'it is a TorchScript archive'),
    'no_data_pkl': (lambda: zip_bytes(members()[1:] + [Member('archive/other.pkl', OK_PICKLE)]),
                    'the archive has no data.pkl'),
    'corrupt_deflate_stream': (corrupt_deflate, 'the zip archive is truncated or corrupt'),
}

PICKLES = {
    'memo_before_set': (pickle_of(get(5)), 'memo 5 used before it is set'),
    'append_on_empty_stack': (pickle_of(APPEND), 'stack or mark underflow'),
    'tuple2_on_one_item': (pickle_of(i(1) + b'\x86'), 'stack or mark underflow'),
    'no_stop': (ep.PROTO2 + EMPTY_DICT, 'corrupt or truncated'),
    'invalid_utf8': (pickle_of(b'X' + struct.pack('<I', 2) + b'\xff\xfe'), 'corrupt or truncated'),
    'appends_to_a_dict': (pickle_of(EMPTY_DICT + MARK + i(1) + b'e'), 'appends to dict, which only lists allow'),
    'setitems_on_a_list': (pickle_of(EMPTY_LIST + MARK + s('k') + i(1) + SETITEMS),
                           'sets items on list, which only dicts allow'),
    'odd_setitems': (pickle_of(EMPTY_DICT + MARK + s('k') + SETITEMS), 'odd SETITEMS'),
    'persistent_id_not_a_storage': (pickle_of(s('x') + BINPERSID), "persistent id 'x' that is not a storage record"),
    'storage_of_a_dict_type': (pickle_of(storage_record(stype=('collections', 'OrderedDict'))),
                               'declares a storage of type'),
    'storage_declared_twice': (pickle_of(MARK + tensor_of(storage_record(numel=2), (2, )) +
                                         tensor_of(storage_record(numel=3), (3, )) + b't'),
                               "declares storage '0' twice with different types or sizes"),
    'numpy_array_larger_than_its_bytes': (pickle_of(numpy_array((3, ), 'abcd')),
                                          'makes a numpy array of shape [3] from 4 bytes (it needs 12)'),
    'reduce_on_a_string': (pickle_of(s('x') + tup() + ep.REDUCE), "its pickle calls 'x'()"),
    'bytearray_of_utf8_text': (pickle_of(call(glob('builtins', 'bytearray'), s('x'), s('utf-8'))),
                               "calls builtins.bytearray('x', 'utf-8')"),
    # argparse.Namespace (timm's train.py): only created empty (NEWOBJ) and given identifier attributes once
    'namespace_called': (pickle_of(call(glob('argparse', 'Namespace'))), 'calls argparse.Namespace()'),
    'namespace_with_arguments': (pickle_of(glob('argparse', 'Namespace') + tup(i(1)) + ep.NEWOBJ),
                                 'creates an object of argparse.Namespace(1)'),
    'namespace_built_twice': (pickle_of(glob('argparse', 'Namespace') + ep.EMPTY_TUPLE + ep.NEWOBJ
                                        + ep.dict_of(lr=i(1)) + BUILD + ep.dict_of(lr=i(2)) + BUILD),
                              'sets the state of dict (BUILD with dict)'),
    'namespace_attribute_not_a_name': (pickle_of(glob('argparse', 'Namespace') + ep.EMPTY_TUPLE + ep.NEWOBJ
                                                 + EMPTY_DICT + MARK + s('a b') + i(1) + SETITEMS + BUILD),
                                       'sets the state of dict (BUILD with dict)'),
}


@pytest.mark.parametrize('name', sorted(ARCHIVES))
def test_crafted_archive_is_refused_with_its_reason(name, tmp_path):
    make, reason = ARCHIVES[name]
    path = tmp_path / f'{name}.pth'
    path.write_bytes(make())
    with pytest.raises(CheckpointError) as err:
        load_file(path)
    msg = str(err.value)
    assert msg.startswith(f'refusing to load {path}: ') and reason in msg, msg
    assert '\n' not in msg


@pytest.mark.parametrize('name', sorted(PICKLES))
def test_malformed_pickle_is_refused_with_its_reason(name, tmp_path):
    pkl, reason = PICKLES[name]
    path = tmp_path / f'{name}.pth'
    path.write_bytes(ep.torch_archive(pkl, storages={'0': b'\0' * 12}))
    with pytest.raises(CheckpointError) as err:
        load_file(path)
    assert reason in str(err.value), str(err.value)


def test_the_crafted_files_are_otherwise_well_formed(tmp_path):
    """The refusals above come from the checks, not from a broken helper: the unbroken forms load."""
    path = tmp_path / 'ok.pth'
    path.write_bytes(zip_bytes(members()))
    assert load_file(path) == {}
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == ['archive/data.pkl', 'archive/byteorder', 'archive/version']
    fine = pickle_of(MARK + tensor_of(storage_record(numel=3), (2, )) + tensor_of(storage_record(numel=3), (3, )) +
                     b't')
    path.write_bytes(ep.torch_archive(fine, storages={'0': np.arange(3, dtype=np.float32).tobytes()}))
    a, b = load_file(path)
    assert a.tolist() == [0.0, 1.0] and b.tolist() == [0.0, 1.0, 2.0]
    path.write_bytes(ep.torch_archive(pickle_of(numpy_array((1, ), 'abcd'))))
    assert load_file(path).shape == (1, )


def test_allowed_python_and_numpy_objects_load_with_their_values(tmp_path):
    path = tmp_path / 'objects.pth'
    param = torch.nn.Parameter(torch.arange(3.))
    tagged_param = torch.nn.Parameter(torch.ones(2))
    tagged_param.tag = 'head'  # saved through _rebuild_parameter_with_state
    tagged = torch.zeros(2)
    tagged.note = 7  # saved through _rebuild_from_type_v2 with its __dict__
    shared = [1, 2]
    obj = dict(counter=collections.Counter(a=2, b=1), z=complex(1.5, -2), size=torch.Size([2, 3]),
               device=torch.device('cpu'), layout=torch.strided, param=param, tagged_param=tagged_param,
               tagged=tagged, shared=(shared, shared), raw=bytearray(b'\x00\xffab'), none=bytearray(),
               array=np.arange(6, dtype=np.float32).reshape(2, 3), scalar=np.float64(2.5),
               empty_counter=collections.Counter())
    torch.save(obj, path)
    got = load_file(path)
    assert got['tagged_param'].tag == 'head' and isinstance(got['tagged_param'], torch.nn.Parameter)
    assert got['tagged'].note == 7 and got['tagged'].tolist() == [0., 0.]
    assert got['shared'][0] is got['shared'][1] and got['shared'][0] == [1, 2]
    assert got['raw'] == bytearray(b'\x00\xffab') and got['none'] == bytearray()
    assert got['counter'] == collections.Counter(a=2, b=1) and got['empty_counter'] == collections.Counter()
    assert got['z'] == complex(1.5, -2) and got['size'] == torch.Size([2, 3])
    assert got['device'] == torch.device('cpu') and got['layout'] is torch.strided
    assert isinstance(got['param'], torch.nn.Parameter) and got['param'].tolist() == [0., 1., 2.]
    assert got['array'].tolist() == obj['array'].tolist() and got['scalar'] == 2.5
