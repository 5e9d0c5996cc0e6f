"""``init_cfg`` of MLLA: mmengine's standard keys ``prefix`` and ``map_location`` keep their meaning."""
import pytest
import torch

from mlla_mm.checkpoint import CheckpointError
from mlla_mm.models import MLLA
from tests.helpers import TINY_ARCH


@pytest.fixture(scope='module')
def det_ckpt(golden_dir):
    """The published mmdet 2.x checkpoint of the golden model: every backbone key under ``backbone.``."""
    return torch.load(golden_dir / 'mlla_small_official_det.pth', weights_only=True)


def assert_golden(model, golden):
    case = next(iter(golden['cases'].values()))
    model.eval()
    with torch.no_grad():
        ys = model(case['x'])
    for y, r in zip(ys, case['ys']):
        torch.testing.assert_close(y, r, atol=1e-4, rtol=0)


def build(golden_arch, path, **cfg):
    model = MLLA(golden_arch, init_cfg=dict(type='Pretrained', checkpoint=str(path), **cfg))
    model.init_weights()
    return model


def test_prefix_takes_the_weights_under_it(tmp_path, det_ckpt, golden_arch, golden):
    """A whole model whose backbone sits under another name (e.g. a teacher-student file) loads with
    ``prefix``; the keys outside it are ignored, not reported as unexpected."""
    backbone = {k[len('backbone.'):]: v for k, v in det_ckpt['state_dict'].items()}
    sd = {'teacher.encoder.' + k: v for k, v in backbone.items()}
    sd.update({'student.encoder.' + k: torch.zeros_like(v) for k, v in backbone.items()})
    sd['teacher.decoder.weight'] = torch.ones(3)
    torch.save({'state_dict': sd}, tmp_path / 'whole.pth')
    assert_golden(build(golden_arch, tmp_path / 'whole.pth', prefix='teacher.encoder.'), golden)
    # Without the prefix the file is not an MLLA backbone checkpoint.
    with pytest.raises(CheckpointError, match='missing'):
        build(golden_arch, tmp_path / 'whole.pth')
    # The other prefix gives the other weights (all zero here): the prefix decides.
    student = build(golden_arch, tmp_path / 'whole.pth', prefix='student.encoder')  # '.' is added
    assert all(float(p.detach().abs().max()) == 0 for p in student.parameters())


def test_prefix_backbone_on_a_detector_checkpoint(tmp_path, det_ckpt, golden_arch, golden):
    sd = dict(det_ckpt['state_dict'])
    sd['neck.lateral_convs.0.conv.weight'] = torch.ones(4, 4, 1, 1)
    torch.save({'meta': {}, 'state_dict': sd}, tmp_path / 'det.pth')
    for prefix in ('backbone.', 'backbone'):
        assert_golden(build(golden_arch, tmp_path / 'det.pth', prefix=prefix), golden)


def test_prefix_that_matches_nothing_names_file_and_prefix(tmp_path, det_ckpt, golden_arch):
    torch.save(det_ckpt, tmp_path / 'det.pth')
    with pytest.raises(CheckpointError) as err:
        build(golden_arch, tmp_path / 'det.pth', prefix='model.backbone.')
    msg = str(err.value)
    assert str(tmp_path / 'det.pth') in msg and "'model.backbone.'" in msg and 'backbone.' in msg


def test_map_location_is_passed_to_torch_load(tmp_path, det_ckpt, golden_arch, golden):
    torch.save(det_ckpt, tmp_path / 'det.pth')
    seen = []

    def map_location(storage, location):
        seen.append(location)
        return storage

    assert_golden(build(golden_arch, tmp_path / 'det.pth', map_location=map_location), golden)
    assert seen and set(seen) == {'cpu'}
    assert_golden(build(golden_arch, tmp_path / 'det.pth', map_location=torch.device('cpu')), golden)


def test_unknown_init_cfg_key_lists_the_allowed_ones(tmp_path):
    model = MLLA(TINY_ARCH,
                 init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'x.pth'), prefixx='backbone.'))
    with pytest.raises(ValueError, match=r"prefixx.*prefix.*map_location"):
        model.init_weights()


def test_safetensors_file_is_recognised_by_its_header(tmp_path, det_ckpt, golden_arch, golden):
    """A safetensors file (here named .pth) loads through the same init_cfg; nothing in it can run."""
    from safetensors.torch import save_file
    path = tmp_path / 'det_weights.pth'
    save_file({k: v.contiguous() for k, v in det_ckpt['state_dict'].items()}, str(path))
    assert_golden(build(golden_arch, path, prefix='backbone.'), golden)
    assert_golden(build(golden_arch, path), golden)  # the detector layout is recognised as for .pth files
    # corrupt header: one clear error naming the file, as for a torch file
    data = bytearray(path.read_bytes())
    data[9:13] = b'\xff\xfe\xfd\xfc'
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match='safetensors file is truncated or corrupt: .*det_weights.pth'):
        build(golden_arch, path)
