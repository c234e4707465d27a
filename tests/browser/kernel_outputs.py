"""A JupyterLab kernel's outputs, recorded beside the browser and compared as nbval compares them.

A notebook the browser test runs in JupyterLab is checked there against its stored outputs, under
strict nbval's rules, instead of being run a second time by nbval: `KernelRecorder` subscribes to
the kernel's IOPub channel (every client of a kernel hears every output it publishes) before Run
All, and keeps what nbval would keep of each cell's run: streams, displays, results and errors,
with clear_output ignored and streams merged, as nbval's own run does. `differences()` then
compares each cell with the stored notebook through nbval's own comparison (the same skipped
keys, the same sanitizer file, the `nbval-ignore-output` tag), and returns what differs.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
from jupyter_client import BlockingKernelClient
from nbformat import NotebookNode
from nbval.plugin import IPyNbCell, coalesce_streams, get_sanitize_patterns, nocolors

# What strict nbval leaves out of a comparison (nbval.plugin.IPyNbFile, without nbdime).
SKIP_COMPARE = (
    "metadata",
    "traceback",
    "prompt_number",
    "output_type",
    "name",
    "execution_count",
    "application/vnd.jupyter.widget-view+json",
    "image/png",
    "image/jpeg",
)
KEPT = ("stream", "display_data", "execute_result", "error")  # what nbval records of a cell


class KernelRecorder:
    """Every IOPub message of the kernel whose connection file is given, from `start()` (which
    returns once the subscription is known to hear the kernel) to `stop()`."""

    def __init__(self, connection_file: Path):
        self.client = BlockingKernelClient(connection_file=str(connection_file))
        self.client.load_connection_file()
        self.messages: list[dict] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)

    def start(self, timeout: float = 60.0) -> KernelRecorder:
        self.client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        # A subscription hears nothing published before it is joined: ask the kernel for its
        # info until the busy/idle it publishes for our request arrives here.
        deadline = time.monotonic() + timeout
        while True:
            request = self.client.kernel_info()
            try:
                while True:
                    msg = self.client.get_iopub_msg(timeout=1.0)
                    if msg["parent_header"].get("msg_id") == request:
                        self._thread.start()
                        return self
            except queue.Empty:
                assert time.monotonic() < deadline, "the kernel's IOPub channel stayed silent"

    def _drain(self) -> None:
        while not self._done.is_set():
            try:
                self.messages.append(self.client.get_iopub_msg(timeout=0.2))
            except queue.Empty:
                continue

    def stop(self, timeout: float = 30.0) -> list[dict]:
        """Stop listening once every execution heard of has said it is idle (the kernel publishes
        that after the execution's last output); returns the messages."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._all_idle():
            time.sleep(0.05)
        self._done.set()
        self._thread.join(timeout=10)
        self.client.stop_channels()
        return self.messages

    def _all_idle(self) -> bool:
        started, idle = set(), set()
        for msg in list(self.messages):
            parent = msg["parent_header"].get("msg_id")
            if msg["msg_type"] == "execute_input":
                started.add(parent)
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                idle.add(parent)
        return started <= idle


def cell_runs(messages: list[dict]) -> list[tuple[str, list[NotebookNode]]]:
    """(code, outputs) for each execution, in the order the kernel ran them; the outputs as
    nbval records them."""
    runs: dict[str, tuple[str, list[NotebookNode]]] = {}
    for msg in messages:
        kind, content = msg["msg_type"], msg["content"]
        parent = msg["parent_header"].get("msg_id")
        if kind == "execute_input":
            runs[parent] = (content["code"], [])
        elif kind in KEPT and parent in runs:
            out = NotebookNode(output_type=kind)
            if kind == "stream":
                out.name, out.text = content["name"], content["text"]
            elif kind == "error":
                out.ename, out.evalue = content["ename"], content["evalue"]
                out.traceback = content["traceback"]
            else:
                out.metadata, out.data = content["metadata"], content["data"]
                if kind == "execute_result":
                    out.execution_count = content["execution_count"]
            runs[parent][1].append(out)
    return [(code, coalesce_streams(outs)) for code, outs in runs.values()]


class _Comparer:
    """What nbval's IPyNbCell.compare_outputs reads of its cell: used as that cell here."""

    compare_outputs = IPyNbCell.compare_outputs
    sanitize = IPyNbCell.sanitize
    format_output_compare = IPyNbCell.format_output_compare

    def __init__(self, sanitize_file: Path):
        patterns = dict(get_sanitize_patterns(sanitize_file.read_text()))
        self.parent = SimpleNamespace(skip_compare=SKIP_COMPARE, sanitize_patterns=patterns)
        self.colors = nocolors
        self.config = None
        self.ihook = SimpleNamespace(pytest_assertrepr_compare=lambda **kwargs: [])
        self.comparison_traceback: list[str] = []


def differences(stored: Path, runs: list[tuple[str, list[NotebookNode]]], sanitize: Path):
    """What differs between the notebook at `stored` and `runs` (cell_runs of running it), cell
    by cell, as strict nbval would say it; [] when nothing does."""
    nb = nbformat.read(stored, as_version=4)
    comparer = _Comparer(sanitize)
    problems = []
    pending = list(runs)
    for number, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        if not cell.source.strip():
            continue  # JupyterLab does not send an empty cell to the kernel
        if not pending:
            problems.append(f"cell {number} never ran")
            continue
        code, outputs = pending.pop(0)
        if code != cell.source:
            problems.append(f"cell {number}: the kernel ran other code next: {code[:80]!r}")
            break
        tags = cell.metadata.get("tags", [])
        if "nbval-ignore-output" in tags or cell.execution_count is None:
            continue
        comparer.comparison_traceback = []
        if not comparer.compare_outputs(outputs, coalesce_streams(copy.deepcopy(cell.outputs))):
            problems.append(f"cell {number}: outputs differ\n" + "\n".join(
                comparer.comparison_traceback))  # fmt: skip
    return problems
