"""Unit tests never touch a user's sweep cache and draw without a display."""

import atexit
import os
import shutil
import tempfile

os.environ["LORA_LAB_CACHE"] = tempfile.mkdtemp(prefix="lora-lab-test-cache-")
atexit.register(shutil.rmtree, os.environ["LORA_LAB_CACHE"], ignore_errors=True)
os.environ["MPLBACKEND"] = "Agg"
