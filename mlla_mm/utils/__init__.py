"""Helpers of mlla-mm (FLOP counting, ...)."""
