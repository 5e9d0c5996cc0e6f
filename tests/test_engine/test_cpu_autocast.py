"""CPUAutocastOptimWrapper: bf16 in the backbone, neck and heads, float32 between them and for mmcv's ops."""
import torch
import torch.nn as nn

from mlla_mm.engine import CPUAutocastOptimWrapper


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(8, 8)
        self.neck = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.seen = {}

    def forward(self, x):
        feat = self.neck(self.backbone(x))
        self.seen['feat'] = feat.dtype
        out = self.head(feat)
        self.seen['head'] = out.dtype
        return out


def test_backbone_runs_in_bf16_and_heads_in_fp32():
    model = Toy()
    captured = {}
    model.backbone.register_forward_hook(lambda m, a, out: captured.update(backbone_raw=out.dtype))
    wrapper = CPUAutocastOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(4, 8)
    with wrapper.optim_context(model):
        loss = model(x).pow(2).mean()
    assert captured['backbone_raw'] == torch.bfloat16
    assert model.seen['feat'] == torch.float32 and model.seen['head'] == torch.float32
    before = model.backbone.weight.clone()
    wrapper.update_params(loss)
    assert torch.isfinite(model.backbone.weight).all() and not torch.equal(before, model.backbone.weight)
    # Outside the context nothing is autocast.
    captured.clear()
    model(x)
    assert captured['backbone_raw'] == torch.float32


def test_bad_dtype_is_rejected():
    import pytest
    with pytest.raises(ValueError, match='bfloat16'):
        CPUAutocastOptimWrapper(optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), dtype='int8')


class ToyDetector(nn.Module):
    """The layout of mmdet's two-stage detectors and mmseg's decode heads, in miniature."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(8, 8)
        self.rpn_head = nn.Linear(8, 8)
        self.roi_head = nn.Module()
        self.roi_head.bbox_roi_extractor = nn.Identity()  # mmcv's float32-only ops live here
        self.roi_head.bbox_head = nn.Linear(8, 8)
        self.decode_head = DecodeHead()
        self.seen = {}

    def forward(self, x):
        feat = self.backbone(x)
        self.seen['rpn'] = self.rpn_head(feat).dtype
        rois = self.roi_head.bbox_roi_extractor(feat)
        self.seen['extractor_in'] = rois.dtype
        self.seen['bbox'] = self.roi_head.bbox_head(rois).dtype
        return self.decode_head.loss(feat)


class DecodeHead(nn.Module):
    """Like mmseg's BaseDecodeHead: ``loss`` calls ``self.forward`` directly, not through ``__call__``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Linear(8, 8)
        self.conv_seg = nn.Linear(8, 1)
        self.inner = []

    def forward(self, x):
        y = self.conv(x)
        self.inner.append(torch.is_autocast_enabled('cpu'))
        return self.conv_seg(y)

    def loss(self, x):
        return self.forward(x).pow(2).mean()


def test_heads_run_in_bf16_and_hand_on_float32():
    model = ToyDetector()
    raw = {}
    for name in ('rpn_head', 'roi_head.bbox_head', 'decode_head.conv'):
        model.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: raw.update({name: out.dtype}))
    wrapper = CPUAutocastOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with wrapper.optim_context(model):
        loss = model(torch.randn(4, 8))
    # Computed in bf16 inside, float32 outside; mmcv's ops (the extractor) see float32.
    assert raw == {'rpn_head': torch.bfloat16, 'roi_head.bbox_head': torch.bfloat16, 'decode_head.conv': torch.bfloat16}
    assert model.seen == {'rpn': torch.float32, 'extractor_in': torch.float32, 'bbox': torch.float32}
    assert loss.dtype == torch.float32
    assert model.decode_head.inner == [False]  # the decode head's children, not its forward, are autocast
    assert len(wrapper.autocast_modules(model)) == 5  # backbone, rpn_head, bbox_head, conv, conv_seg


def test_bad_module_names_are_rejected():
    import pytest
    with pytest.raises(ValueError, match='modules'):
        CPUAutocastOptimWrapper(optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), modules='backbone')
