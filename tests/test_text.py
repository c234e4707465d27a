"""lab.text: counts with their noun and byte sizes, written one way everywhere."""

from __future__ import annotations

import pytest

from lab.analysis import format_decimal_bytes
from lab.memory import format_bytes as memory_format_bytes
from lab.text import format_bytes, plural


def test_plural_counts_with_their_noun():
    assert [plural(n, "point") for n in (0, 1, 2, 1200)] == [
        "0 points", "1 point", "2 points", "1,200 points"
    ]  # fmt: skip
    assert (
        plural(1, "entry", "entries") == "1 entry" and plural(3, "entry", "entries") == "3 entries"
    )


@pytest.mark.parametrize(
    "n, binary, decimal",
    [(0, "0 B", "0 B"), (999, "999 B", "999 B"), (33_816, "33.0 KiB", "33.8 KB"),
     (75_497_472, "72.0 MiB", "75.5 MB"), (349.2e9, "325.2 GiB", "349 GB")],
)  # fmt: skip
def test_one_byte_formatter_in_binary_and_decimal_units(n, binary, decimal):
    assert format_bytes(n) == binary and format_bytes(n, decimal=True) == decimal
    # the lab's other names for it are this one function
    assert memory_format_bytes is format_bytes and format_decimal_bytes(n) == decimal


def test_decimal_sizes_refuse_what_is_not_a_size():
    for bad in (-1, float("nan"), True, "3"):
        with pytest.raises(ValueError, match="expected a finite number of bytes"):
            format_bytes(bad, decimal=True)
