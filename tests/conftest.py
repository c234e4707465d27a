"""Unit tests never touch a user's sweep cache, measure chunk sizes only where a test means to
(lab.calibrate), and draw without a display."""

import atexit
import os
import shutil
import tempfile

os.environ["LORA_LAB_CACHE"] = tempfile.mkdtemp(prefix="lora-lab-test-cache-")
atexit.register(shutil.rmtree, os.environ["LORA_LAB_CACHE"], ignore_errors=True)
os.environ["MPLBACKEND"] = "Agg"
os.environ["LORA_LAB_CALIBRATE"] = "0"  # chunk sizes by the static rule unless a test measures
