"""Forgetting: the pretraining skills measured after every sweep run; replay; lr as an axis."""

from __future__ import annotations

import math

import pytest
import torch

# The command line's fixtures: a recording stand-in for sweep, and the warning hook kept.
from test_cli_variants import SMALL, fake_sweep, keep_warning_hook, usage_error  # noqa: F401

import lab
import lab.__main__ as cli
from lab.forgetting import MAX_REPLAY, forgetting, source_summary, with_replay
from lab.sweeps import SweepPoint, SweepResult, describe, grid, run_group, run_point
from lab.tasks import PRETRAIN_TASKS


@pytest.fixture(scope="module")
def base():
    return lab.load_base_model("cpu")


def test_the_base_knows_its_pretraining_skills(base):
    measured = forgetting(base)
    assert set(measured) == set(PRETRAIN_TASKS)
    for name, value in measured.items():
        assert value["accuracy"] >= 0.95, (name, value)  # 97-100% when shipped
        assert 0 <= value["loss"] < 0.1, (name, value)
    summary = source_summary(measured)
    assert summary["accuracy"] == pytest.approx(sum(v["accuracy"] for v in measured.values()) / 4)


def test_replay_mixes_the_pretraining_data_in_and_keeps_the_heldout_split():
    task = lab.get_task("sort_desc_small")  # 256 examples
    assert with_replay(task, 0.0) is task
    mixed = with_replay(task, 0.2)
    extra = mixed.n_train - task.n_train
    assert extra == round(256 * 0.2 / 0.8) == 64
    assert extra / mixed.n_train == pytest.approx(0.2)
    assert torch.equal(mixed.train_inputs[:256], task.train_inputs)
    assert torch.equal(mixed.heldout_inputs, task.heldout_inputs)
    # The replayed rows are pretraining examples: their first token is a pretraining task token.
    first = {lab.tasks.VOCAB[int(i)] for i in mixed.train_inputs[256:, 0]}
    assert first <= {f"<{t}>" for t in PRETRAIN_TASKS} and len(first) == 4
    assert with_replay(task, 0.2) is mixed  # built once
    assert "replay" in mixed.name and "20%" in mixed.description


@pytest.mark.parametrize(
    "value, error, words",
    [
        (-0.1, ValueError, ["replay=-0.1", f"[0, {MAX_REPLAY:g}]"]),
        (0.9, ValueError, ["replay=0.9"]),
        (math.nan, ValueError, ["replay=nan"]),
        (True, TypeError, ["replay=True"]),
        ("0.1", TypeError, ["replay='0.1'"]),
    ],
)
def test_bad_replay_is_refused(value, error, words):
    for build in (lambda: with_replay(lab.get_task("rotate"), value),
                  lambda: SweepPoint("rotate", 4, replay=value)):  # fmt: skip
        with pytest.raises(error) as exc:
            build()
        assert all(w in str(exc.value) for w in words), str(exc.value)


def test_replay_is_part_of_a_point_but_absent_at_its_default():
    plain, mixed = SweepPoint("rotate", 4), SweepPoint("rotate", 4, replay=0.05)
    assert "replay" not in plain.to_dict()  # old cache keys unchanged
    assert plain.key != mixed.key
    assert SweepPoint.from_dict(mixed.to_dict()) == mixed
    assert describe(mixed) == "r4 α16 replay 5%"
    assert describe(lab.full_point("rotate", replay=0.1)) == "full fine-tuning replay 10%"


def test_a_run_alone_and_batched_carry_the_same_forgetting(base):
    point = SweepPoint("rotate", 2, alpha=5, steps=4, batch_size=8, targets="all-linear",
                       lr=1e-2, replay=0.1)  # fmt: skip
    alone = run_point(point, device="cpu", progress=False)
    [batched] = run_group([point], device="cpu", progress=False)
    for result in (alone, batched):
        assert set(result.forgetting) == set(PRETRAIN_TASKS)
    for name in PRETRAIN_TASKS:
        for key in ("accuracy", "loss"):
            assert batched.forgetting[name][key] == pytest.approx(
                alone.forgetting[name][key], rel=1e-4, abs=1e-4
            )
    # It is the trained model's, not the base's: four steps at lr 1e-2 already move the losses.
    moved = [abs(alone.forgetting[t]["loss"] - v["loss"]) for t, v in forgetting(base).items()]
    assert max(moved) > 1e-3
    again = SweepResult.from_dict(alone.to_dict())
    assert again.forgetting == alone.forgetting


def test_full_fine_tuning_carries_forgetting_too():
    point = lab.full_point("rotate", steps=2, lr=1e-4, batch_size=4)
    result = run_point(point, device="cpu", progress=False)
    assert set(result.forgetting) == set(PRETRAIN_TASKS)


def _result(**changes) -> dict:
    good = SweepResult(
        point=SweepPoint("rotate", 4), losses=[1.0], heldout={"loss": 1.0, "accuracy": 0.5, "n": 4},
        train_eval=None, trainable_parameters=10, total_parameters=100, memory=None,
        wall_seconds=1.0, tokens_per_second=1.0, device="cpu", date="",
        forgetting={t: {"accuracy": 0.5, "loss": 1.0} for t in PRETRAIN_TASKS},
    ).to_dict()  # fmt: skip
    return {**good, **changes}


@pytest.mark.parametrize(
    "forgetting_value, words",
    [
        ({"copy": {"accuracy": 0.5, "loss": 1.0}}, "dict of the skills"),
        ({t: {"accuracy": 1.5, "loss": 1.0} for t in PRETRAIN_TASKS}, "not in [0, 1]"),
        ({t: {"accuracy": 0.5, "loss": -1.0} for t in PRETRAIN_TASKS}, "finite loss >= 0"),
        ({t: {"accuracy": 0.5, "loss": None} for t in PRETRAIN_TASKS}, "finite loss >= 0"),
        ({t: {"accuracy": 0.5} for t in PRETRAIN_TASKS}, "accuracy and loss"),
        ("none", "dict of the skills"),
    ],
)
def test_a_result_with_impossible_forgetting_is_refused(forgetting_value, words):
    with pytest.raises(ValueError, match="malformed result") as exc:
        SweepResult.from_dict(_result(forgetting=forgetting_value))
    assert words in str(exc.value)


def test_results_cached_before_forgetting_still_load():
    data = _result()
    del data["forgetting"]
    assert SweepResult.from_dict(data).forgetting is None
    assert SweepResult.from_dict(_result()).forgetting["add"] == {"accuracy": 0.5, "loss": 1.0}


def test_learning_rate_is_a_grid_axis():
    points = grid("rotate", [1, 4], lrs=[1e-3, 1e-2], targets="all-linear")
    assert [(p.rank, p.lr) for p in points] == [(1, 1e-3), (1, 1e-2), (4, 1e-3), (4, 1e-2)]
    assert grid("rotate", [4], lr=3e-3)[0].lr == 3e-3
    with pytest.raises(TypeError, match="not both"):
        grid("rotate", [4], lr=1e-3, lrs=[1e-2])
    with pytest.raises(ValueError, match="lrs is empty"):
        grid("rotate", [4], lrs=[])
    with pytest.raises(TypeError, match=r"lrs=0.01: expected a list"):
        grid("rotate", [4], lrs=0.01)
    with pytest.raises(ValueError, match="lr=-1"):
        grid("rotate", [4], lrs=[1e-3, -1])


def test_cli_sweeps_learning_rates_replay_and_full_rates(capsys, tmp_path, fake_sweep):  # noqa: F811
    argv = ["sweep", *SMALL, "--targets", "all-linear", "--lr", "1e-3", "1e-2", "--full",
            "--full-lr", "1e-4", "3e-4", "--replay", "0.05",
            "--cache", str(tmp_path / "c")]  # fmt: skip
    assert cli.main(argv) == 0
    got = [(p.rank, p.lr, p.replay, len(p.targets)) for p in fake_sweep.points]
    assert got == [(1, 1e-3, 0.05, 6), (1, 1e-2, 0.05, 6), (None, 1e-4, 0.05, 0),
                   (None, 3e-4, 0.05, 0)]  # fmt: skip
    out = capsys.readouterr().out
    assert "source acc" in out and "lr 0.001" in out and "lr 0.0003" in out


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--full-lr", "1e-4"], ["--full-lr", "add --full"]),
        (["--replay", "0.7"], ["--replay", "replay 0.7 is out of range", "[0.0, 0.5]"]),
        (["--replay", "-0.1"], ["--replay", "out of range"]),
        (["--lr", "1e-3", "zero"], ["--lr", "'zero'", "not a number"]),
    ],
)
def test_cli_bad_rates_and_replay_are_usage_errors(capsys, tmp_path, fake_sweep, extra, words):  # noqa: F811
    last = usage_error(capsys, ["sweep", *SMALL, *extra, "--cache", str(tmp_path / "c")])
    assert all(w in last for w in words), last
    assert fake_sweep.points == [] and not (tmp_path / "c").exists()


def test_a_model_that_cannot_be_measured_is_refused_clearly():
    with torch.device("meta"):
        meta = lab.ToyTransformer(lab.get_preset("tiny"))
    with pytest.raises(ValueError, match="meta device"):
        forgetting(meta)
    with pytest.raises(ValueError, match=r"Linear\) could not score.*token ids \(2, 19\)"):
        forgetting(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="has no parameters"):
        forgetting(torch.nn.ReLU())
    small = lab.ToyTransformer(lab.get_preset("tiny", vocab_size=16))
    with pytest.raises(ValueError, match=r"IndexError.*vocab >= 51"):
        forgetting(small)
    short = lab.ToyTransformer(lab.get_preset("tiny", max_seq_len=8)).train()
    with pytest.raises(ValueError, match="sequence length 19 exceeds max_seq_len=8"):
        forgetting(short)
    assert short.training  # its mode is kept, also on failure

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(64, 8)

        def forward(self, idx):
            return self.emb(idx).sum(1)

    with pytest.raises(ValueError, match=r"returned a \(2, 8\) torch.float32 tensor"):
        forgetting(Flat())


@pytest.mark.parametrize(
    "entry", [{}, {"accuracy": "x", "loss": 1.0}, {"accuracy": True, "loss": 1.0}, 0.5]
)
def test_source_summary_refuses_a_malformed_entry(entry):
    measured = {t: {"accuracy": 1.0, "loss": 0.1} for t in PRETRAIN_TASKS}
    measured["sort"] = entry
    with pytest.raises(ValueError, match=r"measured\['sort'\] must be a dict with numbers"):
        source_summary(measured)
