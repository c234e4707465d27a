"""The batched sweep engine trains every configuration exactly as it would train alone."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from lab.base import load_base_model
from lab.config import LoRAConfig
from lab.engine.batched import (
    AdapterSpec,
    BatchedLoRALinear,
    train_batched,
)
from lab.model import ToyTransformer, get_preset
from lab.surgery import add_lora, lora_layers
from lab.sweeps import SweepCache, SweepPoint, full_point, run_group, run_point, sweep
from lab.tasks import get_task
from lab.training import train

# Mixed ranks (1 to 8, so rank 1 is padded to 8), alphas != rank, dropouts, targets (q,v; all
# attention; the MLP only), rsLoRA, learning rates and seeds (so data orders) in one group.
MIXED = [
    SweepPoint("sort_desc", 1, alpha=2.0),
    SweepPoint(
        "sort_desc",
        4,
        alpha=16.0,
        dropout=0.1,
        seed=1,
        targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    ),  # fmt: skip
    SweepPoint("sort_desc", 8, alpha=4.0, dropout=0.3),
    SweepPoint("sort_desc", 8, alpha=16.0, rslora=True, targets=("up_proj",), lr=1e-2),
]


def make_spec(targets, rank, alpha, dropout=0.0, rslora=False, lr=2e-2, seed=0) -> AdapterSpec:
    """An AdapterSpec from the adapter's numbers (its LoRAConfig) and the optimizer's."""
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets, rslora=rslora)
    return AdapterSpec(config, lr, seed)


def spec(point: SweepPoint) -> AdapterSpec:
    return make_spec(
        point.targets, point.rank, point.alpha, point.dropout, point.rslora, point.lr, point.seed
    )


def adapters(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.lora_A.detach(), m.lora_B.detach()) for n, m in lora_layers(model).items()}


def assert_same_run(alone_losses, alone_model, batched_losses, batched_model, rtol, atol):
    torch.testing.assert_close(
        batched_losses.to(torch.float64), torch.as_tensor(alone_losses, dtype=torch.float64),
        rtol=rtol, atol=0.0,
    )  # fmt: skip
    mine, theirs = adapters(batched_model), adapters(alone_model)
    assert mine.keys() == theirs.keys()
    for name in mine:
        for got, want in zip(mine[name], theirs[name], strict=True):
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=name)


@pytest.fixture
def unmeasured(monkeypatch):
    """run_point's and run_group's results without the measurements taken after training
    (forgetting on the pretraining skills; run_group's first-step memory), which cost more than
    the training itself: for tests about how points are grouped and trained. Measuring batched
    points is checked by test_sweep_batches_lora_points_and_measures_them_like_run_point."""
    module = importlib.import_module("lab.engine.run")
    monkeypatch.setattr(module, "forgetting", lambda model: None)
    monkeypatch.setattr(module, "_first_step_memory", lambda point, base, device: None)


@pytest.fixture
def kept_models(monkeypatch):
    """The models run_point trains, kept in order: a test reads each point's final adapters from
    the very run whose losses it compares, instead of training the point alone a second time."""
    module = importlib.import_module("lab.engine.run")
    kept = []
    real = module.train

    def train_and_keep(model, *args, **kwargs):
        kept.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(module, "train", train_and_keep)
    return kept


def test_float32_batched_equals_each_run_alone(kept_models, unmeasured):
    """Every configuration's per-step losses (rel 1e-5) and final adapters match run_point.

    Float32 matmuls of different shapes (a rank-1 product alone, a padded rank-8 one batched)
    round differently in the last bit, and Adam's early, sign-like updates amplify that over
    many steps, so this float32 check trains 10 steps; the float64 test below trains 40.
    Measured: losses agree to better than 1e-6 relative; all but a handful of adapter
    entries agree to 1e-5, and those few (an entry whose gradient is near zero, where Adam's
    step takes the sign of a rounding) by at most 2.2e-4 on the CPUs seen so far, a few
    thousandths of the weights' scale. So: at most 4 entries per tensor beyond 1e-5, none
    beyond 1e-3; a real fault (a wrong scaling, mask or data order) moves every entry.
    """
    steps = 10
    points = [SweepPoint(**{**p.to_dict(), "targets": p.targets, "steps": steps}) for p in MIXED]
    run = train_batched(load_base_model("cpu"), get_task("sort_desc"), [spec(p) for p in points],
                        steps, device="cpu", progress=False)  # fmt: skip
    for k, point in enumerate(points):
        alone = run_point(point, device="cpu", progress=False)
        assert len(kept_models) == k + 1
        model = kept_models[k]  # the model run_point just trained
        torch.testing.assert_close(run.losses[k], torch.tensor(alone.losses), rtol=1e-5, atol=0)
        mine, theirs = adapters(run.models[k]), adapters(model)
        assert mine.keys() == theirs.keys()
        for name in mine:
            for got, want in zip(mine[name], theirs[name], strict=True):
                off = (got - want).abs()
                stragglers = int((off > 1e-5).sum())
                assert stragglers <= 4, f"{name}: {stragglers} of {off.numel()} entries differ"
                assert float(off.max()) <= 1e-3, f"{name}: differs by {float(off.max()):.2e}"


def tiny_base() -> ToyTransformer:
    """The smallest model with every layer a point targets (the "tiny" preset: width 32, one
    block), random weights from seed 0. Exact agreement is a matter of the algebra, which a tiny
    model exercises as fully as the shipped one, at a fraction of the cost per step."""
    torch.manual_seed(0)
    return ToyTransformer(get_preset("tiny"))


def test_float64_batched_equals_each_run_alone_over_many_steps():
    """In float64 the engine agrees with training alone to 1e-10 after 40 steps: the algebra
    (masks, scalings, dropout streams, data orders, per-config AdamW) is exact."""
    steps, task = 40, get_task("sort_desc")
    base = tiny_base().double()
    points = [SweepPoint(**{**p.to_dict(), "targets": p.targets, "steps": steps}) for p in MIXED]
    run = train_batched(base, task, [spec(p) for p in points], steps, device="cpu",
                        progress=False)  # fmt: skip
    for k, point in enumerate(points):
        torch.manual_seed(point.seed)
        model = copy.deepcopy(base)
        add_lora(model, point.targets, point.rank, point.alpha, point.dropout, point.rslora)
        alone = train(model, task, steps, point.lr, seed=point.seed, device="cpu",
                      progress=False, measure_memory=False)  # fmt: skip
        assert_same_run(alone.losses, model, run.losses[k], run.models[k], rtol=1e-10, atol=1e-10)


def test_padded_rank_slots_and_untargeted_layers_stay_exactly_zero():
    specs = [make_spec(("q_proj",), 1, 4.0), make_spec(("q_proj", "v_proj"), 8, 16.0, 0.2)]
    task = get_task("sort_desc")
    run = train_batched(load_base_model("cpu"), task, specs, 15, device="cpu", progress=False)
    assert run.losses.shape == (2, 15)
    # The rank-1 configuration's padded rows/columns and its slot in v_proj never moved.
    layers = run.layers
    q, v = layers["blocks.0.attn.q_proj"], layers["blocks.0.attn.v_proj"]
    assert q.ranks == [1, 8] and v.ranks == [0, 8]
    assert (
        torch.count_nonzero(q.lora_A[0, 1:]) == 0 and torch.count_nonzero(q.lora_B[0, :, 1:]) == 0
    )
    assert torch.count_nonzero(v.lora_A[0]) == 0 and torch.count_nonzero(v.lora_B[0]) == 0
    # ... while the slots in use did train.
    assert torch.count_nonzero(q.lora_B[0, :, 0]) > 0 and torch.count_nonzero(v.lora_B[1]) > 0
    assert set(lora_layers(run.models[0])) == {"blocks.0.attn.q_proj", "blocks.1.attn.q_proj"}


def test_the_fast_draw_changes_only_configurations_with_dropout_and_only_when_asked():
    specs = [make_spec(("q_proj", "v_proj"), 4, 8.0), make_spec(("q_proj", "v_proj"), 4, 8.0, 0.2)]
    base, task = load_base_model("cpu"), get_task("sort_desc")
    runs = {draw: train_batched(base, task, specs, 5, 8, "cpu", progress=False, dropout_draw=draw)
            for draw in ("exact", "fast")}  # fmt: skip
    default = train_batched(base, task, specs, 5, 8, "cpu", progress=False)
    assert torch.equal(default.losses, runs["exact"].losses)
    assert torch.equal(runs["fast"].losses[0], runs["exact"].losses[0])  # no dropout: same
    assert not torch.equal(runs["fast"].losses[1], runs["exact"].losses[1])
    with pytest.raises(ValueError, match="dropout_draw='bitwise'"):
        train_batched(base, task, specs, 5, 8, "cpu", progress=False, dropout_draw="bitwise")


def test_a_trainer_stops_after_its_steps():
    from lab.engine.batched import BatchedTrainer

    trainer = BatchedTrainer(load_base_model("cpu"), get_task("sort_desc_small"),
                             [make_spec(("q_proj",), 2, 4.0)], 2, 8, "cpu")  # fmt: skip
    assert trainer.step().shape == (1,) and trainer.step().shape == (1,)
    with pytest.raises(RuntimeError, match="all 2 steps are done"):
        trainer.step()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": ()}, "targets is empty"),
        ({"rank": 0}, "rank must be an int >= 1"),
        ({"alpha": -1.0}, "alpha must be"),
        ({"dropout": 1.0}, "dropout must be"),
        ({"lr": 0.0}, "lr=0.0"),
    ],
)
def test_adapter_spec_rejects_bad_values(kwargs, message):
    fields = {"targets": ("q_proj",), "rank": 4, "alpha": 8.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_spec(**fields)


def test_train_batched_rejects_bad_input_and_leaves_base_unchanged():
    base = load_base_model("cpu")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    task = get_task("sort_desc")
    with pytest.raises(ValueError, match="specs is empty"):
        train_batched(base, task, [], 5, device="cpu")
    with pytest.raises(ValueError, match="steps=0"):
        train_batched(base, task, [make_spec(("q_proj",), 4, 8.0)], 0, device="cpu")
    with pytest.raises(ValueError, match=r"targets \['qproj'\] match no layer"):
        train_batched(base, task, [make_spec(("qproj",), 4, 8.0)], 5, device="cpu")
    with pytest.raises(ValueError, match="rank=256 is too large"):
        train_batched(base, task, [make_spec(("q_proj",), 256, 8.0)], 5, device="cpu")
    train_batched(base, task, [make_spec(("q_proj",), 4, 8.0)], 2, device="cpu", progress=False)
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, BatchedLoRALinear) for m in base.modules())


# -- sweeps train their LoRA points in batched groups ----------------------------------------


def short(rank, steps=6, **kwargs):
    return SweepPoint("sort_desc_small", rank, steps=steps, batch_size=16, **kwargs)


def test_sweep_batches_lora_points_and_measures_them_like_run_point(tmp_path):
    points = [short(1, alpha=4.0), short(4, dropout=0.2), short(2, steps=4), full_point(
        "sort_desc_small", steps=4, batch_size=16)]  # fmt: skip
    seen = []
    results = sweep(points, SweepCache(tmp_path), progress=False, device="cpu",
                    on_result=seen.append)  # fmt: skip
    assert [r.point for r in results] == points and len(seen) == 4
    assert {r.point for r in seen} == set(points)
    # The two 6-step points trained together; the 4-step LoRA point, alone in its group, trained
    # as run_point trains it (one batched configuration is slower than the plain loop).
    assert [r.extra.get("batched", {}).get("configs") for r in results] == [2, 2, None, None]
    assert len(SweepCache(tmp_path)) == 4
    for result in results[:3]:
        alone = run_point(result.point, device="cpu", progress=False)
        torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(alone.losses),
                                   rtol=1e-5, atol=0)  # fmt: skip
        assert result.memory["loss"] == pytest.approx(alone.memory["loss"], rel=1e-6)
        for field in ("parameters", "gradients", "optimizer"):
            assert result.memory[field] == alone.memory[field]
        assert result.trainable_parameters == alone.trainable_parameters
        assert result.total_parameters == alone.total_parameters
        assert result.train_eval is not None  # a small data set also gets a train evaluation
        assert result.heldout["loss"] == pytest.approx(alone.heldout["loss"], rel=1e-4)
    # Cached now: a second sweep trains nothing and returns the same results.
    again = sweep(points, SweepCache(tmp_path), progress=False, run_fn=CountingTrainer())
    assert [r.losses for r in again] == [r.losses for r in results]


class CountingTrainer:
    def __init__(self):
        self.calls = []

    def __call__(self, point, device=None, progress=True):
        self.calls.append(point)
        raise AssertionError("a cached point was trained again")


def test_chunks_train_the_same_as_one_group(unmeasured):
    # Whole, the rank-1 points are padded to rank 4; chunked, they train without padding.
    points = [short(r, alpha=a) for r in (1, 4) for a in (2.0, 8.0)]
    whole = run_group(points, device="cpu", progress=False)
    chunked = run_group(points, device="cpu", progress=False, max_configs=2)
    assert [r.extra["batched"]["configs"] for r in whole] == [4, 4, 4, 4]
    assert [r.extra["batched"]["configs"] for r in chunked] == [2, 2, 2, 2]
    for a, b in zip(whole, chunked, strict=True):
        assert a.point == b.point
        torch.testing.assert_close(
            torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=0
        )


def test_a_chunk_that_runs_out_of_memory_is_split_and_retried(monkeypatch, unmeasured):
    module = importlib.import_module("lab.engine.run")
    sizes = []
    real = module.train_batched

    def tight(base, task, specs, *args, **kwargs):
        sizes.append(len(specs))
        if len(specs) > 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 1 bytes")  # fmt: skip
        return real(base, task, specs, *args, **kwargs)

    monkeypatch.setattr(module, "train_batched", tight)
    points = [short(r, steps=2) for r in (1, 2, 3, 4, 5)]
    with pytest.warns(UserWarning) as warned:
        results = run_group(points, device="cpu", progress=False)
    assert [str(w.message) for w in warned] == [
        "5 configurations did not fit in memory; retrying as 2 + 3",
        "3 configurations did not fit in memory; retrying as 1 + 2",
    ]
    assert sizes == [5, 2, 3, 1, 2]
    assert [r.point for r in results] == points
    # Any other error is not a memory problem and is raised as it is.
    monkeypatch.setattr(module, "train_batched", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run_group(points, device="cpu", progress=False)


def test_run_group_rejects_what_cannot_train_together():
    with pytest.raises(ValueError, match="full fine-tuning has no adapter"):
        run_group([short(2), full_point("sort_desc_small")], device="cpu")
    shared = r"differ in \(task, steps, batch_size, replay\)"
    with pytest.raises(ValueError, match=shared + r".*5, 16, 0\.0\).*6, 16, 0\.0\)"):
        run_group([short(2), short(2, steps=5)], device="cpu")
    with pytest.raises(ValueError, match=shared + r".*6, 16, 0\.0\).*6, 16, 0\.05\)"):
        run_group([short(2), short(2, replay=0.05)], device="cpu")
    with pytest.raises(ValueError, match="max_configs=0"):
        run_group([short(2)], device="cpu", max_configs=0)
    assert run_group([], device="cpu") == []


def test_a_points_spec_starts_its_adapter_as_the_point_alone_does():
    point = SweepPoint("sort_desc", 4, alpha=8.0, dropout=0.1, seed=3, targets=("k_proj",))
    model = load_base_model("cpu")
    assert point.spec().add_to(model) == ["blocks.0.attn.k_proj", "blocks.1.attn.k_proj"]
    torch.manual_seed(3)
    reference = load_base_model("cpu")
    add_lora(reference, ("k_proj",), 4, 8.0, 0.1)
    for name, layer in lora_layers(reference).items():
        assert torch.equal(lora_layers(model)[name].lora_A, layer.lora_A)
    with pytest.raises(ValueError, match="full fine-tuning has no adapter"):
        full_point("sort_desc").spec()
