"""Tests of the maintainer scripts under dev/ (not a package: loaded by path)."""
import importlib.util

from tests.helpers import ROOT


def load_dev(name: str):
    """Import ``dev/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f'mlla_mm_dev_{name}', ROOT / 'dev' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
