"""CPUAutocastOptimWrapper: bf16 in the backbone and neck, float32 for the heads."""
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
