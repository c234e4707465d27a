"""lab.engine.executors without a Ray running: which executors and RaySession settings are
refused before anything starts, and what is said when Ray is not installed.

RaySession with a Ray running (a local Ray stopped only at the session's own exit, however many
sweeps it is handed to; what it listens on; tasks that fail) is tested in test_remote.py, on that
module's one local Ray: a Ray start costs many CPU seconds, and a second one here would add them.
"""

from __future__ import annotations

import os
import sys

import pytest

from lab.engine.executors import RaySession, check_executor, import_ray
from lab.sweeps import SweepCache, SweepPoint, sweep


def test_bad_executor_settings_are_refused_and_nothing_is_written(tmp_path):
    points = [SweepPoint("rotate", 1, steps=2)]
    cache = SweepCache(tmp_path / "c")
    cases = [
        ({"executor": "dask"}, "executor='dask': expected one of 'local', 'ray'"),
        ({"address": "127.0.0.1:6379"}, "address='127.0.0.1:6379' is for executor='ray'"),
        ({"executor": "ray", "device": "mps"}, "Ray tasks train on 'cpu' or 'cuda'"),
        ({"executor": "ray", "device": "cuda:1"}, "Ray tasks train on 'cpu' or 'cuda'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            sweep(points, cache, progress=False, **kwargs)
    with pytest.raises(ValueError, match="workers=0"):
        RaySession(workers=0)
    with pytest.raises(ValueError, match="a cluster at an address has its own"):
        RaySession("127.0.0.1:6379", workers=2)
    with pytest.raises(ValueError, match="ray address='  ': expected 'HOST:PORT'"):
        RaySession("  ")
    assert check_executor("ray") == "ray"
    assert not (tmp_path / "c").exists()


def test_without_ray_the_executor_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    with pytest.raises(ImportError, match=r"pip install -r requirements-ray\.txt"):
        import_ray()
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"  # switched off before any import
