"""What every data check shares: short message helpers, the folder of filtered copies, dataset classes."""
from __future__ import annotations

import importlib
from typing import Any, Iterable, Optional

#: Where ``--skip-bad-images`` writes the filtered annotation / split files (under the work dir).
CHECKS_DIR = 'data_checks'
SKIP_HINT = 'fix or remove them, or run with --skip-bad-images to leave them out'


def few(items: Iterable[Any], n: int = 5) -> str:
    """``'a, b, c'`` or ``'a, b, c, d, e and 7 more'``."""
    items = [str(i) for i in items]
    head = ', '.join(items[:n])
    return head + (f' and {len(items) - n} more' if len(items) > n else '')


def needed_by(loader_name: str, config_path: str) -> str:
    return f'(needed by {loader_name or "a dataloader"} of {config_path or "the config"})'


def dataset_class(scope: str, type_name: Any) -> Optional[type]:
    """The dataset class a config's ``type`` names (``None`` if it cannot be found)."""
    if isinstance(type_name, type):
        return type_name
    if not isinstance(type_name, str):
        return None
    try:
        registry = importlib.import_module(f'{scope}.registry').DATASETS
        return registry.get(type_name)
    except Exception:  # noqa: BLE001 - no such scope or type: the runner will report it
        return None
