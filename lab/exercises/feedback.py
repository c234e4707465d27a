"""What every exercise checker shares: the verdict a cell shows, and running a student's code.

A checker never raises on a wrong answer (None, a stub that raises, wrong shapes or types): it
returns a `Feedback` whose repr is "passed: ..." or "not yet: ...", so a notebook cell that ends
with the check shows it.
"""

from __future__ import annotations

import functools
import html
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Feedback:
    """A checker's verdict; its repr ("passed: ..." or "not yet: ...") is what a cell shows."""

    passed: bool
    message: str

    def __str__(self) -> str:
        return f"{'passed' if self.passed else 'not yet'}: {self.message}"

    __repr__ = __str__  # what a notebook cell ending with a check displays

    def _repr_html_(self) -> str:
        """The same text for JupyterLab, wrapped between words.

        JupyterLab's plain-text output breaks long lines at any character (word-break:
        break-all), splitting words; this keeps line breaks and table columns but wraps at spaces.
        """
        style = (
            "white-space: pre-wrap; word-break: normal; overflow-wrap: break-word; "
            "font-family: var(--jp-code-font-family, monospace); "
            "font-size: var(--jp-code-font-size, 13px)"
        )
        return f'<div class="lab-feedback" style="{style}">{html.escape(str(self))}</div>'


# The watches a check has running (a forward building B @ A, a count building a model). When the
# grader calls a student's function in another process (lab.exercises.autograde), it asks that
# process to run the same watches there and reports what they saw back into these.
ACTIVE_WATCHES: list = []


def _no(message: str) -> Feedback:
    return Feedback(False, message)


def _describe(exc: BaseException) -> str:
    """'TypeError: first line of the message', kept short."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _raised(name: str, exc: BaseException, call: str) -> str:
    """What to say when the student's code raised `exc` (anything but KeyboardInterrupt)."""
    if isinstance(exc, SystemExit):
        return (
            f"{name} raised SystemExit (sys.exit() or exit() was called): a function should "
            "return its answer, not stop the program"
        )
    text = str(exc)
    if isinstance(exc, TypeError) and any(
        w in text for w in ("positional argument", "unexpected keyword", "required keyword")
    ):
        return f"{name} raised {_describe(exc)}. The check calls it as {call}"
    return f"{name} raised {_describe(exc)}"


class _KeepTorchState:
    """Restore torch's global settings a student's function may have changed."""

    def __enter__(self) -> None:
        self.grad, self.dtype = torch.is_grad_enabled(), torch.get_default_dtype()

    def __exit__(self, *exc: object) -> None:
        torch.set_grad_enabled(self.grad)
        torch.set_default_dtype(self.dtype)


def _call(
    fn: object,
    name: str,
    todo: str,
    *args: object,
    hints: dict[str, str] | None = None,
    call: str = "",
) -> tuple[object, Feedback | None]:
    """(fn(*args), None), or (None, feedback) if fn is not a function, is the stub, or raises.

    `hints` maps a word of the exception's text to advice appended to the feedback; `call` shows
    how the check calls fn (for a wrong signature). Anything the student's code raises, SystemExit
    included, becomes feedback; only KeyboardInterrupt (the user's own stop) goes through.
    """
    if not callable(fn):
        return None, _no(f"{name} should be a function, got {type(fn).__name__}. {todo}")
    try:
        with warnings.catch_warnings(), _KeepTorchState():
            warnings.simplefilter("ignore")  # the student's warnings would litter the output
            return fn(*args), None
    except KeyboardInterrupt:
        raise
    except NotImplementedError:
        return None, _no(f"{name} is still the stub (it raises NotImplementedError). {todo}")
    except BaseException as exc:  # a wrong answer is feedback, never an error in the notebook
        advice = [f". {tip}" for word, tip in (hints or {}).items() if word in str(exc)]
        return None, _no(_raised(name, exc, call or f"{name}(...)") + "".join(advice[:1]))


def _safe(check: Callable[..., Feedback]) -> Callable[..., Feedback]:
    """Wrap a checker so that an answer which breaks the checking itself is feedback too."""

    @functools.wraps(check)
    def wrapper(*args: object, **kwargs: object) -> Feedback:
        try:
            with _KeepTorchState():
                return check(*args, **kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # e.g. a layer whose .base the student replaced by None
            return _no(
                f"your answer could not be checked ({_describe(exc)}): is it what was asked?"
            )

    return wrapper
