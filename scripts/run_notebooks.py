"""Execute notebooks in place and strip what must not be committed (widget state, timings noise).

    python scripts/run_notebooks.py                      # every notebook under notebooks/
    python scripts/run_notebooks.py notebooks/05_sweeps.ipynb

The stored outputs become nbval's regression baseline, so run this after editing a notebook.
Prints each notebook's run time; fails loudly if any cell raises.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def run(path: Path) -> float:
    """Run one notebook from its own folder; returns seconds."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        store_widget_state=False,
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nb.metadata.pop("widgets", None)  # widget state never goes into the committed file
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # per-cell timestamps change on every run
    nbformat.write(nb, path)
    return seconds


def main() -> None:
    # Like the tests, never read or write the user's own sweep cache: the stored outputs must
    # come from the shipped default grid alone.
    os.environ["LORA_LAB_CACHE"] = tempfile.mkdtemp(prefix="lora-lab-run-notebooks-")
    # The stored outputs are what nbval compares: no "the machine is busy" line in them, as in
    # the tests (conftest.py).
    os.environ["LORA_LAB_BUSY_NOTICE"] = "0"
    paths = [Path(p) for p in sys.argv[1:]] or sorted((ROOT / "notebooks").rglob("*.ipynb"))
    for path in paths:
        if ".ipynb_checkpoints" in path.parts:
            continue
        print(f"{path}: {run(path):.1f} s", flush=True)


if __name__ == "__main__":
    main()
