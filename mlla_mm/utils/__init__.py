"""Helpers of mlla-mm (FLOP counting, CPU malloc tuning)."""
from .malloc import malloc_state, tune_cpu_malloc

__all__ = ['tune_cpu_malloc', 'malloc_state']
