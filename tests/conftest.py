"""Unit tests never touch a user's sweep cache and draw without a display."""

import os
import tempfile

os.environ["LORA_LAB_CACHE"] = tempfile.mkdtemp(prefix="lora-lab-test-cache-")
os.environ["MPLBACKEND"] = "Agg"
