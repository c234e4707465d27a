"""RaySession on its own: entered again by the sweeps it is handed to, Ray stops at its own exit.

Run in a fresh Python with its own HOME: tests/engine/test_remote.py's module-wide Ray leaves its
auth token cached in the test process, which a second Ray there would not accept.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

# test_remote skips without Ray (and fails under CI=true), so this module does the same.
from test_remote import MARK, ROOT, ray_temp, wait_gone

SCRIPT = textwrap.dedent(
    """
    import sys
    import ray
    from lab.engine.executors import RaySession
    from lab.sweeps import SweepCache, SweepPoint, sweep

    points = [SweepPoint("rotate", 1, steps=2, batch_size=8)]
    with RaySession(workers=1, temp_dir=sys.argv[2]) as session:
        started = session.startup_seconds
        sweep(points, SweepCache(sys.argv[1] + "/a"), progress=False, executor=session)
        assert ray.is_initialized(), "the first sweep stopped a Ray it did not start"
        assert session.startup_seconds == started, "the start-up was timed again"
        sweep(points, SweepCache(sys.argv[1] + "/b"), progress=False, executor=session)
    assert not ray.is_initialized(), "Ray still up after the session's own exit"
    print(f"started in {started:.1f} s")
    """
)


def test_a_session_handed_to_several_sweeps_stops_ray_only_at_its_own_exit(tmp_path: Path):
    mark = uuid.uuid4().hex
    env = {**os.environ, "HOME": str(tmp_path / "home"), MARK: mark, "PYTHONPATH": str(ROOT),
           "LORA_LAB_CACHE": str(tmp_path / "cache")}  # fmt: skip
    try:
        run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(ray_temp(mark))],
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.startswith("started in ")
        assert len(list(tmp_path.glob("[ab]/*.json"))) == 2  # both sweeps trained and cached
        assert wait_gone(mark) == []
    finally:
        shutil.rmtree(ray_temp(mark), ignore_errors=True)
