"""Linear layers prepacked for oneDNN on CPU (kernels/linear.py): the same products as F.linear, chosen again
whenever the weights move, never copied or saved, and switched off where they cannot run. A packed model's
use of them: tests/test_packed.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import linear
from kernels.linear import Linear, prepack

needs_onednn = pytest.mark.skipif(not (linear._X86 and linear._onednn_ops()), reason="needs oneDNN on x86")


def _layer(d_in: int, d_out: int, bias: bool = True, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    m = Linear(d_in, d_out, bias=bias).eval().requires_grad_(False)
    return m


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_prepacked_products_equal_f_linear(bias):
    m = _layer(384, 1536, bias)
    assert prepack(m) == "onednn" and m.prepacked is not None
    g = torch.Generator().manual_seed(1)
    for x in (torch.randn(1, 384, generator=g), torch.randn(37, 384, generator=g), torch.randn(4096, 384, generator=g),
              torch.randn(3, 5, 384, generator=g), torch.randn(384, 50, generator=g).t(), torch.randn(0, 384)):
        want = F.linear(x.double(), m.weight.double(), None if m.bias is None else m.bias.double())
        got = m(x)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert torch.allclose(got.double(), want, atol=5e-5, rtol=0), float((got.double() - want).abs().max())
    m.weight.data.zero_()  # proof the prepacked copy is what ran: F.linear would now give the bias alone
    x = torch.randn(4, 384)
    assert not torch.allclose(m(x), F.linear(x, m.weight, m.bias))


@needs_onednn
def test_small_layers_stay_on_f_linear_unless_pinned():
    """Below MIN_FEATURES oneDNN was slower than MKL (a 32 x 96 product at a third of its speed)."""
    model = torch.nn.Sequential(_layer(32, 96), _layer(96, 32))
    assert prepack(model) == "aten" and all(m.prepacked is None for m in model)
    assert prepack(model, "onednn") == "onednn" and all(m.prepacked is not None for m in model)
    assert prepack(model, "aten") == "aten" and all(m.prepacked is None for m in model)
    mixed = torch.nn.Sequential(_layer(384, 384), _layer(384, 1))  # a classifier's single output
    assert prepack(mixed) == "onednn" and mixed[0].prepacked is not None and mixed[1].prepacked is None


def test_other_dtypes_devices_and_choices():
    m = _layer(256, 256)
    assert prepack(m.to(torch.float64)) == "aten" and m.prepacked is None
    with pytest.raises(ValueError, match="cannot run here"):
        prepack(m, "onednn")
    with pytest.raises(ValueError, match="choose from"):
        prepack(m, "mkl")
    with torch.device("meta"):
        meta = Linear(256, 256)
    assert prepack(meta) == "aten"


@needs_onednn
def test_a_stale_prepacked_weight_is_never_used():
    """The prepacked copy is made once: a weight written in place, replaced or cast afterwards must not
    score with the old values. Such a layer runs F.linear until the next `prepack`."""
    m = _layer(256, 256)
    assert prepack(m) == "onednn" and m.fresh()
    x = torch.randn(5, 256)
    with torch.no_grad():
        m.weight.mul_(2)  # as load_state_dict's copy_ does
    assert not m.fresh()
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), atol=1e-5, rtol=0)
    assert prepack(m) == "onednn" and m.fresh()
    m.weight = torch.nn.Parameter(torch.randn(256, 256), requires_grad=False)
    assert not m.fresh()
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), atol=1e-5, rtol=0)
    m.load_state_dict({"weight": torch.randn(256, 256), "bias": torch.randn(256)})
    assert prepack(m) == "onednn"
    packed_once = m.prepacked
    assert prepack(m) == "onednn" and m.prepacked is packed_once  # still fresh: not reordered again
    m.to(torch.bfloat16)  # a layer cast on its own: the model's hook never hears of it
    assert not m.fresh()
    torch.testing.assert_close(m(x.bfloat16()), F.linear(x.bfloat16(), m.weight, m.bias))
