"""Safe checkpoint reading and the one converter for every MLLA layout.

Every path in mlla-mm that reads a checkpoint goes through :func:`load_file`:

1. ``torch.load(weights_only=True)`` with an explicit allow-list of the types
   that mmengine writes (its ``HistoryBuffer``, NumPy arrays and scalars).
2. If the file names other globals (for example the yacs ``CfgNode`` that the
   published ImageNet training code stores under ``config``), it is read again
   by an *inert* unpickler: allow-listed globals resolve as usual, every other
   global becomes a stand-in class of this module. Nothing the file names is
   imported, and any attempt of the file to *call* a foreign global (the way
   malicious pickles run code) refuses the whole file.
3. Files you trust can be loaded with plain pickle by passing ``trusted=True``
   or setting ``MLLA_MM_TRUST_CHECKPOINTS=1``.

:func:`convert_checkpoint` turns any supported layout (published ImageNet,
published mmdet 2.x / mmseg 0.x, plain state dict, mmengine checkpoints) into
``{'state_dict': ..., 'meta': ...}``; converting its output again is a no-op.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch

TRUST_ENV = 'MLLA_MM_TRUST_CHECKPOINTS'
_TRUST_HINT = (f'If you trust this file, load it with trusted=True (init_cfg / converter '
               f'--trusted) or set {TRUST_ENV}=1.')


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message names the file."""


# --------------------------------------------------------------------------
# Allow-list of the types mmengine (and NumPy inside it) write to checkpoints.
# --------------------------------------------------------------------------
def _numpy_globals() -> List[Any]:
    out: List[Any] = [np.ndarray, np.dtype]
    core = getattr(np, '_core', None) or np.core
    out += [core.multiarray._reconstruct, core.multiarray.scalar]
    out += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith('DType')]
    return out


def safe_globals() -> List[Any]:
    """The globals allowed in a ``weights_only`` load besides torch's own."""
    from mmengine.logging.history_buffer import HistoryBuffer
    return [HistoryBuffer, OrderedDict, *_numpy_globals()]


def _global_name(obj: Any) -> str:
    return f'{obj.__module__}.{obj.__qualname__}'


# --------------------------------------------------------------------------
# The inert unpickler.
# --------------------------------------------------------------------------
class ForeignObject(dict):
    """Stand-in for an object of a class the checkpoint names but we do not trust.

    It is created without running any code of that class. Dict items the
    pickle stores go into the dict; any other state is kept in ``state``.
    """

    qualname = '?'

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: D401
        # Pickles call globals through REDUCE, which lands here. Creating an
        # object through NEWOBJ does not call __init__.
        raise _RefusedCall(self.qualname)

    def __setstate__(self, state: Any) -> None:
        self.__dict__['state'] = state

    def __repr__(self) -> str:
        return f'ForeignObject({self.qualname}, {dict.__repr__(self)})'


class _RefusedCall(Exception):
    pass


class _InertUnpickler(pickle.Unpickler):
    _allowed: Dict[str, Any] = {}
    _standins: Dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = f'{module}.{name}'
        if key in self._allowed:
            return self._allowed[key]
        if key not in self._standins:
            self._standins[key] = type(name, (ForeignObject, ), {'qualname': key})
        return self._standins[key]


class _InertPickleModule:
    """A ``pickle_module`` for ``torch.load`` that builds only inert objects."""
    Unpickler = _InertUnpickler
    load = staticmethod(lambda f, **kw: _InertUnpickler(f, **kw).load())


def _restricted_getattr(obj: Any, name: str) -> Any:
    from mmengine.logging.history_buffer import HistoryBuffer
    # HistoryBuffer fills _statistics_methods with its four built-in statistics
    # when the first buffer is made, so name those explicitly too (a fresh
    # process may read a checkpoint before it makes any buffer).
    if obj is HistoryBuffer and (name in ('min', 'max', 'current', 'mean')
                                 or name in HistoryBuffer._statistics_methods):
        return getattr(obj, name)
    raise _RefusedCall(f'getattr({getattr(obj, "qualname", obj)!r}, {name!r})')


def _allowed_globals() -> Dict[str, Any]:
    from torch import _weights_only_unpickler as wou
    allowed = dict(wou._get_allowed_globals())
    allowed.update(wou._get_user_allowed_globals())
    for obj in safe_globals():
        allowed[_global_name(obj)] = obj
    # NumPy moved its core module; pickles name either spelling.
    for key, obj in list(allowed.items()):
        if key.startswith('numpy._core.'):
            allowed.setdefault('numpy.core.' + key[len('numpy._core.'):], obj)
    # mmengine's HistoryBuffer pickles its statistics methods as
    # getattr(HistoryBuffer, 'mean'); allow exactly that use of getattr.
    allowed['__builtin__.getattr'] = allowed['builtins.getattr'] = _restricted_getattr
    # Builtins that plain containers need.
    for obj in (set, frozenset, complex, slice, range, bytearray):
        allowed[f'builtins.{obj.__name__}'] = obj
    return allowed


def _is_trusted(trusted: Optional[bool]) -> bool:
    if trusted is not None:
        return bool(trusted)
    return os.environ.get(TRUST_ENV, '').strip().lower() in ('1', 'true', 'yes')


def load_file(path: str, map_location: Any = 'cpu', trusted: Optional[bool] = None) -> Any:
    """Read a checkpoint file without running code from it.

    Args:
        path: The checkpoint file.
        map_location: Passed to ``torch.load``.
        trusted: Load with plain pickle (runs code from the file). ``None``
            reads ``MLLA_MM_TRUST_CHECKPOINTS``.

    Raises:
        FileNotFoundError: The file does not exist.
        CheckpointError: The file is empty, truncated, corrupt, or wants to
            run code and is not trusted.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'checkpoint file is empty: {path}')
    if _is_trusted(trusted):
        return _torch_load(path, map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return _torch_load(path, map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if 'global' not in str(err).lower():
            raise CheckpointError(f'checkpoint file is corrupt: {path} ({_first_line(err)})') from None
    # The file names globals outside the allow-list: read it inertly.
    _InertUnpickler._allowed = _allowed_globals()
    try:
        return _torch_load(path, map_location, weights_only=False, pickle_module=_InertPickleModule)
    except _RefusedCall as err:
        raise CheckpointError(
            f'refusing to load {path}: it tries to call {err.args[0]} while being read, '
            f'which could run arbitrary code. {_TRUST_HINT}') from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _torch_load(path: str, map_location: Any, **kwargs: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, **kwargs)
    except _RefusedCall:
        raise
    except pickle.UnpicklingError as err:
        if kwargs.get('weights_only'):
            raise
        raise CheckpointError(f'checkpoint file is truncated or corrupt: {path} ({_first_line(err)})') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, IndexError, KeyError, TypeError) as err:
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


def find_state_dict(ckpt: Any, use_ema: bool = False, source: str = '<checkpoint>') -> Tuple[Dict[str, torch.Tensor], str]:
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
    """``torch.save`` to a temporary file in the same folder, then rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
    mismatched = [f'{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in weights.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in weights]
    required = [k for k in missing if not optional(k) and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in weights if k not in own] + list(dropped)
    if strict and mismatched:
        raise CheckpointError(
            f'{path}: {len(mismatched)} tensor(s) have the wrong shape, e.g. {"; ".join(mismatched[:3])}. '
            'Is it a checkpoint of another MLLA size? Pass strict=False in init_cfg to skip them.')
    if strict and required:
        raise CheckpointError(
            f'{path}: {len(required)} of {len(own)} backbone tensors are missing from the file '
            f'(e.g. {", ".join(required[:4])}): wrong arch or not an MLLA checkpoint '
            f'({len(weights)} tensors found). Pass strict=False in init_cfg to load anyway.')
    bad = {m.split(':')[0] for m in mismatched}
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


__all__ = ['CheckpointError', 'ForeignObject', 'TRUST_ENV', 'load_file', 'convert_checkpoint',
           'convert_file', 'find_state_dict', 'backbone_state_dict', 'load_backbone_weights',
           'save_atomic', 'register_mmengine_loader', 'safe_globals']
