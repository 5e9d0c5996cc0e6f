"""The README's backbone-swap snippets build MLLA through mmdet's and mmseg's registries."""
import re
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import ROOT


def readme_example(name):
    text = (ROOT / 'README.md').read_text()
    blocks = re.findall(r'```python\n(.*?)```', text, flags=re.S)
    found = [b for b in blocks if b.startswith(f'# swap-example: {name}\n')]
    assert len(found) == 1, f'README must hold exactly one "swap-example: {name}" block'
    return found[0]


BUILD = textwrap.dedent('''
    import sys, torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(sys.argv[1])
    init_default_scope(sys.argv[2])
    if sys.argv[2] == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    model = MODELS.build(cfg.model)
    from mlla_mm.models import MLLA
    assert type(model.backbone) is MLLA, type(model.backbone)
    feats = model.extract_feat(torch.randn(1, 3, 64, 96))
    print('OK', type(model).__name__, [tuple(f.shape) for f in feats])
''')


@pytest.mark.parametrize('scope,head', [('mmdet', 'MaskRCNN'), ('mmseg', 'EncoderDecoder')])
@pytest.mark.parametrize('default_scope', ['own', 'other'])
def test_swap_example_builds_anywhere(tmp_path, scope, head, default_scope):
    cfg = tmp_path / 'elsewhere' / 'my_config.py'
    cfg.parent.mkdir()
    cfg.write_text(readme_example(scope))
    (tmp_path / 'build.py').write_text(BUILD)
    if default_scope == 'other':
        # The type also resolves when another scope (mmengine's) is the default.
        (tmp_path / 'build.py').write_text(BUILD.replace(
            'init_default_scope(sys.argv[2])',
            'init_default_scope("mmengine"); from mmengine.registry import MODELS as ROOT_MODELS; '
            'ROOT_MODELS.build(cfg.model.backbone); init_default_scope(sys.argv[2])'))
    res = subprocess.run([sys.executable, str(tmp_path / 'build.py'), str(cfg), scope], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith('OK')][-1]
    assert head in line
    if scope == 'mmdet':  # FPN outputs at 256 channels, 5 levels
        assert line.count('(1, 256,') == 5
    else:  # raw backbone maps
        assert '(1, 64, 16, 24)' in line and '(1, 512, 2, 3)' in line


def test_scoped_type_name_builds():
    import mlla_mm  # noqa: F401
    from mmengine.registry import MODELS
    from mlla_mm.models import MLLA
    model = MODELS.build(dict(type='mlla_mm.MLLA', arch=dict(embed_dims=16, depths=[1, 1, 1, 1],
                                                               num_heads=[1, 1, 2, 2])))
    assert isinstance(model, MLLA)
    with pytest.raises(TypeError, match='drop_path'):
        MODELS.build(dict(type='MLLA', arch='tiny', drop_path=0.3))
