"""Safe checkpoint reading and the one converter for every MLLA layout.

Every path in mlla-mm that reads a checkpoint goes through :func:`load_file`
(the backbone's ``init_cfg``, mmengine's ``load_from``/``--resume`` and
``tools/test.py`` through :func:`register_mmengine_loader`, and
``tools/convert_checkpoint.py``):

1. :mod:`mlla_mm.checkpoint_guard` checks the file without running anything
   from it: a torch zip archive (legacy pre-1.6 files are refused), no zip
   bomb, a pickle that uses only the opcodes, names and call forms that
   checkpoints contain, storages that fit their archive members and a
   bounded number of Python objects.
2. ``torch.load(weights_only=True)`` then reads it with torch's own
   restricted unpickler; torch's safe-globals API maps the few foreign names
   that published files contain (yacs' ``CfgNode``, mmengine's
   ``HistoryBuffer``, NumPy arrays and scalars) to inert stand-ins.
3. Files you trust can be loaded with plain pickle by passing ``trusted=True``
   or setting ``MLLA_MM_TRUST_CHECKPOINTS=1``.

``.safetensors`` files (recognised by their header, whatever their name)
hold only tensors and a JSON header, so nothing in them can run: they are
read with the ``safetensors`` library (installed with timm) into a plain
state dict.

Every failure is a :class:`CheckpointError` naming the file.

:func:`convert_checkpoint` turns any supported layout (published ImageNet,
published mmdet 2.x / mmseg 0.x, plain state dict, mmengine checkpoints) into
``{'state_dict': ..., 'meta': ...}``; converting its output again is a no-op.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

import torch

from . import checkpoint_guard as guard
from .errors import CheckpointError
from .utils.io import AtomicWriteError, atomic_write

TRUST_ENV = 'MLLA_MM_TRUST_CHECKPOINTS'
_TRUST_HINT = (f'If you trust this file, load it with trusted=True (init_cfg / converter '
               f'--trusted) or set {TRUST_ENV}=1.')


def safe_globals() -> List[Any]:
    """The ``(object, 'qualified.name')`` pairs allowed in a load besides torch's own names."""
    return guard.safe_globals()


def _is_trusted(trusted: Optional[bool]) -> bool:
    if trusted is not None:
        return bool(trusted)
    return os.environ.get(TRUST_ENV, '').strip().lower() in ('1', 'true', 'yes')


def load_file(path: str, map_location: Any = 'cpu', trusted: Optional[bool] = None) -> Any:
    """Read a checkpoint file without running code from it, in bounded memory.

    Args:
        path: The checkpoint file.
        map_location: Passed to ``torch.load``.
        trusted: Load with plain pickle (runs code from the file). ``None``
            reads ``MLLA_MM_TRUST_CHECKPOINTS``.

    Raises:
        FileNotFoundError: The file does not exist.
        CheckpointError: The file is empty, truncated, corrupt, in the legacy
            format, a zip bomb, would allocate more than it holds, or names or
            calls anything outside the allow-list (and is not trusted).
    """
    path = _existing_file(path)
    # One open file for the check and the load: renaming another file into
    # place in between cannot swap what is read.
    with open(path, 'rb') as f:
        if is_safetensors(f):
            return _load_safetensors(f, path, map_location)
        if _is_trusted(trusted):
            f.seek(0)
            return _torch_load(f, path, map_location, weights_only=False)
        _scan(f, path)
        f.seek(0)
        # Add (and afterwards remove) only the entries not already allowed by someone else.
        present = set(torch.serialization.get_safe_globals())
        with torch.serialization.safe_globals([g for g in guard.safe_globals() if g not in present]):
            return _torch_load(f, path, map_location, weights_only=True)


def _existing_file(path: str, name: str = '') -> str:
    """``path`` as a string when it names a non-empty file; else the error :func:`load_file` documents.

    ``name`` (``'--weights'``, ``'checkpoint'``) says which argument the path came from in the messages.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f'{name + " " if name else ""}{path} is a directory, not a checkpoint file')
    if not os.path.isfile(path):
        if os.path.exists(path):  # a device (/dev/zero), a FIFO or a socket: stat only, nothing is opened
            raise CheckpointError(f'{name + " " if name else ""}{path} is not a regular file (a device, FIFO or '
                                  'socket), not a checkpoint file')
        raise FileNotFoundError(f'{name or "checkpoint file"} not found: {path}')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'{name or "checkpoint file"} is empty: {path}')
    return path


def check_file(path: str, trusted: Optional[bool] = None, name: str = '') -> None:
    """What :func:`load_file` checks before it reads any tensor, without reading them (fast, for tools).

    The file exists, is not a directory or empty, and (unless trusted) passes
    the guard's scan of its archive and pickle (:mod:`.checkpoint_guard`); a
    safetensors file passes. Raises the same errors as :func:`load_file`, so
    a tool can refuse a file before it builds anything; :func:`load_file`
    checks again when it reads. ``name`` is the tool's argument for the
    messages (``'--weights'``); without it they say "checkpoint file".
    """
    path = _existing_file(path, name)
    with open(path, 'rb') as f:
        if is_safetensors(f) or _is_trusted(trusted):
            return
        _scan(f, path)


def _scan(f: Any, path: str) -> None:
    """The guard's check of an open file, its refusals as :class:`CheckpointError` naming ``path``."""
    try:
        guard.check_file(f)
    except guard.Refused as err:
        reason = str(err) if str(err).endswith(('.', '?')) else f'{err}.'
        hint = f' {_TRUST_HINT}' if err.names_code else ''
        raise CheckpointError(f'refusing to load {path}: {reason}{hint}') from None
    except (MemoryError, RecursionError) as err:
        raise CheckpointError(f'refusing to load {path}: checking it ran out of '
                              f'{"memory" if isinstance(err, MemoryError) else "stack"}') from None


def is_safetensors(f: Any) -> bool:
    """True when the open binary file ``f`` starts like a safetensors file (8-byte header size, then ``{``)."""
    f.seek(0)
    head = f.read(9)
    f.seek(0)
    if len(head) < 9 or head[8:9] != b'{':
        return False
    return 0 < int.from_bytes(head[:8], 'little') <= os.fstat(f.fileno()).st_size - 8


def _load_safetensors(f: Any, path: str, map_location: Any) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file as an ordered state dict (file order); errors name the file."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors
    except ImportError:  # pragma: no cover - timm depends on safetensors
        raise CheckpointError(f'{path} is a safetensors file; install safetensors to read it') from None
    duplicate = _safetensors_duplicate_key(f)
    if duplicate:  # readers disagree on which entry counts (the last one, for safetensors): an ambiguous file
        raise CheckpointError(f'safetensors file is corrupt: {path} (its header names {duplicate[:80]!r} twice)')
    f.seek(0)
    try:
        weights = load_safetensors(f.read())
    except MemoryError:
        raise CheckpointError(f'checkpoint file {path} needs more memory than is available') from None
    except (SafetensorError, ValueError, RuntimeError, OverflowError, KeyError, TypeError, AttributeError,
            IndexError) as err:  # KeyError/TypeError: a dtype torch lacks, a shape torch cannot hold
        reason = safetensors_header_problem(f) or _first_line(err)
        raise CheckpointError(f'safetensors file is truncated or corrupt: {path} ({reason})') from None
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        weights = {k: v.to(map_location) for k, v in weights.items()}
    return OrderedDict(weights)


def _safetensors_duplicate_key(f: Any) -> Optional[str]:
    """A key that appears twice in one object of the safetensors header of ``f`` (None when none does).

    JSON allows it, and the last entry silently wins: a file could show one
    tensor to a tool that reads the first entry and load another.
    """
    import json
    f.seek(0)
    n = int.from_bytes(f.read(8), 'little')
    found: List[str] = []

    def pairs(items: List[Tuple[str, Any]]) -> Dict[str, Any]:
        out = dict(items)
        if len(out) != len(items) and not found:
            seen = set()
            found.extend(k for k, _ in items if k in seen or seen.add(k))
        return out

    try:
        json.loads(f.read(n), object_pairs_hook=pairs)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None  # not JSON: the reader's own error says so
    return found[0] if found else None


#: safetensors dtype names -> the torch dtype they are read as, when the library does not say
#: (``safetensors.torch._TYPES``; a name it lacks cannot be read, whatever torch has).
_SAFETENSORS_DTYPES = {'BOOL': 'bool', 'U8': 'uint8', 'I8': 'int8', 'I16': 'int16', 'U16': 'uint16',
                       'F16': 'float16', 'BF16': 'bfloat16', 'I32': 'int32', 'U32': 'uint32', 'F32': 'float32',
                       'F64': 'float64', 'I64': 'int64', 'U64': 'uint64', 'C64': 'complex64',
                       'F8_E4M3': 'float8_e4m3fn', 'F8_E5M2': 'float8_e5m2'}
#: Sizes and element counts torch can hold (int64).
_TORCH_SIZE_LIMIT = 2 ** 63


def safetensors_header_problem(f: Any) -> Optional[str]:
    """What in the header of the open safetensors file ``f`` torch cannot hold (None: nothing found there).

    Called when reading failed, to name the tensor: a dtype torch lacks
    (``F4``, ``F6_E2M3``, ...), a shape that is not a list of non-negative
    ints or whose size overflows int64 (``[2**63, 0]``), data offsets that do
    not match the shape or lie outside the file.
    """
    import json
    f.seek(0)
    size = os.fstat(f.fileno()).st_size
    n = int.from_bytes(f.read(8), 'little')
    if n > size - 8:
        return f'its header claims {n} bytes, more than the file holds'
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        return f'its header is not JSON ({_first_line(err)})'
    if not isinstance(header, dict):
        return f'its header is a JSON {type(header).__name__}, not an object'
    data_size = size - 8 - n
    readable = _safetensors_dtypes()
    for name, entry in header.items():
        if name == '__metadata__':
            continue
        if not isinstance(entry, dict):
            return f'tensor {name!r}: its entry is not an object'
        dtype, shape, offsets = entry.get('dtype'), entry.get('shape'), entry.get('data_offsets')
        torch_dtype = readable.get(dtype) if isinstance(dtype, str) else None
        if torch_dtype is None:
            return (f'tensor {name!r} has dtype {str(dtype)[:20]!r}, which cannot be read into torch '
                    f'{torch.__version__} (readable: {", ".join(readable)})')
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < _TORCH_SIZE_LIMIT for d in shape)):
            return (f'tensor {name!r} has shape {str(shape)[:60]}, not a list of sizes torch can hold '
                    '(0 <= size < 2**63)')
        if _nonzero_product(shape) >= _TORCH_SIZE_LIMIT:
            return f'tensor {name!r} has shape {str(shape)[:60]}, whose size overflows torch\'s int64 sizes'
        numel = _nonzero_product(shape) if all(shape) else 0
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            return f'tensor {name!r} has data offsets {str(offsets)[:60]} outside the file\'s {data_size} data bytes'
        need = numel * torch_dtype.itemsize
        if offsets[1] - offsets[0] != need:
            return (f'tensor {name!r} of shape {shape} and dtype {dtype} needs {need} bytes, its offsets give '
                    f'{offsets[1] - offsets[0]}')
    return None


def _safetensors_dtypes() -> Dict[str, torch.dtype]:
    """The safetensors dtype names the installed library reads into torch, and the torch dtype of each."""
    try:
        from safetensors import torch as st
        known = getattr(st, '_TYPES', None)
    except ImportError:  # pragma: no cover - timm depends on safetensors
        known = None
    if isinstance(known, dict) and known:
        return {k: v for k, v in known.items() if isinstance(v, torch.dtype)}
    return {k: getattr(torch, v) for k, v in _SAFETENSORS_DTYPES.items()
            if isinstance(getattr(torch, v, None), torch.dtype)}


def _nonzero_product(shape: List[int]) -> int:
    out = 1
    for d in shape:
        out *= d or 1
    return out


def _first_line(err: BaseException) -> str:
    text = str(err)
    if 'WeightsUnpickler error:' in text:  # torch's weights_only message buries the reason
        text = text.split('WeightsUnpickler error:', 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _torch_load(f: Any, path: str, map_location: Any, weights_only: bool) -> Any:
    try:
        return torch.load(f, map_location=map_location, weights_only=weights_only, mmap=False)
    except MemoryError:
        raise CheckpointError(f'checkpoint file {path} needs more memory than is available') from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, IndexError, KeyError, TypeError, AssertionError, UnicodeDecodeError,
            ImportError, RecursionError) as err:
        raise CheckpointError(
            f'checkpoint file is truncated or corrupt: {path} ({_first_line(err)})') from None


# --------------------------------------------------------------------------
# Layouts and the converter.
# --------------------------------------------------------------------------
_ROPE_TABLE = re.compile(r'(^|\.)attn\.rope\.rotations$')
_CLASSIFIER = re.compile(r'^(head|norm)\.')
_HEAD_PREFIXES = ('neck.', 'rpn_head.', 'roi_head.', 'decode_head.', 'auxiliary_head.')


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def find_state_dict(ckpt: Any, use_ema: bool = False,
                    source: str = '<checkpoint>') -> Tuple[Dict[str, torch.Tensor], str]:
    """Return the weights of a loaded checkpoint and the name of its layout."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f'{source}: expected a dict of weights, got {type(ckpt).__name__}')
    if use_ema:
        if not _is_state_dict(ckpt.get('state_dict_ema')):
            raise CheckpointError(f'{source}: use_ema=True but the file has no state_dict_ema')
        return dict(ckpt['state_dict_ema']), 'imagenet-ema'
    if _is_state_dict(ckpt.get('model')):
        return dict(ckpt['model']), 'imagenet'
    if _is_state_dict(ckpt.get('state_dict')):
        meta = ckpt.get('meta')
        if isinstance(meta, Mapping) and meta.get('mlla_mm_layout'):
            return dict(ckpt['state_dict']), str(meta['mlla_mm_layout'])
        return dict(ckpt['state_dict']), 'mmengine'
    if _is_state_dict(ckpt):
        return dict(ckpt), 'plain'
    keys = ', '.join(map(str, list(ckpt)[:8]))
    raise CheckpointError(
        f'{source}: no weights found; expected a state dict under "state_dict" (mmdet/mmseg/mmengine), '
        f'"model" (published ImageNet) or a plain dict of tensors, got keys: {keys}')


def convert_checkpoint(ckpt: Any, use_ema: bool = False, source: str = '<checkpoint>') -> Dict[str, Any]:
    """Convert any supported checkpoint to mlla-mm's layout.

    The result is ``{'state_dict': weights, 'meta': {...}}``. ``module.``
    prefixes (DDP) and the unused fixed RoPE tables are dropped; an ImageNet
    classifier's ``head.*`` and final ``norm.*`` are dropped too. Detector and
    segmentor checkpoints keep their ``backbone.``/head prefixes so they load
    through ``load_from``. Converting the result again returns it unchanged.
    """
    state_dict, layout = find_state_dict(ckpt, use_ema=use_ema, source=source)
    old_meta = ckpt.get('meta') if isinstance(ckpt, Mapping) else None
    already = isinstance(old_meta, Mapping) and 'mlla_mm_layout' in old_meta
    out: Dict[str, torch.Tensor] = OrderedDict()
    dropped: List[str] = []
    is_model = any(k.startswith('backbone.') or k.startswith('module.backbone.') for k in state_dict)
    for key, value in state_dict.items():
        if key.startswith('module.'):
            key = key[len('module.'):]
        if _ROPE_TABLE.search(key) or (not is_model and _CLASSIFIER.match(key)):
            dropped.append(key)
            continue
        out[key] = value
    if already:
        meta = dict(old_meta)
    else:
        meta = {'mlla_mm_layout': 'detector/segmentor' if is_model else 'backbone',
                'source_layout': layout, 'dropped_keys': dropped}
        if isinstance(old_meta, Mapping):
            meta['source_meta'] = {k: v for k, v in old_meta.items() if isinstance(v, (str, int, float, bool))}
    return {'state_dict': out, 'meta': meta}


def backbone_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The backbone part of a whole-model state dict (or the dict itself)."""
    if any(k.startswith('backbone.') for k in state_dict):
        return {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    return dict(state_dict)


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`mlla_mm.utils.io.atomic_write` (temporary file, fsync, rename).

    Raises:
        AtomicWriteError: Writing failed (e.g. disk full); the message names
            ``path``, any previous file there is unchanged and no temporary
            file is left.
    """
    path = os.fspath(path)
    with atomic_write(path, 'wb') as f:
        out = _WriteRecorder(f)
        try:
            torch.save(obj, out)
        except RuntimeError as err:  # torch's zip writer reports a failed write as RuntimeError
            if out.error is not None:  # the real reason (e.g. no space left on device)
                raise out.error from None
            raise OSError(errno.EIO, _first_line(err)) from None


class _WriteRecorder:
    """A binary file for ``torch.save`` that remembers the ``OSError`` of a failed write."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as err:
            self.error = err
            raise


def convert_file(src: str, dst: str, use_ema: bool = False, backbone_only: bool = False,
                 trusted: Optional[bool] = None) -> Dict[str, Any]:
    """Convert the checkpoint ``src`` and write it atomically to ``dst``."""
    converted = convert_checkpoint(load_file(src, trusted=trusted), use_ema=use_ema, source=src)
    if backbone_only:
        converted['state_dict'] = backbone_state_dict(converted['state_dict'])
        converted['meta'] = dict(converted['meta'], mlla_mm_layout='backbone')
    save_atomic(converted, dst)
    return converted


# --------------------------------------------------------------------------
# Loading into a backbone.
# --------------------------------------------------------------------------
def _summarise(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    rope = [k for k in keys if _ROPE_TABLE.search(k)]
    rest = [k for k in keys if not _ROPE_TABLE.search(k)]
    parts = rest[:limit] + ([f'... {len(rest) - limit} more'] if len(rest) > limit else [])
    if rope:
        parts.append(f'{len(rope)} x attn.rope.rotations (fixed tables, unused)')
    return ', '.join(parts) if parts else 'none'


class StateDictFit(NamedTuple):
    """How a file's weights line up with a model's (see :func:`compare_state_dicts`)."""

    common: List[str]
    """Model keys the file has."""
    wrong: List[Tuple[str, str]]
    """``(key, 'key: file (..) vs model (..)')`` for common keys of another shape."""
    missing: List[str]
    """Model keys the file lacks."""
    unexpected: List[str]
    """File keys the model lacks."""


def compare_state_dicts(own: Mapping[str, Any], weights: Mapping[str, Any]) -> StateDictFit:
    """Compare a file's weights with a model's state dict by key and shape.

    The one shape check behind :func:`load_backbone_weights` (``init_cfg``)
    and :func:`check_checkpoint_fits` (``load_from``).
    """
    common = [k for k in weights if k in own]
    wrong = [(k, f'{k}: file {_shape_or_type(weights[k])} vs model {tuple(own[k].shape)}') for k in common
             if not isinstance(weights[k], torch.Tensor) or tuple(weights[k].shape) != tuple(own[k].shape)]
    return StateDictFit(common=common, wrong=wrong, missing=[k for k in own if k not in weights],
                        unexpected=[k for k in weights if k not in own])


def _shape_or_type(value: Any) -> str:
    """A tensor's shape, or what a value that is not a tensor is (``'str, not a tensor'``)."""
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    return f'{type(value).__name__}, not a tensor'


def check_checkpoint_fits(model: torch.nn.Module, state_dict: Dict[str, Any], filename: str,
                          whole: bool = False) -> None:
    """Raise :class:`CheckpointError` when ``state_dict`` cannot be meant for ``model``.

    Backbone tensors of another shape (another MLLA size) or no tensor in
    common at all (another model) are errors; other shape differences (e.g.
    a head with another number of classes when fine-tuning) are left to
    mmengine, which skips them with a warning. With ``whole`` (tools/test.py,
    ``--resume``: the whole model comes from the file) every tensor of the
    model must be in it with its shape: a checkpoint of the other task (its
    heads) or of a deeper MLLA (its extra blocks) would otherwise run with
    those parts at random.
    """
    own = model.state_dict()
    check_state_dict_metadata(state_dict, filename)
    keys = [re.sub(r'^module\.', '', k) for k in state_dict]
    fit = compare_state_dicts(own, dict(zip(keys, state_dict.values())))
    values = dict(zip(keys, state_dict.values()))
    not_tensors = [msg for k, msg in fit.wrong if not isinstance(values[k], torch.Tensor)]
    if not_tensors:  # never meaningful: torch would skip them (a random model evaluated) or fail later
        raise CheckpointError(
            f'{filename}: {len(not_tensors)} of the model\'s weights in it are not tensors, e.g. '
            f'{"; ".join(not_tensors[:2])}: a damaged or crafted checkpoint?')
    if own and not fit.common:
        sample = ', '.join(keys[:4]) or 'none'
        hint = (' It looks like backbone-only weights: load them with model.backbone.init_cfg='
                "dict(type='Pretrained', checkpoint=...) instead of load_from."
                if any(k.startswith(('layers.', 'patch_embed.')) for k in keys) else '')
        raise CheckpointError(
            f'{filename}: none of its {len(keys)} tensors belong to this model '
            f'(file keys e.g. {sample}; model keys e.g. {", ".join(list(own)[:3])}): '
            f'a checkpoint of another model?{hint}')
    wrong = [msg for k, msg in fit.wrong if k.startswith('backbone.')]
    if wrong:
        raise CheckpointError(
            f'{filename}: {len(wrong)} backbone tensor(s) have the wrong shape, e.g. {"; ".join(wrong[:2])}. '
            'Is it a checkpoint of another MLLA size (arch)?')
    if whole:
        missing = [k for k in fit.missing if not k.endswith('num_batches_tracked')]
        if missing or fit.wrong:
            parts = []
            if missing:
                parts.append(f'{len(missing)} of the model\'s tensors are not in it (e.g. {", ".join(missing[:3])})')
            if fit.wrong:
                parts.append(f'{len(fit.wrong)} have another shape (e.g. {"; ".join(m for _, m in fit.wrong[:2])})')
            raise CheckpointError(
                f'{filename}: {"; ".join(parts)}. Testing and resuming take the whole model from the checkpoint: '
                'is it a checkpoint of another config (the other task, another MLLA size or head)?')


def check_state_dict_metadata(state_dict: Any, filename: str) -> None:
    """Refuse a state dict whose ``_metadata`` (torch's per-module versions) is not what torch writes.

    ``Module.load_state_dict`` reads ``state_dict._metadata[prefix].get('version')``;
    anything but a dict of dicts there is a traceback inside torch or mmengine.
    """
    meta = getattr(state_dict, '_metadata', None)
    if meta is None:
        return

    def entry_ok(key: Any, value: Any) -> bool:
        version = value.get('version') if isinstance(value, Mapping) else 'missing'
        return isinstance(key, str) and (version is None or type(version) is int)

    if not isinstance(meta, Mapping) or not all(entry_ok(k, v) for k, v in meta.items()):
        got = type(meta).__name__ if not isinstance(meta, Mapping) else 'a dict with other entries'
        raise CheckpointError(f'{filename}: state_dict._metadata must be a dict of module name -> dict with an '
                              f'int version (what torch writes), got {got}: a damaged or crafted checkpoint?')


def load_backbone_weights(model: torch.nn.Module, path: str, strict: bool = True, use_ema: bool = False,
                          trusted: Optional[bool] = None,
                          optional: Callable[[str], bool] = lambda k: False,
                          log: Callable[[str], None] = print, prefix: Optional[str] = None,
                          map_location: Any = 'cpu') -> Dict[str, List[str]]:
    """Load a checkpoint of any supported layout into ``model`` and report it.

    Args:
        model: The backbone.
        path: Checkpoint file.
        strict: Raise when a tensor's shape differs or a required tensor is missing.
        use_ema: Take ``state_dict_ema`` of a published training checkpoint.
        trusted: See :func:`load_file`.
        optional: Keys of ``model`` that may be missing (e.g. output norms).
        log: Where the one-line summary goes.
        prefix: Take only the weights under this prefix and strip it (a ``.``
            is appended when missing), as mmengine's ``PretrainedInit`` does,
            e.g. ``'backbone.'`` of a whole detector; applied after a DDP
            ``module.`` wrapper is removed. Default: the ``backbone.`` part of
            a whole-model checkpoint, else every weight.
        map_location: As in ``torch.load``.

    Returns:
        ``{'loaded': [...], 'missing': [...], 'unexpected': [...]}``.
    """
    ckpt = load_file(path, map_location=map_location, trusted=trusted)
    raw = convert_checkpoint(ckpt, use_ema=use_ema, source=path)
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        weights = {k[len(prefix):]: v for k, v in raw['state_dict'].items() if k.startswith(prefix)}
        if not weights:
            found = sorted({k.split('.')[0] + '.' for k in raw['state_dict']})
            raise CheckpointError(f'{path}: no weights under prefix {prefix!r}; '
                                  f'the file\'s keys start with {", ".join(found[:8])}')
    else:
        weights = backbone_state_dict(raw['state_dict'])
    dropped = raw['meta'].get('dropped_keys', []) if isinstance(raw['meta'], Mapping) else []
    own = model.state_dict()
    fit = compare_state_dicts(own, weights)
    mismatched = [msg for _, msg in fit.wrong]
    missing = fit.missing
    required = [k for k in missing if not optional(k) and not k.endswith('num_batches_tracked')]
    unexpected = fit.unexpected + list(dropped)
    if strict and mismatched:
        raise CheckpointError(
            f'{path}: {len(mismatched)} tensor(s) have the wrong shape, e.g. {"; ".join(mismatched[:3])}. '
            'Is it a checkpoint of another MLLA size? Pass strict=False in init_cfg to skip them.')
    if strict and required:
        raise CheckpointError(
            f'{path}: {len(required)} of {len(own)} backbone tensors are missing from the file '
            f'(e.g. {", ".join(required[:4])}): wrong arch or not an MLLA checkpoint '
            f'({len(weights)} tensors found). Pass strict=False in init_cfg to load anyway.')
    bad = {k for k, _ in fit.wrong}
    loadable = {k: v for k, v in weights.items() if k in own and k not in bad}
    model.load_state_dict(loadable, strict=False)
    log(f'Loaded {len(loadable)}/{len(own)} tensors from {path}; '
        f'missing (kept at init): {_summarise(missing)}; '
        f'unexpected (ignored): {_summarise(unexpected)}'
        + (f'; wrong shape (skipped): {_summarise(bad)}' if bad else ''))
    return {'loaded': sorted(loadable), 'missing': missing, 'unexpected': unexpected}


# --------------------------------------------------------------------------
# mmengine integration: load_from, --resume and tools/test.py read through
# load_file, so torch >= 2.6 reads mmengine's own checkpoints again.
# --------------------------------------------------------------------------
def register_mmengine_loader() -> None:
    """Make mmengine read local checkpoints through :func:`load_file`."""
    from mmengine.runner.checkpoint import CheckpointLoader

    def load_from_local(filename: str, map_location: Any = None) -> Any:
        filename = os.path.expanduser(filename)
        return load_file(filename, map_location=map_location)

    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


__all__ = ['CheckpointError', 'TRUST_ENV', 'load_file', 'convert_checkpoint', 'convert_file',
           'find_state_dict', 'backbone_state_dict', 'load_backbone_weights', 'compare_state_dicts',
           'StateDictFit', 'check_checkpoint_fits', 'check_state_dict_metadata', 'check_file', 'save_atomic',
           'AtomicWriteError',
           'register_mmengine_loader', 'safe_globals']
