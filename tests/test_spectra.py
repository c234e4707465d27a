"""lab.spectra: intruder dimensions, scaling them, energy rank and amplification, per layer."""

import copy
import dataclasses
import math

import pytest
import torch

import lab
from lab.spectra import (
    BLOCK_LINEARS,
    amplification_factor,
    effective_weight,
    energy_rank,
    intruder_counts,
    intruder_dimensions,
    intruder_similarities,
    layer_spectra,
    scale_intruders,
    scale_model_intruders,
)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def _w0() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    w0 = torch.randn(64, 64)
    u, s, vh = torch.linalg.svd(w0)
    return w0, u, s, vh


def _spiked(scale: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """w0 plus a dominant rank-1 spike in a random direction (the acceptance case)."""
    w0, _, s, _ = _w0()
    a, b = torch.randn(64, 1), torch.randn(1, 64)
    return w0, w0 + scale * s[0] * (a / a.norm()) @ (b / b.norm())


# ---------------------------------------------------------------------------------------------
# intruder_dimensions: known cases
# ---------------------------------------------------------------------------------------------


def test_a_rescaled_weight_has_no_intruders():
    w0, *_ = _w0()
    assert intruder_dimensions(w0, 1.01 * w0, top_k=10, threshold=0.5) == 0
    assert min(intruder_similarities(w0, 1.01 * w0)) > 0.999  # the same directions


def test_a_dominant_spike_in_a_new_direction_is_an_intruder():
    w0, w1 = _spiked()
    assert intruder_dimensions(w0, w1, top_k=10, threshold=0.5) >= 1
    assert intruder_similarities(w0, w1)[0] < 0.5  # the spike is the top direction


def test_a_spike_spread_evenly_over_every_singular_vector_is_exactly_one_intruder():
    w0, u, s, vh = _w0()
    # |cos| = 1/8 with each of the 64 singular vectors, on the output side and the input side
    left, right = u.sum(dim=1, keepdim=True) / 8, vh.sum(dim=0, keepdim=True) / 8
    w1 = w0 + 10 * s[0] * left @ right
    sims = intruder_similarities(w0, w1)
    assert sims[0] < 0.2 and min(sims[1:]) > 0.5
    assert intruder_dimensions(w0, w1) == 1


def test_a_spike_along_the_top_singular_vector_is_no_intruder():
    w0, u, s, vh = _w0()
    w1 = w0 + 3 * s[0] * u[:, :1] @ vh[:1]  # stretches a direction W already has
    assert intruder_dimensions(w0, w1, top_k=10, threshold=0.5) == 0
    assert min(intruder_similarities(w0, w1)) > 0.999


def test_a_minor_direction_of_w_grown_to_the_top_is_no_intruder():
    w0, u, s, vh = _w0()
    w1 = w0 + 3 * s[0] * u[:, 40:41] @ vh[40:41]  # W's 41st direction becomes its first
    assert intruder_similarities(w0, w1)[0] > 0.999  # compared with all of W's, not its top 10
    assert intruder_dimensions(w0, w1) == 0


def test_a_tall_matrix_gains_an_intruder_outside_its_column_space():
    torch.manual_seed(1)
    w0 = torch.randn(96, 32)  # U has 32 columns: a 32-dim subspace of R^96
    u = torch.linalg.svd(w0.double(), full_matrices=False).U
    outside = torch.randn(96, 1, dtype=torch.float64)
    outside -= u @ (u.T @ outside)  # orthogonal to every left singular vector of w0
    b = torch.randn(1, 32, dtype=torch.float64)
    s1 = float(torch.linalg.svdvals(w0)[0])
    w1 = w0 + (10 * s1 * (outside / outside.norm()) @ (b / b.norm())).float()
    # The new top direction is the spike plus at most a tenth of W's own: |cos| <= about 0.1.
    assert intruder_similarities(w0, w1)[0] < 0.15
    assert intruder_dimensions(w0, w1) == 1


def test_counts_never_fall_as_threshold_or_top_k_grow():
    torch.manual_seed(2)
    w0 = torch.randn(48, 40)
    w1 = w0 + 0.8 * torch.randn(48, 40)
    by_threshold = [intruder_dimensions(w0, w1, 10, t) for t in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)]
    assert by_threshold == sorted(by_threshold) and by_threshold[0] < by_threshold[-1]
    by_top_k = [intruder_dimensions(w0, w1, k, 0.5) for k in range(1, 41)]
    assert by_top_k == sorted(by_top_k) and by_top_k[0] < by_top_k[-1]
    assert all(0 <= n <= k for k, n in enumerate(by_top_k, start=1))


# ---------------------------------------------------------------------------------------------
# Bad input is refused, naming the value and what is valid
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "kwargs", "error", "match"),
    [
        ([[1.0]], torch.ones(2, 2), {}, TypeError, "w_before must be a torch.Tensor"),
        (torch.ones(4), torch.ones(4), {}, ValueError, r"w_before has shape \(4,\).*2-D"),
        (torch.ones(4, 3), torch.ones(3, 4), {}, ValueError, r"\(4, 3\) but w_after has \(3, 4\)"),
        (torch.ones(4, 4), torch.full((4, 4), math.nan), {}, ValueError, "w_after has 16 non-fin"),
        (torch.ones(4, 4), torch.ones(4, 4) / 0, {}, ValueError, "non-finite"),
        (torch.eye(4), torch.eye(4), {"top_k": 0}, ValueError, r"top_k=0: .*\[1, 4\]"),
        (torch.eye(4), torch.eye(4), {"top_k": 5}, ValueError, r"top_k=5: .*\[1, 4\]"),
        (torch.eye(4), torch.eye(4), {"top_k": 2.0}, TypeError, "top_k must be an int"),
        (torch.eye(4), torch.eye(4), {"top_k": True}, TypeError, "top_k must be an int"),
        (torch.eye(4), torch.eye(4), {"threshold": 0}, ValueError, r"threshold=0: .*\(0, 1\]"),
        (torch.eye(4), torch.eye(4), {"threshold": 1.5}, ValueError, r"threshold=1.5"),
        (torch.eye(4), torch.eye(4), {"threshold": math.nan}, ValueError, "threshold=nan"),
        (torch.eye(4), torch.eye(4), {"threshold": "0.5"}, TypeError, "must be a number"),
    ],
)
def test_intruder_dimensions_refuses_bad_input(before, after, kwargs, error, match):
    kwargs = {"top_k": 2, **kwargs}
    with pytest.raises(error, match=match):
        intruder_dimensions(before, after, **kwargs)
    with pytest.raises(error, match=match):
        scale_intruders(before, after, 0.5, **kwargs)


@pytest.mark.parametrize("factor", [-0.5, math.inf, math.nan])
def test_scale_intruders_refuses_a_factor_that_is_not_finite_and_non_negative(factor):
    w0, w1 = _spiked()
    with pytest.raises(ValueError, match=r"factor=.*finite number >= 0"):
        scale_intruders(w0, w1, factor)
    with pytest.raises(TypeError, match="factor must be a number"):
        scale_intruders(w0, w1, None)


# ---------------------------------------------------------------------------------------------
# scale_intruders
# ---------------------------------------------------------------------------------------------


def test_factor_one_returns_w_after():
    w0, w1 = _spiked()
    out = scale_intruders(w0, w1, 1.0)
    assert out.dtype == w1.dtype and torch.allclose(out, w1)


def test_factor_zero_removes_the_intruder_and_keeps_the_rest_of_the_spectrum():
    w0, w1 = _spiked()
    before_sv = torch.linalg.svdvals(w1.double())
    out = scale_intruders(w0, w1, 0.0)
    assert out.dtype == w1.dtype
    assert intruder_dimensions(w0, w1) == 1 and intruder_dimensions(w0, out) == 0
    after_sv = torch.linalg.svdvals(out.double())
    # The intruder's singular value (the largest) is gone; the others are all still there.
    assert torch.allclose(after_sv[:-1], before_sv[1:], rtol=1e-5) and after_sv[-1] < 1e-4


def test_a_factor_between_scales_the_intruders_singular_value():
    w0, w1 = _spiked()
    s1 = float(torch.linalg.svdvals(w1.double())[0])
    out = scale_intruders(w0, w1, 0.25)
    after = torch.linalg.svdvals(out.double())
    assert float((after - 0.25 * s1).abs().min()) < 1e-5 * s1
    assert not torch.allclose(out, w1)


def test_without_intruders_every_factor_changes_nothing():
    w0, *_ = _w0()
    assert torch.equal(scale_intruders(w0, 1.01 * w0, 0.0), 1.01 * w0)


# ---------------------------------------------------------------------------------------------
# The same definition as PEFT's reduce_intruder_dimension
# ---------------------------------------------------------------------------------------------


def _peft_model(w: torch.Tensor, delta: torch.Tensor):
    """A PEFT LoRA model of one (out, in) linear holding w, with B A = delta at full rank."""
    peft = pytest.importorskip("peft")
    out_features, in_features = w.shape
    rank = min(w.shape)  # full rank: PEFT's re-factorisation of the mitigated ΔW is then exact
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"])  # scaling 1
    model = peft.get_peft_model(torch.nn.Sequential(linear), config)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_((u * s.sqrt()).float())
        layer.lora_A["default"].weight.copy_((s.sqrt()[:, None] * vh).float())
    return model, layer


@pytest.mark.parametrize(("spikes", "grown"), [(0, False), (1, False), (3, False), (1, True)])
def test_peft_finds_the_same_intruders_and_scales_them_the_same_way(spikes, grown):
    pytest.importorskip("peft")
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    torch.manual_seed(10 + spikes)
    w = torch.randn(48, 32)
    delta = 0.05 * torch.randn(48, 32)  # small noise: keeps the pretrained directions
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    for i in range(spikes):  # dominant spikes in random directions: intruders
        a, b = torch.randn(48, 1), torch.randn(1, 32)
        delta += (3 + i) * s[0] * (a / a.norm()) @ (b / b.norm())
    if grown:  # W's 25th direction grown past the spike: not an intruder, in PEFT as here
        delta += 5 * s[0] * u[:, 24:25] @ vh[24:25]
    ours = intruder_dimensions(w, w + delta)
    sims = intruder_similarities(w, w + delta)
    assert min(abs(c - 0.5) for c in sims) > 0.02  # no float32-vs-float64 borderline case
    assert ours == spikes

    model, layer = _peft_model(w, delta)
    logs: list[str] = []
    reduce_intruder_dimension(model, mitigation_lambda=0.25, logging_sink=logs.append)
    (line,) = [m for m in logs if m.startswith("base_model.model.0:")]  # the one LoRA layer
    peft_count = 0 if "No intruders" in line else int(line.rsplit(":", 1)[1])
    assert peft_count == ours

    peft_weight = w + layer.get_delta_weight("intruder_reduced")
    assert torch.allclose(peft_weight, scale_intruders(w, w + delta, 0.25), atol=2e-4)


# ---------------------------------------------------------------------------------------------
# energy_rank and amplification_factor
# ---------------------------------------------------------------------------------------------


def _with_singular_values(values: list[float], shape: tuple[int, int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(shape[0], len(values), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(shape[1], len(values), generator=g, dtype=torch.float64)).Q
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize(("fraction", "rank"), [(0.7, 1), (0.9, 2), (0.95, 3), (1.0, 4)])
def test_energy_rank_of_known_singular_values(fraction, rank):
    delta = _with_singular_values([4.0, 2.0, 1.0, 1.0], (20, 12))  # energy 16, 4, 1, 1 of 22
    assert energy_rank(delta, fraction) == rank
    assert energy_rank(delta.float(), fraction) == rank


def test_energy_rank_refuses_bad_input():
    with pytest.raises(ValueError, match="all zeros"):
        energy_rank(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"fraction=1.5: .*\(0, 1\]"):
        energy_rank(torch.eye(4), 1.5)
    with pytest.raises(ValueError, match=r"fraction=0: "):
        energy_rank(torch.eye(4), 0)
    with pytest.raises(ValueError, match=r"delta has shape \(4,\)"):
        energy_rank(torch.ones(4))


def _basis(n: int, i: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)[:, i : i + 1]


def test_amplification_of_a_rank_one_update_is_its_norm_over_w_in_its_directions():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 6, generator=g, dtype=torch.float64)
    w[0, 1] = 0.5  # what W does from input direction e2 to output direction e1
    delta = 2 * _basis(8, 0) @ _basis(6, 1).T  # ΔW = 2 e1 e2ᵀ: U = ±e1, V = ±e2
    assert amplification_factor(w, delta, 1) == pytest.approx(2 / 0.5)
    w[0, 1] = 0.0
    assert amplification_factor(w, delta, 1) == math.inf


def test_amplification_of_a_rank_two_update_uses_the_block_of_w_it_spans():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(10, 7, generator=g, dtype=torch.float64)
    delta = 3 * _basis(10, 0) @ _basis(7, 2).T + 1 * _basis(10, 1) @ _basis(7, 3).T
    block = w[:2, 2:4]  # Uᵀ W V is this block, up to signs and order
    expected = math.sqrt(3**2 + 1**2) / float(block.norm())
    assert amplification_factor(w, delta, 2) == pytest.approx(expected)


def test_an_update_along_ws_top_direction_amplifies_it_by_c_over_s1():
    w0, u, s, vh = _w0()
    delta = 7.0 * u[:, :1] @ vh[:1]
    assert amplification_factor(w0, delta, 1) == pytest.approx(7.0 / float(s[0]), rel=1e-5)


def test_amplification_factor_refuses_bad_input():
    with pytest.raises(ValueError, match=r"w has shape \(4, 4\) but delta has \(4, 3\)"):
        amplification_factor(torch.eye(4), torch.ones(4, 3), 1)
    with pytest.raises(ValueError, match=r"rank=5: .*\[1, 4\]"):
        amplification_factor(torch.eye(4), torch.ones(4, 4), 5)
    with pytest.raises(TypeError, match="rank must be an int"):
        amplification_factor(torch.eye(4), torch.ones(4, 4), 1.0)
    with pytest.raises(ValueError, match="delta is all zeros"):
        amplification_factor(torch.eye(4), torch.zeros(4, 4), 1)


# ---------------------------------------------------------------------------------------------
# Models: the shipped base, a LoRA adapter and a full fine-tune, trained briefly
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    base = lab.load_base_model("cpu")
    task = lab.get_task("rotate")
    lora = copy.deepcopy(base)
    lab.add_lora(lora, targets=TARGETS, rank=4, alpha=16)
    lab.train(lora, task, 20, 5e-3, batch_size=32, device="cpu", progress=False,
              measure_memory=False)  # fmt: skip
    full = copy.deepcopy(base)
    lab.train(full, task, 20, 1e-3, batch_size=32, device="cpu", progress=False,
              measure_memory=False)  # fmt: skip
    return base, lora, full


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(lab.get_task("rotate").heldout_inputs[:64])


def test_counts_per_block_linear_are_ints_in_range(models):
    base, lora, full = models
    names = [f"blocks.{i}.{p}" for i in range(base.config.n_layers) for p in BLOCK_LINEARS]
    for tuned in (lora, full):
        counts = intruder_counts(base, tuned, top_k=10, threshold=0.5)
        assert list(counts) == names and len(counts) == 6 * base.config.n_layers
        assert all(type(n) is int and 0 <= n <= 10 for n in counts.values())
    assert set(intruder_counts(base, copy.deepcopy(base)).values()) == {0}


def test_merged_and_unmerged_adapters_count_the_same(models):
    base, lora, _ = models
    merged = copy.deepcopy(lora)
    lab.merge_lora(merged)
    assert intruder_counts(base, merged) == intruder_counts(base, lora)
    for name, layer in lab.lora_layers(lora).items():
        merged_layer = lab.lora_layers(merged)[name]
        assert torch.allclose(effective_weight(merged_layer), layer.merged_weight())


def test_counts_per_layer_are_intruder_dimensions_of_the_effective_weights(models):
    base, lora, _ = models
    counts = intruder_counts(base, lora, top_k=5, threshold=0.6)
    for name, layer in lab.lora_layers(lora).items():
        w = base.get_submodule(name).weight
        assert counts[name] == intruder_dimensions(w, layer.merged_weight(), 5, 0.6)


def test_scaled_model_at_factor_one_computes_what_the_tuned_model_does(models):
    base, lora, full = models
    for tuned in (lora, full):
        scaled = scale_model_intruders(base, tuned, 1.0)
        assert not lab.lora_layers(scaled)
        assert torch.allclose(_logits(scaled), _logits(tuned), atol=2e-4)  # merge rounding


def test_scaled_model_holds_the_scaled_weights_and_evaluates(models):
    base, lora, _ = models
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    scaled = scale_model_intruders(base, lora, 0.0)
    assert all(torch.equal(v, lora.state_dict()[k]) for k, v in before.items())  # unchanged
    for name, layer in lab.lora_layers(lora).items():
        expected = scale_intruders(base.get_submodule(name).weight, layer.merged_weight(), 0.0)
        assert torch.allclose(scaled.get_submodule(name).weight, expected)
    result = lab.get_task("copy").evaluate(scaled)
    assert 0 <= result["accuracy"] <= 1 and math.isfinite(result["loss"])


def test_dora_is_read_by_the_weight_it_applies(models):
    base = models[0]
    dora = copy.deepcopy(base)
    lab.add_lora(dora, targets=TARGETS, rank=2, alpha=4, variant="dora")
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for layer in lab.lora_layers(dora).values():
            layer.lora_B.normal_(0, 0.05, generator=g)
            layer.magnitude.mul_(1 + 0.3 * torch.rand(layer.magnitude.shape, generator=g))
    scaled = scale_model_intruders(base, dora, 1.0)
    assert torch.allclose(_logits(scaled), _logits(dora), atol=2e-4)
    merged = copy.deepcopy(dora)
    lab.merge_lora(merged)
    assert intruder_counts(base, merged) == intruder_counts(base, dora)


def test_layer_spectra_rows(models):
    base, lora, full = models
    rows = layer_spectra(base, lora)
    assert [r["layer"] for r in rows] == list(intruder_counts(base, lora))
    for row in rows:
        assert row["rank"] == 4 and 1 <= row["energy_rank"] <= 4  # ΔW = s B A has rank <= 4
        assert row["delta_norm"] > 0 and row["amplification"] == pytest.approx(
            row["delta_norm"] / row["projected_norm"]
        )
    assert "rank" in lab.analysis.format_table(rows)
    with pytest.raises(ValueError, match=r"blocks.0.attn.q_proj is a plain Linear.*give rank="):
        layer_spectra(base, full)
    assert all(r["rank"] == 8 for r in layer_spectra(base, full, rank=8))


def test_layer_spectra_of_an_untouched_layer():
    base = lab.load_base_model("cpu")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.blocks[0].attn.q_proj.weight.add_(0.1 * torch.randn(128, 128))
    rows = {r["layer"]: r for r in layer_spectra(base, tuned, rank=2)}
    assert rows["blocks.0.attn.q_proj"]["energy_rank"] > 2  # full-rank noise
    untouched = rows["blocks.0.attn.k_proj"]
    assert untouched["energy_rank"] == 0 and math.isnan(untouched["amplification"])


def test_models_are_refused_with_clear_errors(models):
    base, lora, _ = models
    with pytest.raises(ValueError, match="the same object"):
        intruder_counts(lora, lora)
    with pytest.raises(ValueError, match="has no `blocks`"):
        intruder_counts(torch.nn.Linear(4, 4), lora)
    with pytest.raises(TypeError, match="must be a torch nn.Module"):
        intruder_counts(base, "lora")
    with pytest.raises(ValueError, match=r"top_k=129: .*\[1, 128\].*smallest block linear"):
        intruder_counts(base, lora, top_k=129)
    with pytest.raises(ValueError, match="factor="):
        scale_model_intruders(base, lora, -1.0)
    deeper = lab.ToyTransformer(dataclasses.replace(base.config, n_layers=3))
    with pytest.raises(ValueError, match=r"12 block linears and tuned_model 18.*same architec"):
        intruder_counts(base, deeper)
    wider = lab.ToyTransformer(dataclasses.replace(base.config, d_ff=256))
    with pytest.raises(ValueError, match=r"blocks.0.mlp.up_proj is \(512, 128\) in base_model"):
        intruder_counts(base, wider)
    with pytest.raises(TypeError, match="expected a linear layer"):
        effective_weight(torch.nn.ReLU())


def test_layer_spectra_by_default_compares_the_layers_of_a_q_v_adapter_only():
    """The lab's default adapter (q, v): the untouched k, o, up, down are not full fine-tuning."""
    base = lab.load_base_model("cpu")
    tuned = copy.deepcopy(base)
    lab.add_lora(tuned, targets=("q_proj", "v_proj"), rank=4, alpha=16)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lab.lora_layers(tuned).values():
            layer.lora_B.normal_(0, 0.05, generator=g)
    rows = layer_spectra(base, tuned)
    adapted = [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert [r["layer"] for r in rows] == adapted
    assert all(r["rank"] == 4 and r["delta_norm"] > 0 for r in rows)
    assert len(layer_spectra(base, tuned, rank=2)) == 12  # a rank given: every block linear
    with torch.no_grad():  # a plain layer that did change needs a rank
        tuned.blocks[1].mlp.up_proj.weight.add_(0.01)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.up_proj is a plain Linear whose weigh"):
        layer_spectra(base, tuned)
    with pytest.raises(ValueError, match="no LoRA layer and no block linear differs"):
        layer_spectra(base, copy.deepcopy(base))


def test_meta_models_are_refused_by_name():
    base = lab.load_base_model("cpu")
    with torch.device("meta"):
        meta = lab.ToyTransformer(base.config)
    for call in (intruder_counts, layer_spectra, lambda a, b: scale_model_intruders(a, b, 0.5)):
        with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj of base_model is on the me"):
            call(meta, base)
        with pytest.raises(ValueError, match=r"of tuned_model is on the meta device"):
            call(base, meta)


def test_integer_matrices_are_refused_not_truncated():
    w = torch.arange(16).reshape(4, 4)
    for call in (
        lambda: scale_intruders(w, w + 1, 0.5, top_k=2),
        lambda: intruder_dimensions(w, w, top_k=2),
        lambda: energy_rank(w),
    ):
        with pytest.raises(TypeError, match=r"has dtype torch\.int64: expected a floating-point"):
            call()
