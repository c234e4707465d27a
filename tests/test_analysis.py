"""lab.analysis: timings, spectra, LoRA counts on the meta device, tables and the count widget."""

import math

import pytest
import torch

from lab import ToyTransformer, get_preset
from lab.analysis import (
    answers,
    checkpoint_bytes,
    energy_captured,
    format_table,
    lora_counts,
    lora_flop_share,
    paper_counts,
    rank_for_energy,
    singular_values,
    subspace_similarity,
    time_forward,
    time_models,
    update_norms,
)
from lab.widgets import count_explorer


def test_singular_values_of_a_rank_2_matrix_has_exactly_two_nonzero():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g)
    sv = singular_values(m)
    assert len(sv) == 30 and sv == sorted(sv, reverse=True)
    assert sv[1] > 1e-3 * sv[0] and max(sv[2:]) < 1e-6 * sv[0]  # fp32 rounding only


def test_singular_values_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        singular_values(torch.ones(3))


def test_energy_captured_is_monotone_and_ends_at_one():
    energy = energy_captured([3.0, 2.0, 1.0, 0.5])
    assert energy == sorted(energy) and energy[-1] == 1.0
    assert energy[0] == pytest.approx(9 / 14.25)
    with pytest.raises(ValueError, match="zero"):
        energy_captured([0.0, 0.0])


def test_rank_for_energy_counts_the_directions_needed():
    assert rank_for_energy([3.0, 2.0, 1.0, 0.5], 0.9) == 2  # 13/14.25 = 0.912
    assert rank_for_energy([1.0, 1.0], 1.0) == 2
    with pytest.raises(ValueError, match="fraction"):
        rank_for_energy([1.0], 1.5)


def test_subspace_similarity_is_one_for_the_same_subspace_and_small_for_unrelated():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(64, 4, generator=g) @ torch.randn(4, 64, generator=g)
    assert subspace_similarity(a, 3 * a, 4) == pytest.approx(1.0)
    b = torch.randn(64, 64, generator=g)
    assert subspace_similarity(a, b, 4) < 0.5


def test_update_norms_shrink_with_alpha_over_r_and_stay_flat_with_rslora():
    ranks = [1, 64]
    classic = update_norms(ranks)
    rs = update_norms(ranks, rslora=True)
    assert classic[1] / classic[0] == pytest.approx(1 / 8, rel=0.3)  # ~ 1 / sqrt(64)
    assert rs[1] / rs[0] == pytest.approx(1.0, rel=0.3)
    assert update_norms(ranks, seed=3) == update_norms(ranks, seed=3)


def test_lora_counts_reproduce_the_lora_papers_gpt3_numbers():
    assert lora_counts("gpt3-175b", 1, ("q_proj", "v_proj"))["trainable"] == 4_718_592
    assert lora_counts("gpt3-175b", 8, ("q_proj", "v_proj"))["trainable"] == 37_748_736
    for rank, targets in [
        (4, ("q_proj", "v_proj")),
        (8, "q_proj"),
        (2, ("o_proj", "k_proj", "v_proj", "q_proj")),
    ]:
        assert lora_counts("gpt3-175b", rank, targets)["trainable"] == 18_874_368
    counts = lora_counts("gpt3-175b", 8, ["v_proj", "q_proj"])
    assert counts["targets"] == ("q_proj", "v_proj")
    assert counts["base"] == 174_593_642_496
    assert counts["adapter_bytes"] == 2 * 37_748_736 and counts["base_bytes"] == 2 * counts["base"]


def test_lora_counts_match_a_real_model_and_leave_the_cached_model_plain():
    from lab import add_lora, count_parameters

    model = ToyTransformer(get_preset("tiny"))
    add_lora(model, ("q_proj", "k_proj"), rank=4)
    counts = lora_counts("tiny", 4, ("k_proj", "q_proj"))
    assert counts["trainable"] == count_parameters(model).trainable
    assert lora_counts("tiny", 2, "v_proj")["base"] == counts["base"]  # no LoRA left behind


def test_lora_counts_errors_name_the_problem():
    with pytest.raises(ValueError, match="empty"):
        lora_counts("cpu", 8, ())
    with pytest.raises(ValueError, match="unknown preset"):
        lora_counts("gpt5", 8, "q_proj")
    with pytest.raises(ValueError, match="rank"):
        lora_counts("tiny", 64, "q_proj")


def test_paper_counts_rows_agree_with_what_the_paper_reports():
    rows = paper_counts()
    assert len(rows) == 9
    for row in rows:
        millions = row["trainable"] / 1e6
        reported = float(row["paper"].split("M")[0])
        assert math.floor(millions * 10) / 10 == reported or int(millions) == reported


def test_checkpoint_bytes_and_flop_share():
    assert checkpoint_bytes(175_000_000_000) == 350_000_000_000
    assert checkpoint_bytes(10, 4) == 40
    share = lora_flop_share(get_preset("cpu"), ("q_proj", "v_proj"), 8)
    # 2 layers x 2 targets x 8 x (128 + 128) extra weights over the base's 401,408 matmul weights
    assert share == pytest.approx(8192 / 401_408)


def test_count_explorer_updates_its_readout_when_a_control_changes():
    box = count_explorer()
    preset, rank, targets, readout = box.children
    assert "37,748,736" in readout.value
    rank.value = 1
    assert "4,718,592" in readout.value
    preset.value = "gpt2-small"
    targets.value = ("q_proj",)
    assert f"{lora_counts('gpt2-small', 1, 'q_proj')['trainable']:,}" in readout.value
    targets.value = ()
    assert "cannot count" in readout.value


def test_time_forward_and_time_models_return_positive_medians():
    model = ToyTransformer(get_preset("tiny"))
    x = torch.zeros(2, 8, dtype=torch.long)
    stats = time_forward(model, x, repeats=3, warmup=1)
    assert stats["median_s"] > 0 and stats["min_s"] <= stats["median_s"] <= stats["max_s"]
    assert stats["repeats"] == 3
    both = time_models({"a": model, "b": model}, x, repeats=2, warmup=0)
    assert set(both) == {"a", "b"} and both["b"]["median_s"] > 0
    with pytest.raises(ValueError, match="repeats"):
        time_forward(model, x, repeats=0)


def test_format_table_aligns_columns_and_formats_ints():
    text = format_table([{"name": "lora", "n": 8192}, {"name": "full", "n": 406784}])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "n"] and "406,784" in lines[3]
    assert len({len(line) for line in lines}) == 1  # right-aligned numbers: equal widths
    assert format_table([]) == "(no rows)"


def test_answers_decode_greedily_and_the_base_model_copies():
    from lab import get_task, load_base_model

    rows = answers(load_base_model(device="cpu"), get_task("copy"), n=3)
    assert len(rows) == 3
    for row in rows:
        assert row["prompt"].startswith("<copy>") and row["correct"]
        assert row["answer"] == row["prompt"].removeprefix("<copy>").strip()


# -- timings: the verdict says only what the spread allows ------------------------------------


def test_timing_verdict_states_a_difference_only_when_the_spreads_are_apart():
    from lab.analysis import timing_verdict

    apart = timing_verdict("together", [0.45, 0.47, 0.5], "alone", [1.1, 1.12, 1.3])
    assert "together is 2.38x faster than alone" in apart
    assert "spread 450 ms-500 ms" in apart and "spread 1.1 s-1.3 s" in apart
    reversed_ = timing_verdict("alone", [1.1, 1.12, 1.3], "together", [0.45, 0.47, 0.5])
    assert "together is 2.38x faster than alone" in reversed_
    close = [8.4e-3, 8.6e-3, 8.7e-3, 9e-3, 8.2e-3]
    overlap = timing_verdict("merged", close, "base", [8.5e-3, 8.3e-3, 8.8e-3, 9.1e-3, 8.4e-3])
    assert "within the spread" in overlap and "faster" not in overlap
    # a busy machine: one slow outlier widens the range but not the quartiles
    busy = timing_verdict("a", [1.0, 1.0, 1.01, 1.02, 5.0], "b", [2.0, 2.0, 2.01, 2.02, 2.03])
    assert "a is 1.99x faster than b" in busy


def test_spread_is_quartiles_from_four_timings_and_refuses_bad_ones():
    from lab.analysis import spread

    assert spread([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert spread([1.0, 2.0, 3.0, 4.0, 100.0]) == (2.0, 4.0)
    for bad in ([], [float("nan")], [-1.0], [1.0, float("inf")]):
        samples = list(bad)
        with pytest.raises(ValueError, match="timings must be finite seconds"):
            spread(samples)
        assert samples == bad  # nothing changed


def test_time_calls_takes_turns_after_warming_up():
    from lab.analysis import time_calls

    order: list[str] = []
    times = time_calls({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3, 1)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    for repeats, warmup in ((0, 1), (2, -1), (1.5, 0), (True, 0)):
        with pytest.raises(ValueError, match="repeats="):
            time_calls({"a": lambda: order.append("x")}, repeats, warmup)
    with pytest.raises(ValueError, match="calls is empty"):
        time_calls({})
    assert "x" not in order  # refused before calling anything


def test_file_sizes_choose_their_unit():
    from lab.analysis import format_decimal_bytes

    assert [format_decimal_bytes(n) for n in (0, 999, 33_816, 75_497_472, 349.2e9)] == [
        "0 B",
        "999 B",
        "33.8 KB",
        "75.5 MB",
        "349 GB",
    ]
    for bad in (-1, float("nan"), "3", None, True):
        with pytest.raises(ValueError, match="expected a finite number of bytes"):
            format_decimal_bytes(bad)


def test_timing_summary_is_the_one_median_a_table_a_plot_and_the_verdict_share():
    from lab.analysis import _stats, timing_summary, timing_verdict

    # An even count, skewed: the median is the mean of the two middle timings (38.7 and 45.06
    # ms), not the upper one, which a table picking sorted(t)[len(t) // 2] would show.
    skewed = [0.0278, 0.030, 0.031, 0.033, 0.0387, 0.04506, 0.050, 0.090, 0.095, 0.1017]
    low, median, high = timing_summary(skewed)
    assert median == pytest.approx((0.0387 + 0.04506) / 2)
    assert median != sorted(skewed)[len(skewed) // 2]
    assert (low, high) == pytest.approx((0.0315, 0.08))  # the quartiles, not median ± IQR/2
    assert low < median < high and high - median > median - low
    verdict = timing_verdict("base", skewed, "merged", [0.02] * 10)
    assert verdict.startswith(f"base {median * 1e3:.3g} ms (spread 31.5 ms-80 ms)")
    assert _stats(skewed)["median_s"] == median
    for bad in ([0.1, float("nan")], ["a", "b"], {"a": 1}, [True, False], "0.1", [None], []):
        with pytest.raises(ValueError, match="timings must be finite seconds"):
            timing_summary(bad)
