"""The inference path band by band of rows (small temporaries at high resolution) against the reference.

``fast_inference`` splits every block, and the stem and downsample layers,
into bands of rows so that no temporary is a full high-resolution map. The
bands must not change the numbers: here they are forced to a few rows on
small, odd shapes (bands that do not divide the height, one-row last bands,
stride-2 convolutions) and compared with the independent reference.
"""
import pytest
import torch
import torch.nn as nn

import mlla_mm.models.mlla as mlla_module
from mlla_mm.models import fast_inference
from tests.helpers import small_backbone_pair
from tests.test_models.mlla_reference import RefMLLABlock


ATOL, RTOL = 2e-5, 1e-4


def make_pair(dim, heads, seed=0):
    torch.manual_seed(seed)
    block = mlla_module.MLLABlock(dim, heads).eval()
    ref = RefMLLABlock(dim, heads).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ref.load_state_dict(block.state_dict(), strict=True)
    return block, ref


@pytest.mark.parametrize('rows', [2, 3, 5])
@pytest.mark.parametrize('shape', [(2, 9, 13, 16, 4), (1, 11, 6, 32, 8), (1, 7, 4, 24, 3)])
def test_banded_block_matches_reference(shape, rows):
    b, h, w, c, heads = shape
    block, ref = make_pair(c, heads)
    x = torch.randn(b, h, w, c)
    x_before = x.clone()
    rope = torch.complex(*mlla_module.rope_cos_sin(h, w, c, x.device))
    with torch.no_grad():
        want = ref(x.reshape(b, h * w, c), h, w).reshape(b, h, w, c)
        got = fast_inference.block_forward(block, x, rope, rows=rows)
        whole = fast_inference.block_forward(block, x, rope, rows=h)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got, whole, atol=ATOL, rtol=RTOL)
    assert torch.equal(x, x_before), 'a block must not modify its input'


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('kernel', [1, 3])
def test_conv_rows_equals_the_rows_of_the_full_convolution(kernel, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, kernel, stride, padding=kernel // 2, groups=3)
    x = torch.randn(2, 10, 7, 6)  # (B, H, W, C); H even for stride 2
    full = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    h_out = full.shape[1]
    with torch.no_grad():
        for o0 in range(h_out):
            for o1 in range(o0 + 1, h_out + 1):
                got = fast_inference.conv_rows(conv, x, o0, o1)
                torch.testing.assert_close(got, full[:, o0:o1], atol=1e-6, rtol=1e-5, msg=f'rows {o0}:{o1}')


def test_conv_rows_rejects_other_kernels():
    with pytest.raises(ValueError, match='not supported'):
        fast_inference.conv_rows(nn.Conv2d(4, 4, 5, padding=2), torch.zeros(1, 6, 6, 4), 0, 2)


def test_banded_backbone_matches_reference(monkeypatch):
    """Every stage, the stem and the downsample layers in bands of a few rows (a tiny band budget)."""
    model, ref = small_backbone_pair()
    model.eval(), ref.eval()
    x = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        want = ref(x)
        monkeypatch.setattr(fast_inference, 'WHOLE_MAP_BYTES', 0)  # bands everywhere,
        monkeypatch.setattr(fast_inference, 'WIDE_MAP_BYTES', 0)
        monkeypatch.setattr(fast_inference, 'BAND_BYTES', 1)  # of 2 rows
        got = model(x)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('malloc', ['tuned', 'default', None])
def test_band_size_depends_on_the_map_only(malloc, monkeypatch):
    """Whole maps up to 2048x2048, bands of BAND_BYTES for larger maps: the same whether or not malloc was tuned
    (MLLA-T, fp32: stage 0 has 64 channels, the first downsample's hidden map 512, the stem's half map 32)."""
    from mlla_mm.utils import malloc as malloc_module
    monkeypatch.setattr(malloc_module, '_state', malloc)
    fi = fast_inference
    for h, w in ((800, 1280), (1024, 1024), (2048, 2048)):  # every map whole
        assert fi.band_rows(h // 4, w // 4 * 64 * 4) == h // 4  # a block of stage 0
        assert fi.band_rows(h // 4, w // 4 * 512 * 4, 2 * fi.BAND_BYTES, fi.WIDE_MAP_BYTES) == h // 4  # downsample 0
        assert fi.band_rows(h // 2, w // 2 * 32 * 4, 2 * fi.BAND_BYTES, fi.WIDE_MAP_BYTES) == h // 2  # the stem
    row = 1024 * 64 * 4  # 4096x4096: bands of BAND_BYTES (2 * BAND_BYTES for the wide maps)
    assert fi.band_rows(1024, row) == fi.BAND_BYTES // row
    assert fi.band_rows(1024, 8 * row, 2 * fi.BAND_BYTES, fi.WIDE_MAP_BYTES) == 2 * fi.BAND_BYTES // (8 * row)
    assert fi.band_rows(4000, 1 << 30) == 2  # never fewer than 2 rows
    assert fi.mlp_chunk(1000, 2048 * 4) == fi.MLP_CHUNK  # 8 MB of hidden activations
    assert fi.mlp_chunk(10 ** 6, 1 << 16) == 256  # 256 MiB for 4096 tokens: chunks of BAND_BYTES, at least 256
