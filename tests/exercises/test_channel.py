"""Tests for lab/exercises/channel.py: what the grader reads from a worker is data or refused."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lab.exercises import channel


@pytest.mark.parametrize(
    "value",
    [
        torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        torch.tensor(True),
        torch.empty(0, 4),
        (1, "two", None, [3.5, float("nan")]),
        {"a": 1, 2: (float("inf"),)},
        {1, 2, 3},
    ],
)
def test_plain_values_cross_the_channel_unchanged(value):
    back = channel.decode(json.loads(json.dumps(channel.encode(value))))
    if isinstance(value, torch.Tensor):
        assert back.dtype == value.dtype and torch.equal(back, value)
    else:
        assert repr(back) == repr(value)


def test_anything_else_crosses_only_as_its_type_name():
    class Sneaky:
        def __reduce__(self):
            raise AssertionError("never pickled")

    back = channel.decode(json.loads(json.dumps(channel.encode(Sneaky()))))
    assert type(back).__name__ == "Sneaky" and isinstance(back, channel.Opaque)


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        ({"tensor": "torch.float32", "shape": [2], "data": "AAAA"}, "with 3 bytes"),
        ({"tensor": "object", "shape": [1], "data": ""}, "dtype 'object'"),
        ({"tensor": "torch.float32", "shape": [-1], "data": ""}, "shape [-1]"),
        ({"numpy": "object", "value": "1"}, "numpy type 'object'"),
        ({"numpy": "int64", "value": "__import__('os')"}, "numpy int64 of"),
        ({"dict": [[{"list": []}, 1]]}, "not hashable"),
        ({"exec": "print(1)"}, "not a value"),
        (1.5, "not a value"),
    ],
)
def test_a_malformed_value_from_a_worker_is_refused_by_name(frame, words):
    with pytest.raises(channel.FrameError, match=re.escape(words)):
        channel.decode(frame)


def test_a_state_that_points_at_nothing_is_refused():
    with pytest.raises(channel.FrameError, match="reference 7 to nothing"):
        channel.apply_state({"ref": 7}, [[1, 2]])


def test_a_frame_too_large_or_not_json_is_refused_unread():
    import os
    import struct

    r, w = os.pipe()
    os.write(w, struct.pack(">I", channel.MAX_FRAME + 1))
    with pytest.raises(channel.FrameError, match="at most"):
        channel.read_frame(r)
    os.write(w, struct.pack(">I", 3) + b"[1]")
    with pytest.raises(channel.FrameError, match="holding a list"):
        channel.read_frame(r)
    os.close(w)
    with pytest.raises(channel.FrameError, match="closed"):
        channel.read_frame(r)
    os.close(r)
