"""setup.cfg's requirements agree with what tools/setup_env.sh installs, and ruff is pinned for `make lint`."""
import configparser
import re

from packaging.requirements import Requirement

from tests.helpers import ROOT

#: setup.cfg name -> the version variable of tools/setup_env.sh
PINNED = {'torch': 'TORCH_VERSION', 'torchvision': 'TORCHVISION_VERSION', 'mmengine': 'MMENGINE_VERSION',
          'timm': 'TIMM_VERSION', 'mmcv': 'MMCV_VERSION', 'mmdet': 'MMDET_VERSION',
          'mmsegmentation': 'MMSEG_VERSION', 'onnx': 'ONNX_VERSION', 'onnxruntime': 'ONNXRUNTIME_VERSION'}


def _requirements():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / 'setup.cfg')
    lines = cfg['options']['install_requires'].splitlines()
    for extra in cfg['options.extras_require'].values():
        lines += extra.splitlines()
    return [Requirement(line) for line in lines if line.strip()]


def test_every_version_setup_env_installs_meets_setup_cfg():
    script = (ROOT / 'tools' / 'setup_env.sh').read_text()
    pins = dict(re.findall(r'^([A-Z_]+_VERSION)=(\S+)$', script, re.M))
    checked = set()
    for req in _requirements():
        if req.name in PINNED:
            version = pins[PINNED[req.name]]
            assert req.specifier.contains(version), f'setup.cfg {req} but tools/setup_env.sh installs {version}'
            checked.add(req.name)
    assert checked == set(PINNED)


def test_the_floors_the_code_needs():
    """timm.layers.get_device_dtype came with timm 1.0.29, torch.serialization.safe_globals with torch 2.5."""
    reqs = {r.name: r for r in _requirements()}
    assert not reqs['timm'].specifier.contains('1.0.28') and reqs['timm'].specifier.contains('1.0.29')
    assert not reqs['torch'].specifier.contains('2.4.1') and reqs['torch'].specifier.contains('2.5.0')


def test_ruff_is_pinned_and_make_lint_runs_it():
    ruff = [r for r in _requirements() if r.name == 'ruff']
    assert len(ruff) == 1 and str(ruff[0].specifier).startswith('==')
    makefile = (ROOT / 'Makefile').read_text()
    assert re.search(r'^lint: setup\n\t\$\(PY\) -m ruff check \.$', makefile, re.M)
    assert re.search(r'^test: setup \$\(TEST_LINT\)$', makefile, re.M)
    assert '[tool.ruff]' in (ROOT / 'pyproject.toml').read_text()
