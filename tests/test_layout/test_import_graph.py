"""The package's layer order (docs/layout.md, issue 27): imports run downward only.

Every ``import`` of ``mlla_mm`` (also those inside functions) is read from the source with
:mod:`ast`; each module is mapped to its unit (a folder of the package, a top-level file, or a
single file of ``models/``) and the graph of units must have no cycle. ``models/`` may not import
``engine/``, ``datasets/`` or ``deploy/``; ``datasets/`` may not import ``engine/`` or ``deploy/``;
``engine/`` may not import ``deploy/``; nothing in the package imports the command-line module
``mlla_mm.cli``.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / 'mlla_mm'

# (importer unit prefix, imported unit prefix): imports that would run upward.
FORBIDDEN = [('models', 'engine'), ('models', 'datasets'), ('models', 'deploy'),
             ('datasets', 'engine'), ('datasets', 'deploy'), ('engine', 'deploy'),
             ('utils', 'models'), ('utils', 'engine'), ('utils', 'datasets'), ('utils', 'deploy')]


def module_name(path: Path, package_root: Path) -> str:
    """``mlla_mm/engine/runner.py`` -> ``mlla_mm.engine.runner`` (``__init__`` is its package)."""
    parts = list(path.relative_to(package_root.parent).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts = parts[:-1]
    return '.'.join(parts)


def imported_modules(path: Path, package_root: Path) -> Iterator[str]:
    """Every ``mlla_mm`` module that ``path`` imports, anywhere in the file."""
    own = module_name(path, package_root)
    is_package = path.name == '__init__.py'
    modules = {module_name(p, package_root) for p in package_root.rglob('*.py')}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split('.')[0] == package_root.name:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own.split('.') if is_package else own.split('.')[:-1]
                base = base[:len(base) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            if target.split('.')[0] != package_root.name:
                continue
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                sub = f'{target}.{alias.name}'
                yield sub if sub in modules else target


def unit(module: str) -> str:
    """The layer unit of a module: ``models.<file>``, a folder, or a top-level file."""
    parts = module.split('.')[1:]
    if not parts:
        return '__init__'
    if parts[0] == 'models' and len(parts) > 1:
        return f'models.{parts[1]}'
    return parts[0]


def unit_graph(package_root: Path) -> Dict[str, Set[Tuple[str, str]]]:
    """unit -> {(imported unit, 'file -> module')} for imports between different units."""
    graph: Dict[str, Set[Tuple[str, str]]] = {}
    for path in sorted(package_root.rglob('*.py')):
        src = unit(module_name(path, package_root))
        graph.setdefault(src, set())
        for target in imported_modules(path, package_root):
            dst = unit(target)
            if dst != src and not (src == '__init__' or target == package_root.name):
                graph[src].add((dst, f'{path.relative_to(package_root.parent)} -> {target}'))
    return graph


def find_cycles(graph: Dict[str, Set[Tuple[str, str]]]) -> List[List[str]]:
    """Strongly connected components with more than one unit (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def layer_violations(package_root: Path) -> List[str]:
    """Every cycle and every upward import, as readable lines."""
    graph = unit_graph(package_root)
    problems = []
    for comp in find_cycles(graph):
        edges = sorted(why for u in comp for (w, why) in graph[u] if w in comp)
        problems.append(f'cycle between {comp}: ' + '; '.join(edges))
    for src, edges in graph.items():
        for dst, why in sorted(edges):
            if dst == 'cli':
                problems.append(f'the package imports the command-line module: {why}')
            for low_layer, high_layer in FORBIDDEN:
                if src.split('.')[0] == low_layer and dst.split('.')[0] == high_layer:
                    problems.append(f'{low_layer}/ imports {high_layer}/: {why}')
    return problems


def test_the_package_imports_downward_only():
    assert layer_violations(PACKAGE) == []


def test_the_walk_sees_cycles_upward_imports_and_imports_inside_functions(tmp_path):
    """The checker itself can fail: a crafted package with each kind of violation."""
    pkg = tmp_path / 'mlla_mm'
    for folder in ('models', 'engine', 'datasets'):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / '__init__.py').write_text('')
    (pkg / '__init__.py').write_text('')
    (pkg / 'models' / 'a.py').write_text('from . import b\n')
    (pkg / 'models' / 'b.py').write_text('def f():\n    from .a import x\n')
    (pkg / 'datasets' / 'checks.py').write_text('from ..engine.launch import UsageError\n')
    (pkg / 'engine' / 'launch.py').write_text('import mlla_mm.datasets.checks\n')
    (pkg / 'engine' / 'hooks.py').write_text('from mlla_mm.cli import one_line\n')
    problems = layer_violations(pkg)
    text = '\n'.join(problems)
    assert "cycle between ['models.a', 'models.b']" in text
    assert "cycle between ['datasets', 'engine']" in text
    assert 'datasets/ imports engine/: mlla_mm/datasets/checks.py -> mlla_mm.engine.launch' in text
    assert 'the package imports the command-line module: mlla_mm/engine/hooks.py -> mlla_mm.cli' in text


#: Run in a fresh interpreter: every warnings filter installed while ``import mlla_mm`` runs, by the file that
#: installed it; the package's own files may install none, and the command-line module must stay unloaded.
IMPORT_PROBE = """
import sys, warnings
callers = []

def spy(original):
    def install(*args, **kwargs):
        callers.append(sys._getframe(1).f_code.co_filename)
        return original(*args, **kwargs)
    return install

warnings.filterwarnings = spy(warnings.filterwarnings)
warnings.simplefilter = spy(warnings.simplefilter)
import mlla_mm
ours = sorted({c for c in callers if '/mlla_mm/' in c.replace(chr(92), '/')})
assert not ours, f'import mlla_mm installed warnings filters from {ours}'
assert 'mlla_mm.cli' not in sys.modules, 'import mlla_mm imported mlla_mm.cli'
"""


def import_problems(root: Path) -> str:
    """What ``import mlla_mm`` from the checkout at ``root`` does that only a tool may do ('' when nothing)."""
    result = subprocess.run([sys.executable, '-c', IMPORT_PROBE], cwd=root, capture_output=True, text=True,
                            env={**os.environ, 'PYTHONWARNINGS': '', 'PYTHONPATH': str(root)}, timeout=120)
    return '' if result.returncode == 0 else result.stderr[-2000:]


def test_importing_the_package_loads_no_command_line_code():
    """``custom_imports=['mlla_mm']`` must not install warnings filters or load the command-line module."""
    assert import_problems(ROOT) == ''
