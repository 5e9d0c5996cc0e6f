"""The switch of the fast inference path: decided once per model, MLLA_MM_FAST_INFERENCE=0|1, set_fast_inference."""
import pytest
import timm
import torch

import mlla_mm  # noqa: F401  (registers the timm models)
from mlla_mm.models import MLLA, fast_inference
from mlla_mm.models.ops import FAST_INFERENCE_ENV, fast_inference_default, set_fast_inference

TINY = dict(embed_dims=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])
FAST_PARTS = ('forward_blocks', 'stem_forward', 'downsample_forward')


def switches(model):
    """The ``fast_inference`` attribute of every module that has it."""
    return [m.fast_inference for m in model.modules() if hasattr(m, 'fast_inference')]


@pytest.fixture
def taken(monkeypatch):
    """The fast-path entry points run, by name."""
    seen = []
    for name in FAST_PARTS:
        real = getattr(fast_inference, name)
        monkeypatch.setattr(fast_inference, name, lambda *a, real=real, name=name: seen.append(name) or real(*a))
    return seen


def run(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize('value, on', [(None, True), ('', True), ('1', True), (' 0 ', False), ('0', False)])
def test_the_environment_decides_when_a_model_is_built(value, on, monkeypatch, taken):
    if value is None:
        monkeypatch.delenv(FAST_INFERENCE_ENV, raising=False)
    else:
        monkeypatch.setenv(FAST_INFERENCE_ENV, value)
    assert fast_inference_default() is on
    torch.manual_seed(0)
    model = MLLA(TINY).eval()
    assert switches(model) == [on] * 8  # the stem, four stages, three downsample layers
    monkeypatch.setenv(FAST_INFERENCE_ENV, '1' if not on else '0')  # decided once: a built model keeps it
    run(model, torch.randn(1, 3, 40, 56))
    assert sorted(set(taken)) == (sorted(FAST_PARTS) if on else [])


@pytest.mark.parametrize('value', ['yes', 'true', '2', 'off'])
def test_an_invalid_value_is_a_clear_error(value, monkeypatch):
    monkeypatch.setenv(FAST_INFERENCE_ENV, value)
    for build in (lambda: MLLA(TINY), lambda: timm.create_model('mlla_tiny', embed_dim=8, depths=(1, 1, 1, 1),
                                                                num_heads=(1, 1, 2, 2))):
        with pytest.raises(ValueError, match=f"^{FAST_INFERENCE_ENV} must be 0 .* or 1 .*, got '{value}'$"):
            build()


def test_set_fast_inference_switches_one_built_model(taken):
    torch.manual_seed(1)
    model = MLLA(TINY).eval()
    other = MLLA(TINY).eval()
    x = torch.randn(2, 3, 37, 45)
    fast = run(model, x)
    assert sorted(set(taken)) == sorted(FAST_PARTS)
    taken.clear()
    assert model.set_fast_inference(False) is model
    assert switches(model) == [False] * 8 and switches(other) == [True] * 8
    plain = run(model, x)
    assert taken == []
    for a, b in zip(fast, plain):  # the two paths compute the same numbers
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    set_fast_inference(model, True)
    run(model, x)
    assert sorted(set(taken)) == sorted(FAST_PARTS)
    with pytest.raises(ValueError, match='enable must be True or False'):
        model.set_fast_inference('no')


def test_the_timm_model_has_the_same_switch(monkeypatch, taken):
    model = timm.create_model('mlla_tiny', embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)).eval()
    assert switches(model) == [True] * 8
    model.set_fast_inference(False)
    run(model, torch.randn(1, 3, 32, 32))
    assert taken == []
    monkeypatch.setenv(FAST_INFERENCE_ENV, '0')
    model = timm.create_model('mlla_tiny', embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)).eval()
    assert switches(model) == [False] * 8
