"""kernel_outputs: a kernel's outputs recorded by a second client, compared as strict nbval does.

No browser: a kernel of its own, and a client playing JupyterLab's part (it sends the cells); the
recorder listens beside it as it does beside a real JupyterLab in test_lab.py.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager
from kernel_outputs import KernelRecorder, cell_runs, differences
from nbformat.v4 import new_code_cell, new_notebook, new_output

SANITIZE = Path(__file__).resolve().parents[1] / "nbval" / "sanitize.cfg"
CELLS = [
    "print('loss 0.25')\nprint('steps', 3)",
    "from IPython.display import clear_output\nprint('drawn, then cleared')\nclear_output()\n6 * 7",
    "import time\nprint('took', time.time())",
    "",  # JupyterLab sends no empty cell to the kernel
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The cells run in a fresh kernel by a 'frontend' client, as recorded beside it."""
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path_factory.mktemp("kernel")))
    front = km.client()
    try:
        front.start_channels()
        front.wait_for_ready(timeout=120)
        recorder = KernelRecorder(Path(km.connection_file)).start()
        for code in CELLS:
            if code.strip():
                reply = front.execute_interactive(code, timeout=120, output_hook=lambda m: None)
                assert reply["content"]["status"] == "ok", reply["content"]
        return cell_runs(recorder.stop())
    finally:
        front.stop_channels()
        km.shutdown_kernel(now=True)


def stored(tmp_path, first="loss 0.25\nsteps 3\n", result="42", third_tags=()):
    """The notebook as its stored outputs would have it."""
    cells = [new_code_cell(code, execution_count=i + 1) for i, code in enumerate(CELLS)]
    cells[0].outputs = [new_output("stream", name="stdout", text=first)]
    # nbval ignores clear_output: what was printed before it is still compared.
    cells[1].outputs = [
        new_output("stream", name="stdout", text="drawn, then cleared\n"),
        new_output("execute_result", data={"text/plain": result}, execution_count=2),
    ]
    cells[2].outputs = [new_output("stream", name="stdout", text="took 1.0\n")]
    cells[2].metadata["tags"] = list(third_tags)
    path = tmp_path / "stored.ipynb"
    nbformat.write(new_notebook(cells=cells), path)
    return path


def test_the_outputs_a_run_printed_match_its_stored_outputs(runs, tmp_path):
    assert [code for code, _ in runs] == [c for c in CELLS if c.strip()]
    assert differences(stored(tmp_path, third_tags=["nbval-ignore-output"]), runs, SANITIZE) == []


def test_a_changed_number_or_result_is_named_with_both_values(runs, tmp_path):
    tag = ["nbval-ignore-output"]
    problems = differences(stored(tmp_path, first="loss 0.26\nsteps 3\n", third_tags=tag), runs,
                           SANITIZE)  # fmt: skip
    assert len(problems) == 1 and problems[0].startswith("cell 0: outputs differ"), problems
    assert "loss 0.26" in problems[0] and "loss 0.25" in problems[0]
    problems = differences(stored(tmp_path, result="41", third_tags=tag), runs, SANITIZE)
    assert len(problems) == 1 and "cell 1" in problems[0] and "41" in problems[0], problems


def test_an_output_that_changes_from_run_to_run_differs_unless_tagged(runs, tmp_path):
    problems = differences(stored(tmp_path), runs, SANITIZE)  # the clock's reading
    assert len(problems) == 1 and problems[0].startswith("cell 2: outputs differ"), problems


def test_a_cell_that_never_ran_or_ran_other_code_is_reported(runs, tmp_path):
    path = stored(tmp_path, third_tags=["nbval-ignore-output"])
    assert differences(path, runs[:1], SANITIZE) == ["cell 1 never ran", "cell 2 never ran"]
    swapped = [runs[1], runs[0], runs[2]]
    assert differences(path, swapped, SANITIZE)[0].startswith("cell 0: the kernel ran other code")
