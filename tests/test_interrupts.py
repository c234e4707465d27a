"""lab.interrupts.kept: an error that leaves its block after a Ctrl-C leaves as the Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from needs import swallowed_ctrl_c

from lab.interrupts import kept

pytestmark = pytest.mark.usefixtures("ctrl_c_raises")


def test_an_error_c_code_raised_for_a_swallowed_ctrl_c_leaves_as_the_ctrl_c():
    with pytest.raises(KeyboardInterrupt) as caught, kept():
        swallowed_ctrl_c()
    assert isinstance(caught.value.__cause__, ValueError)  # what was swallowed, kept for a reader
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_without_a_ctrl_c_an_error_leaves_unchanged_and_the_handler_is_put_back():
    with pytest.raises(ValueError, match="corrupt"), kept():
        raise ValueError("a corrupt file")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with kept():
        value = 1
    assert value == 1


def test_a_plain_ctrl_c_leaves_as_itself_and_nested_blocks_both_see_it():
    with pytest.raises(KeyboardInterrupt) as caught, kept():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert caught.value.__cause__ is None
    with pytest.raises(KeyboardInterrupt), kept(), kept():
        swallowed_ctrl_c()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_or_with_sigint_ignored_the_block_runs_unchanged():
    seen = []

    def in_a_thread():
        try:
            with kept():
                raise ValueError("from a thread")
        except ValueError as exc:
            seen.append(exc)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert [str(e) for e in seen] == ["from a thread"]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with pytest.raises(ValueError), kept():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # nothing installed
        raise ValueError("ignored SIGINT")
