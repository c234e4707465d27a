"""The batched engine's stacked layer: slice k computes configuration k's LoRALinear (or its
flavour's layer), with its own dropout masks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.config import VARIANTS
from lab.engine.batched_layer import BatchedLoRALinear
from lab.variants.registry import PLAIN


def test_fresh_batched_layer_changes_nothing_and_matches_loralinear():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12, bias=True)
    layer = BatchedLoRALinear(base, [2, 4, 0], [8.0, 0.5, 0.0], [0.0] * 3, [None] * 3)
    x = torch.randn(3 * 5, 7, 16)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: exactly the base
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    out = layer(x).view(3, 5, 7, 12)
    for k, (r, s) in enumerate([(2, 8.0), (4, 0.5)]):
        a, b = layer.lora_A[k, :r], layer.lora_B[k, :, :r]
        want = base(x[k * 5 : (k + 1) * 5]) + s * x[k * 5 : (k + 1) * 5] @ a.T @ b.T
        torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2], base(x[10:]), rtol=0, atol=0)  # rank 0: no adapter
    with pytest.raises(ValueError, match="input batch 14 is not a whole number of batches for 3"):
        layer(x[:14])


def test_a_dora_configuration_on_an_all_zero_weight_row_stays_exact_and_finite():
    """A zero row of W has norm 0: the fresh batched layer must still compute W (not 0/0 = NaN)
    and give finite gradients, as DoRALinear alone does."""
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    with torch.no_grad():
        base.weight[2] = 0
    forms = [VARIANTS["dora"].batched, PLAIN]
    layer = BatchedLoRALinear(base, [2, 2], [2.0, 2.0], [0.0, 0.0], [None, None], forms)
    layer.add_extra("magnitude", (6,))
    with torch.no_grad():
        layer.magnitude[0] = base.weight.norm(dim=1)  # a fresh DoRA magnitude: ||W|| per row
        layer.lora_A.normal_()
    x = torch.randn(2 * 3, 5, 8)
    out = layer(x)
    torch.testing.assert_close(out, base(x), rtol=1e-6, atol=1e-6)  # B = 0: exactly W
    out.square().sum().backward()
    for name in ("lora_A", "lora_B", "magnitude"):
        grad = getattr(layer, name).grad
        assert torch.isfinite(grad).all(), (
            f"{name}'s gradient has {(~torch.isfinite(grad)).sum()} NaN"
        )


def _dropout_layer(dropout_draw: str, ranks=(4, 4, 4, 0), dropouts=(0.0, 0.1, 0.5, 0.3)):
    """A batched layer over one base whose configurations draw from generators seeded 0, 1, ..."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 8)
    gens = [torch.Generator().manual_seed(k) for k in range(len(ranks))]
    return BatchedLoRALinear(base, list(ranks), [1.0] * len(ranks), list(dropouts), gens,
                             dropout_draw=dropout_draw)  # fmt: skip


def test_exact_dropout_masks_are_what_nn_dropout_draws_from_each_generator():
    """Each configuration's slice is nn.Dropout's output from its generator's state; a
    configuration without dropout here (p 0, or rank 0 in this layer) passes through as is."""
    layer = _dropout_layer("exact")
    x = torch.randn(4, 16, 10, 64)
    got = layer._dropped(x)
    for k, (p, r) in enumerate(zip(layer.dropouts, layer.ranks, strict=True)):
        if p > 0 and r > 0:
            torch.manual_seed(k)  # the global stream nn.Dropout uses, in the same state
            want = torch.nn.functional.dropout(x[k], p, training=True)
            torch.testing.assert_close(got[k], want, rtol=0, atol=0)
        else:
            assert torch.equal(got[k], x[k])
    layer.eval()
    assert layer._dropped(x) is x


def test_fast_dropout_draw_is_dropout_at_the_right_rate_but_other_masks():
    """The fast draw keeps each entry with probability 1 - p (to within a few standard errors
    over 160k entries) and scales it by 1 / (1 - p), as nn.Dropout does; configurations
    without dropout pass through untouched; the masks differ from the exact draw's."""
    x = torch.ones(4, 256, 10, 64)
    fast = _dropout_layer("fast")._dropped(x)
    exact = _dropout_layer("exact")._dropped(x)
    n = x[0].numel()
    for k, p in ((1, 0.1), (2, 0.5)):
        kept = fast[k] != 0
        rate = float(kept.float().mean())
        assert abs(rate - (1 - p)) < 4 * ((p * (1 - p) / n) ** 0.5), (k, rate)
        torch.testing.assert_close(fast[k][kept], torch.full_like(fast[k][kept], 1 / (1 - p)))
        assert not torch.equal(fast[k], exact[k])
        # Entries are independent across positions: neighbours agree no more than chance says.
        both = float((kept[..., 1:] & kept[..., :-1]).float().mean())
        assert abs(both - (1 - p) ** 2) < 0.01
    assert torch.equal(fast[0], x[0]) and torch.equal(fast[3], x[3])  # p 0; rank 0 here
    assert not torch.equal(fast[1] != 0, fast[2] != 0)
    with pytest.raises(ValueError, match=r"dropout_draw='quick': expected one of 'exact', 'fast'"):
        _dropout_layer("quick")


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 6), st.floats(0.5, 64.0), st.booleans()), min_size=1, max_size=5
    ),
    st.integers(1, 3),
    st.integers(0, 2**16),
)
def test_each_slice_of_a_batched_layer_is_that_configurations_loralinear(configs, batch, seed):
    """Property: for any ranks (0 = no adapter), alphas and scaling rules, slice k of the batched
    layer's output is what a LoRALinear with configuration k's A, B, alpha and rule computes."""
    from lab.lora import LoRALinear

    torch.manual_seed(seed)
    base = torch.nn.Linear(9, 7)
    for p in base.parameters():
        p.requires_grad_(False)
    scalings = [
        (a / (r**0.5 if rs else r)) if r else 0.0 for r, a, rs in configs
    ]  # fmt: skip
    k = len(configs)
    layer = BatchedLoRALinear(base, [r for r, _, _ in configs], scalings, [0.0] * k, [None] * k)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(k * batch, 5, 9)
    out = layer(x).view(k, batch, 5, 7)
    for i, (r, alpha, rslora) in enumerate(configs):
        xi = x[i * batch : (i + 1) * batch]
        if r == 0:
            torch.testing.assert_close(out[i], base(xi), rtol=0, atol=0)
            continue
        alone = LoRALinear(base, r, alpha, rslora=rslora)
        with torch.no_grad():
            alone.lora_A.copy_(layer.lora_A[i, :r])
            alone.lora_B.copy_(layer.lora_B[i, :, :r])
        torch.testing.assert_close(out[i], alone(xi), rtol=1e-5, atol=1e-4)
