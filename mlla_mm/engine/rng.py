"""The global random state of a run: python's, NumPy's and torch's (and CUDA's) generators.

Saved in checkpoints by :class:`~mlla_mm.engine.hooks.RandomStateHook` and
kept unchanged around work that must not influence training (validation,
fast-forwarding the data of a resumed epoch).
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch


def get_random_state(seed: Optional[int] = None) -> Dict[str, Any]:
    """The global random states of python, NumPy and torch (plus the run's seed)."""
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state(),
             'seed': seed}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


#: The largest seed + 1 (NumPy's seeding takes 32-bit seeds).
SEED_LIMIT = 2 ** 32


class RandomStateError(ValueError):
    """A saved random state cannot be restored; the message names the field (``rng_state.torch``, ...)."""


def check_random_state(state: Any, where: str = 'rng_state') -> None:
    """Raise :class:`RandomStateError` naming the field when :func:`set_random_state` could not restore ``state``.

    Each generator's state is tried on a throwaway generator of its kind, so
    the check is exactly what restoring needs and changes no global state.
    """
    if not isinstance(state, dict):
        raise RandomStateError(f'{where} must be a dict, got {type(state).__name__}')
    for key in ('python', 'numpy', 'torch'):
        if key not in state:
            raise RandomStateError(f'{where}.{key} is missing')
    seed = state.get('seed')
    if seed is not None and not (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)
                                 and 0 <= int(seed) < SEED_LIMIT):
        raise RandomStateError(f'{where}.seed must be an int in [0, 2**32), got {_short(seed)}')
    py = state['python']
    try:
        if not (isinstance(py, (tuple, list)) and len(py) == 3 and (py[2] is None or type(py[2]) is float)):
            raise ValueError('expected (version, internal state, gauss_next) as random.getstate() returns')
        random.Random().setstate((py[0], tuple(py[1]), py[2]))
    except (TypeError, ValueError, OverflowError, IndexError) as err:
        raise RandomStateError(f'{where}.python is not a state of python\'s random module ({err})') from None
    try:
        if not isinstance(state['numpy'], (tuple, list)):
            raise TypeError(f'got {type(state["numpy"]).__name__}')
        np.random.RandomState().set_state(tuple(state['numpy']))
    except (TypeError, ValueError, OverflowError, IndexError, KeyError) as err:
        raise RandomStateError(f'{where}.numpy is not a NumPy random state ({err})') from None
    expected = torch.get_rng_state().numel()
    t = state['torch']
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 and t.numel() == expected):
        got = (f'a {t.dtype} tensor of shape {tuple(t.shape)}' if isinstance(t, torch.Tensor)
               else type(t).__name__)
        raise RandomStateError(f'{where}.torch must be a uint8 tensor of {expected} bytes '
                               f'(torch.get_rng_state()), got {got}')
    cuda = state.get('cuda')
    if cuda is not None and not (isinstance(cuda, (list, tuple)) and all(
            isinstance(c, torch.Tensor) and c.dtype == torch.uint8 and c.dim() == 1 for c in cuda)):
        raise RandomStateError(f'{where}.cuda must be a list of uint8 tensors (torch.cuda.get_rng_state_all())')


def _short(value: Any) -> str:
    if isinstance(value, int) and abs(value) >= 10 ** 30:
        return f'an int of {value.bit_length()} bits'
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + '...'


def set_random_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`get_random_state` returned (also after a round trip through a checkpoint).

    Raises:
        RandomStateError: ``state`` is malformed (checked before anything is changed).
    """
    check_random_state(state)
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state['numpy']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        cuda = state['cuda']
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def preserved_random_state() -> Iterator[None]:
    """Run a block without changing the global random state (it is restored afterwards)."""
    state = get_random_state()
    try:
        yield
    finally:
        set_random_state(state)


__all__ = ['get_random_state', 'set_random_state', 'preserved_random_state', 'check_random_state',
           'RandomStateError', 'SEED_LIMIT']
