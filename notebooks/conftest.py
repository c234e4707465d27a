"""nbval runs the notebooks with a throwaway sweep cache.

The kernel inherits this process's environment, so the notebooks never read or write a user's
cache during the tests (they see only the lab's shipped default grid), and never spend time
measuring batched chunk sizes (lab.calibrate), which would also write the user's cache folder.
"""

import atexit
import os
import shutil
import tempfile

os.environ["LORA_LAB_CACHE"] = tempfile.mkdtemp(prefix="lora-lab-nbval-cache-")
atexit.register(shutil.rmtree, os.environ["LORA_LAB_CACHE"], ignore_errors=True)
os.environ["LORA_LAB_CALIBRATE"] = "0"
