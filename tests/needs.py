"""The house rule for what a test needs from the machine (root, a tool, a browser): without it
the test is skipped with a hint, except under CI=true, where it fails, so that CI never passes by
skipping what it was meant to run."""

from __future__ import annotations

import os
import signal

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def skip_or_fail(message: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


def interruptible() -> None:
    """A `preexec_fn` for a child process a test interrupts (Ctrl-C, SIGINT): SIGINT back to its
    default, so that Python there raises KeyboardInterrupt as at a terminal. A test run started
    in the background inherits SIGINT ignored, and Python then never installs its handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
