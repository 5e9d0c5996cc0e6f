"""Every command and snippet of README.md and docs/*.md, checked or run as written (issue 30, item 3).

The fenced blocks of the pages are read as they are:

- ```` ```bash ````: every command is checked: a ``python tools/X.py`` command's tool exists and every
  ``--option`` it uses is one the tool accepts (its ``--help``), the repository paths it names exist,
  ``make`` targets are in the Makefile, shell tools exist and are executable. The fast ones run: the
  classifier on a stand-in of the published weights, and every command naming the published weights
  without them, which must stop with the one line saying where to get them and where to put them.
- ```` ```python ````: run as a script in a fresh folder, with a stand-in of the published weights where
  the snippet names them (``data/pretrained/MLLA_T.pth`` holds a randomly initialised MLLA-T classifier
  in the published layout) and without it, where it must end in that one line. A marker comment on the
  line before the block says when a block is something else:
  ``<!-- config: FOLDER -->`` a config file that lives in FOLDER (loaded, its model and optimizer built),
  ``<!-- imports-only: why -->`` only its imports run (it needs files a user makes first),
  ``<!-- excerpt: FILE -->`` an excerpt of the config FILE (every name it sets is set there),
  ``<!-- not-run: why -->`` not checked.
- ```` ```text ````: output, layouts, records: not run.
"""
from __future__ import annotations

import ast
import functools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

from tests.helpers import ROOT

PAGES = [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))
FENCE = re.compile(r'^```([^\n`]*)\n(.*?)^```[ \t]*$', re.S | re.M)
MARKER = re.compile(r'^<!--\s*([\w-]+)\s*:\s*(.*?)\s*-->$')
KINDS = {'config', 'imports-only', 'excerpt', 'not-run'}
WEIGHTS = re.compile(r'data/pretrained/(MLLA_[TSB])\.pth')
MESSAGE = ('{path}: not found; the published weights are not downloaded: get {name} from '
           'https://github.com/LeapLabTHU/MLLA (README, Pretrained Models) and put it at {path}')
TIMEOUT = 600


@dataclass
class Block:
    """One fenced block of a page."""

    page: Path
    line: int
    lang: str
    text: str
    marker: Optional[Tuple[str, str]]

    @property
    def where(self) -> str:
        return f'{self.page.relative_to(ROOT)}:{self.line}'


def read_blocks() -> List[Block]:
    """Every fenced block of README.md and docs/*.md with the marker comment on the line before it."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            before = text[:m.start()].rstrip('\n').rsplit('\n', 1)[-1].strip()
            marker = MARKER.match(before)
            found.append(Block(page, text[:m.start()].count('\n') + 1, m.group(1).strip(), m.group(2),
                               (marker.group(1), marker.group(2)) if marker else None))
    return found


BLOCKS = read_blocks()


def runnable(lang: str, kinds=(None, )) -> List[Block]:
    return [b for b in BLOCKS if b.lang == lang and (b.marker[0] if b.marker else None) in kinds]


def commands(block: Block) -> Iterator[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    for line in re.sub(r'\\\n\s*', ' ', block.text).splitlines():
        line = re.split(r'(?:^|\s)#', line.strip(), maxsplit=1)[0].strip()
        if line:
            yield line


COMMANDS = [(b, c) for b in runnable('bash') for c in commands(b)]


def argv_of(command: str) -> List[str]:
    """The words of ``command`` without environment assignments and ``time``."""
    words = shlex.split(command)
    while words and (re.match(r'^[A-Z_][A-Z0-9_]*=', words[0]) or words[0] == 'time'):
        words = words[1:]
    return words


@functools.lru_cache(maxsize=None)
def tool_help(tool: str) -> str:
    """``python TOOL --help``: in this process through the tool's ``parse_args(argv)`` where it has one."""
    import contextlib
    import importlib.util
    import inspect
    import io
    spec = importlib.util.spec_from_file_location(f'docs_tool_{Path(tool).stem}', ROOT / tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parse = getattr(module, 'parse_args', None)
    if parse is not None and 'argv' in inspect.signature(parse).parameters:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            parse(['--help'])
        assert exit_info.value.code in (0, None), f'{tool} --help failed'
        return out.getvalue()
    res = subprocess.run([sys.executable, str(ROOT / tool), '--help'], cwd=ROOT, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert res.returncode == 0, f'{tool} --help failed: {res.stderr[-2000:]}'
    return res.stdout


def make_targets() -> set:
    return set(re.findall(r'^([\w-]+):', (ROOT / 'Makefile').read_text(), flags=re.M))


def repo_paths(words: List[str]) -> List[str]:
    """Words naming files of the repository (configs/..., tools/...); the user's own copies (my_*) left out."""
    return [w.strip('[]') for w in words
            if w.strip('[]').startswith(('configs/', 'tools/')) and not Path(w).name.startswith('my_')]


# ---------------------------------------------------------------------------------------------------------
# The pages themselves
# ---------------------------------------------------------------------------------------------------------
def test_every_block_says_what_it_is():
    problems = []
    for b in BLOCKS:
        if b.lang not in ('bash', 'python', 'text'):
            problems.append(f'{b.where}: fenced block without a language (bash, python or text): {b.lang!r}')
        if b.marker and (b.marker[0] not in KINDS or not b.marker[1]):
            problems.append(f'{b.where}: marker {b.marker} (expected one of {sorted(KINDS)} with a reason or path)')
    assert not problems, '\n'.join(problems)
    assert len(COMMANDS) > 20 and len(runnable('python')) >= 4  # the parser found the pages' blocks


def test_one_convention_for_commands():
    """The venv is activated once, after the two commands; then plain ``python`` everywhere."""
    for page in PAGES:
        assert '.venv/bin/python' not in page.read_text(), f'{page.name}: use plain python (venv activated)'
    readme = [b for b in BLOCKS if b.page.name == 'README.md' and b.lang == 'bash']
    two = next(i for i, b in enumerate(readme) if 'make demo' in b.text and 'make test' in b.text)
    activate = [i for i, b in enumerate(readme) if 'source .venv/bin/activate' in b.text]
    assert activate == [two + 1], 'README: "source .venv/bin/activate" once, right after the two commands'
    assert 'VENV="$ROOT/.venv"' in (ROOT / 'tools' / 'setup_env.sh').read_text()  # what the set-up makes


def test_readme_is_a_front_door():
    text = (ROOT / 'README.md').read_text()
    assert len(text.splitlines()) <= 250
    linked = set(re.findall(r'\]\((docs/[\w.]+\.md)', text))
    pages = {f'docs/{p.name}' for p in (ROOT / 'docs').glob('*.md')}
    assert pages <= linked, f'pages missing from the README: {sorted(pages - linked)}'
    for link in re.findall(r'\]\(((?:docs/)?[\w/.]+\.md)', text):
        assert (ROOT / link).is_file(), link


def test_figures_are_the_measured_ones():
    """The demo-seg figure measured for issue 30 (AMD EPYC Zen 4), not the older one; goals as the tool's."""
    readme, seg = (ROOT / 'README.md').read_text(), (ROOT / 'docs' / 'segmentation.md').read_text()
    for text in (readme, seg):
        assert '9 min 26 s' in text and '37.43' in text and 'Zen 4' in text
    assert '12 min 48 s' not in readme and '37.17' not in readme
    bench = (ROOT / 'docs' / 'benchmarks.md').read_text()
    current = bench[:bench.index('## Appendix A')]
    tree = ast.parse((ROOT / 'tools' / 'benchmark.py').read_text())
    targets = [n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
               and any(getattr(t, 'id', None) == 'TARGETS' for t in n.targets)]
    row = next(ln for ln in current.splitlines() if ln.startswith('| Mask R-CNN train iteration MLLA-T / Swin-T'))
    if targets:  # the goal the docs state is the tool's
        goal = ast.literal_eval(next(k.value for k in targets[0].keywords if k.arg == 'train_ratio'))
        assert f'<= {goal}' in row, (row, goal)
    else:  # the tool states no goals any more, so neither may the docs
        assert "the tool's goal" not in current


# ---------------------------------------------------------------------------------------------------------
# bash blocks
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('block, command', COMMANDS, ids=[f'{b.where}:{c[:50]}' for b, c in COMMANDS])
def test_command_is_what_the_repository_has(block, command):
    words = argv_of(command)
    head = words[0]
    if head == 'make':
        assert set(words[1:]) <= make_targets(), f'{block.where}: {command}: no such make target'
    elif head == 'source':
        assert words[1] == '.venv/bin/activate', command
    elif head == 'pip':
        assert words[1:] == ['install', '-e', '.'] and (ROOT / 'setup.cfg').is_file(), command
    elif head == 'cp':
        assert (ROOT / words[1]).is_file(), f'{block.where}: {words[1]} does not exist'
    elif head.startswith('tools/') and head.endswith('.sh'):
        assert os.access(ROOT / head, os.X_OK), f'{block.where}: {head} missing or not executable'
    elif head == 'python':
        tool = words[1]
        assert tool.startswith('tools/') and (ROOT / tool).is_file(), f'{block.where}: {tool} does not exist'
        usage = tool_help(tool)
        for word in words[2:]:
            option = word.strip('[]').split('=')[0]
            if option.startswith('--'):
                assert re.search(rf'(?<![\w-]){re.escape(option)}(?![\w-])', usage), \
                    f'{block.where}: {tool} has no option {option}'
    else:
        pytest.fail(f'{block.where}: a command this test does not know: {command}')
    for path in repo_paths(words[1:]):
        assert (ROOT / path).exists(), f'{block.where}: {path} does not exist'


def weights_commands() -> List[Tuple[Block, str]]:
    """bash commands of the tools that read the published weights file, as the pages give them."""
    return [(b, c) for b, c in COMMANDS if WEIGHTS.search(c) and argv_of(c)[:2] in
            (['python', 'tools/classify.py'], ['python', 'tools/export_onnx.py'])]


def without_optional(words: List[str]) -> List[str]:
    """``words`` without the optional parts the pages write in brackets (``[--model mlla_tiny]``)."""
    kept, depth = [], 0
    for w in words:
        depth += w.count('[')
        if depth == 0:
            kept.append(w)
        depth -= w.count(']')
    return kept


def run_here(words: List[str], cwd: Path) -> subprocess.CompletedProcess:
    """``words`` (a ``python tools/...`` command) run in ``cwd`` with this interpreter and the repo's tool."""
    words = without_optional(words)
    argv = [sys.executable, str(ROOT / words[1])] + words[2:]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.parametrize('block, command', weights_commands(),
                         ids=[f'{b.where}:{c[:50]}' for b, c in weights_commands()])
def test_command_without_the_published_weights_says_where_to_get_them(block, command, tmp_path):
    res = run_here(argv_of(command), tmp_path)
    path, name = WEIGHTS.search(command).group(0), WEIGHTS.search(command).group(1) + '.pth'
    assert res.returncode == 2, res.stderr[-3000:]
    option = '--weights ' if '--weights' in command else ''  # classify.py names its option; export_onnx's is positional
    assert res.stderr.strip().splitlines()[-1] == 'error: ' + option + MESSAGE.format(path=path, name=name)
    assert 'Traceback' not in res.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.fixture(scope='module')
def stand_in(tmp_path_factory) -> Path:
    """A randomly initialised MLLA-T classifier saved in the published layout (``{'model': state_dict}``)."""
    import timm
    import torch

    import mlla_mm  # noqa: F401
    path = tmp_path_factory.mktemp('weights') / 'MLLA_T.pth'
    torch.save({'model': timm.create_model('mlla_tiny').state_dict()}, path)
    return path


def folder(tmp_path: Path, weights: Optional[Path]) -> Path:
    """A fresh working folder with a picture ``cat.jpg`` and, given ``weights``, ``data/pretrained/MLLA_T.pth``."""
    import cv2
    import numpy as np
    cwd = tmp_path / ('with' if weights else 'without')
    cwd.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(cwd / 'cat.jpg'), rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
    if weights:
        (cwd / 'data' / 'pretrained').mkdir(parents=True)
        os.symlink(weights, cwd / 'data' / 'pretrained' / 'MLLA_T.pth')
    return cwd


def classify_commands() -> List[Tuple[Block, str]]:
    return [(b, c) for b, c in weights_commands() if argv_of(c)[1] == 'tools/classify.py' and '--data-dir' not in c]


@pytest.mark.slow  # a fresh interpreter that builds a whole model (10-40 s on 2 busy cores)
@pytest.mark.parametrize('block, command', classify_commands(),
                         ids=[f'{b.where}:{c[:50]}' for b, c in classify_commands()])
def test_classify_command_runs_with_a_stand_in_of_the_weights(block, command, stand_in, tmp_path):
    words = without_optional(argv_of(command))
    cwd = folder(tmp_path, stand_in)
    for word in words:  # other pictures the command names
        if word.endswith(('.jpg', '.png')) and not (cwd / word).exists():
            os.link(cwd / 'cat.jpg', cwd / word)
    res = run_here(words, cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'cat.jpg' in res.stdout
    if '--show-dir' in words:
        show = cwd / words[words.index('--show-dir') + 1]
        assert [p.suffix for p in show.iterdir()] == ['.png'], list(show.iterdir())  # the picture with its top-5


# ---------------------------------------------------------------------------------------------------------
# python blocks
# ---------------------------------------------------------------------------------------------------------
SCRIPTS = [b for b in runnable('python') if not b.text.startswith('# swap-example:')]


def test_swap_examples_are_tested_where_they_are_read():
    swaps = [b for b in runnable('python') if b.text.startswith('# swap-example:')]
    assert len(swaps) == 2 and (ROOT / 'tests' / 'test_registry' / 'test_swap_examples.py').is_file()


def run_script(text: str, cwd: Path) -> subprocess.CompletedProcess:
    (cwd / 'snippet.py').write_text(text)
    return subprocess.run([sys.executable, 'snippet.py'], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.slow  # a fresh interpreter that builds a whole model (10-40 s on 2 busy cores)
@pytest.mark.parametrize('block', SCRIPTS, ids=[b.where for b in SCRIPTS])
def test_python_snippet_runs_as_written(block, stand_in, tmp_path):
    names_weights = WEIGHTS.search(block.text)
    res = run_script(block.text, folder(tmp_path, stand_in if names_weights else None))
    assert res.returncode == 0, f'{block.where}:\n{res.stderr[-3000:]}'
    if names_weights:  # without the file: the one message, as the last line of the traceback
        res = run_script(block.text, folder(tmp_path, None))
        assert res.returncode == 1
        last = res.stderr.strip().splitlines()[-1]
        path = names_weights.group(0)
        assert last.endswith(': ' + MESSAGE.format(path=path, name=names_weights.group(1) + '.pth')), last
        assert last.startswith('mlla_mm.models.timm_mlla.MissingWeightsError'), last


IMPORTS_ONLY = runnable('python', ('imports-only', ))


@pytest.mark.parametrize('block', IMPORTS_ONLY, ids=[b.where for b in IMPORTS_ONLY])
def test_imports_of_a_snippet_that_needs_files_first(block, tmp_path):
    tree = ast.parse(block.text)
    imports = [ast.get_source_segment(block.text, n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports, f'{block.where}: nothing to import'
    res = run_script('\n'.join(imports) + '\n', tmp_path)
    assert res.returncode == 0, f'{block.where}:\n{res.stderr[-3000:]}'


EXCERPTS = runnable('python', ('excerpt', ))


@pytest.mark.parametrize('block', EXCERPTS, ids=[b.where for b in EXCERPTS])
def test_config_excerpt_sets_what_the_config_sets(block):
    def assigned(text: str) -> set:
        return {t.id for n in ast.parse(text).body if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Name)}
    source = ROOT / block.marker[1]
    names = assigned(block.text)
    assert names and names <= assigned(source.read_text()), (block.where, names - assigned(source.read_text()))


CONFIGS = runnable('python', ('config', ))
BUILD = '''
import sys
from mmengine.config import Config
from mmengine.registry import init_default_scope
cfg = Config.fromfile(sys.argv[1])
scope = cfg.get('default_scope', 'mmengine')
init_default_scope(scope)
MODELS = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
model = MODELS.build(cfg.model)
print('model', type(model).__name__, type(model.backbone).__name__)
if 'constructor' in cfg.optim_wrapper:
    from mmengine.optim import build_optim_wrapper
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    lrs = sorted({g['lr'] for g in wrapper.optimizer.param_groups})
    print('optimizer', type(wrapper.optimizer).__name__, 'groups', len(wrapper.optimizer.param_groups),
          'lr', lrs[0], lrs[-1])
'''


@pytest.mark.slow  # a fresh interpreter that builds a whole model (10-40 s on 2 busy cores)
@pytest.mark.parametrize('block', CONFIGS, ids=[b.where for b in CONFIGS])
def test_config_snippet_loads_and_builds(block, tmp_path):
    """The config written into (a mirror of) its folder, loaded, its model and optimizer built."""
    mirror = tmp_path / 'configs'
    mirror.mkdir()
    for sub in (ROOT / 'configs').iterdir():
        if sub.is_dir():
            (mirror / sub.name).mkdir()
            for f in sub.iterdir():
                os.symlink(f, mirror / sub.name / f.name)
    home = mirror / Path(block.marker[1]).relative_to('configs')
    assert home.is_dir(), block.marker
    (home / 'snippet_config.py').write_text(block.text)
    (tmp_path / 'build.py').write_text(BUILD)
    res = subprocess.run([sys.executable, 'build.py', str(home / 'snippet_config.py')], cwd=tmp_path,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, f'{block.where}:\n{res.stderr[-3000:]}'
    out = res.stdout + res.stderr
    if 'MLLALayerDecayOptimizerConstructor' in block.text:  # the decay applied: lrs from 2e-4 * 0.9 ** 17 up
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith('optimizer'))
        low, high = (float(v) for v in line.split()[-2:])
        assert high == pytest.approx(2e-4) and low == pytest.approx(2e-4 * 0.9 ** 19), line
    if WEIGHTS.search(block.text):  # no weights here: the MLLA configs' warning, and the run goes on
        assert 'not found' in out and 'RANDOMLY initialised' in out, out[-3000:]
