"""lab.engine.devices: the device a sweep trains on."""

from __future__ import annotations

import pytest
import torch

from lab.sweeps import (
    SweepCache,
    SweepPoint,
    sweep,
)
from tests.fakes import TINY, CountingTrainer


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_refused_before_training(tmp_path):
    trainer = CountingTrainer()
    with pytest.raises(ValueError, match="CUDA is not available"):
        sweep([SweepPoint(**TINY)], SweepCache(tmp_path), progress=False, run_fn=trainer,
              device="cuda")  # fmt: skip
    assert trainer.calls == []
