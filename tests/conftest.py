"""Unit tests never touch a user's sweep cache, measure chunk sizes only where a test means to
(lab.engine.calibrate), and draw without a display. Fixtures several test files share live here."""

import atexit
import os
import shutil
import signal
import tempfile

import pytest
from needs import skip_or_fail

os.environ["LORA_LAB_CACHE"] = tempfile.mkdtemp(prefix="lora-lab-test-cache-")
atexit.register(shutil.rmtree, os.environ["LORA_LAB_CACHE"], ignore_errors=True)
os.environ["MPLBACKEND"] = "Agg"
os.environ["LORA_LAB_CALIBRATE"] = "0"  # chunk sizes by the static rule unless a test measures


@pytest.fixture
def bwrap():
    """bubblewrap, the grader's sandbox: a test that starts a submission's worker needs it."""
    if shutil.which("bwrap") is None:
        skip_or_fail("bubblewrap (bwrap) is missing: apt-get install bubblewrap")


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt here, as at a terminal, for the test's length (a test run
    started in the background inherits SIGINT ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture
def open_tmp():
    """A temporary folder another account may enter (0755, outside root's private pytest folder),
    for tests that check a permission as an unprivileged account (needs.run_unprivileged)."""
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="lora-lab-open-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def lora_model():
    """Two linears with rank-2 adapters (alpha 4) whose B is random, as if trained."""
    import torch
    from torch import nn

    from lab.surgery import add_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    add_lora(model, ["0", "2"], rank=2, alpha=4)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_()
    return model
