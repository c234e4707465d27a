"""Ctrl-C stays Ctrl-C, even when it lands inside C code that swallows it.

Python raises KeyboardInterrupt at the next line of Python after SIGINT arrives. When that line
runs inside a call back from C code (torch building a tensor from the buffer safetensors hands
it, for one), the C code may clear the KeyboardInterrupt and raise an error of its own instead:
"could not determine the shape of object type 'torch.storage.UntypedStorage'". A caller would then
report a Ctrl-C as a corrupt base model file, or a sweep as failed instead of interrupted.

`kept()` watches for SIGINT during its block; an error that leaves the block after one arrived
leaves it as the KeyboardInterrupt it was (the swallowed error chained to it).

    with kept():
        tensors = {k: f.get_tensor(k) for k in f.keys()}
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["kept"]


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """Raise KeyboardInterrupt for an error ending the block after a SIGINT arrived in it.

    Only in the main thread (where Python runs signal handlers) and only while SIGINT has a
    Python handler (the default one, or a kernel's); elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # ignored, or the OS default: no KeyboardInterrupt to lose
        yield
        return
    arrived: list[int] = []

    def note(signum, frame):
        arrived.append(signum)
        previous(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield
    except Exception as exc:
        if arrived:
            raise KeyboardInterrupt from exc
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
