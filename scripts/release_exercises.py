"""Rebuild notebooks/exercises/student.ipynb as nbgrader's release of the exercises, executed.

    python scripts/release_exercises.py

The source is course/lora_by_hand.ipynb, the answer key (the assignment `lora_by_hand` in
nbgrader's format; it stays out of notebooks/, the students' copy). This makes a throwaway nbgrader
course, runs `nbgrader generate_assignment` there, copies the release over student.ipynb and
executes it (its outputs are nbval's baseline: each check's "not yet" for the empty answers).
tests/exercises/test_grading.py regenerates the release and fails if student.ipynb's cells differ
from it, so edit the answer key and rerun this, never the student notebook by hand. Run
scripts/run_notebooks.py on course/lora_by_hand.ipynb first if its outputs changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lab.exercises.course import STUDENT, generate_release, make_course

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    os.environ["LORA_LAB_CACHE"] = tempfile.mkdtemp(prefix="lora-lab-release-")
    os.environ["LORA_LAB_BUSY_NOTICE"] = "0"  # the stored outputs must not depend on the load
    with tempfile.TemporaryDirectory(prefix="lora-lab-course-") as course:
        make_course(Path(course))
        release = generate_release(Path(course))
        tmp = STUDENT.with_name(f".{STUDENT.name}.tmp")
        shutil.copyfile(release, tmp)
        os.replace(tmp, STUDENT)
    print(f"{STUDENT}: released; executing it")
    # run_notebooks executes it in place and strips what must not be committed, as for the others.
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_notebooks.py"), str(STUDENT)], check=True
    )


if __name__ == "__main__":
    main()
