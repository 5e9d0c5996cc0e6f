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


def set_random_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`get_random_state` returned (also after a round trip through a checkpoint)."""
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


__all__ = ['get_random_state', 'set_random_state', 'preserved_random_state']
