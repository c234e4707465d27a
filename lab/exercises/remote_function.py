"""A student's function called from the grader: it runs in the worker, its result comes back."""

from __future__ import annotations

import base64
import builtins
import contextlib
import pickle
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import channel
from . import feedback as feedback_module
from .channel import WorkerLost

if TYPE_CHECKING:
    from .submission import Submission

__all__ = [
    "RemoteFunction",
]


class RemoteFunction:
    """Stands for a function of the submission; calling it runs it in the worker.

    The check that calls it sees what it would see in-process: the result (as plain data),
    its arguments as the call left them (updated in place, same objects), an exception of the
    same name and message if the function raised, gradients through a result that needs them,
    and the watches it had running (a forward building B @ A, a count building a model).
    """

    def __init__(self, submission: Submission, handle: int, name: str) -> None:
        self.submission, self.handle, self.__name__ = submission, handle, name

    def __repr__(self) -> str:
        return f"<function {self.__name__} of the submission>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _disable_current_modes():  # the grader's bookkeeping is not the student's code
            roots = (args, kwargs)
            before = channel.walk(roots)
            index = {id(o): i for i, o in enumerate(before)}
            watches, asked = [], []
            for watch in feedback_module.ACTIVE_WATCHES:
                kind = getattr(watch, "kind", None)
                if kind == "builds_delta":
                    a, b = (index.get(id(t)) for t in watch.alive[:2])
                    if a is not None and b is not None:
                        asked.append({"kind": kind, "A": a, "B": b})
                        watches.append(watch)
                elif kind == "builds_modules":
                    asked.append({"kind": kind})
                    watches.append(watch)
            request = {
                "op": "call",
                "handle": self.handle,
                "payload": base64.b64encode(pickle.dumps(roots)).decode(),
                "grad": torch.is_grad_enabled(),
                "watch": asked,
            }
            try:
                reply = self.submission.ask(request, self.submission.call_timeout)
            except WorkerLost as exc:
                raise TimeoutError(f"{self.__name__}: {exc}") from None
            channel.apply_state(reply.get("args"), before)
            seen = reply.get("watch") if isinstance(reply.get("watch"), dict) else {}
            for watch in watches:
                value = seen.get(watch.kind)
                if watch.kind == "builds_delta":
                    watch.built = bool(watch.built or value)
                elif isinstance(value, int):
                    watch.count += value
            if isinstance(reply.get("raised"), dict):
                raise _exception(reply["raised"])
            result = channel.apply_state(reply.get("result"), before)
            call = reply.get("call")
            leaves = [
                i
                for i, o in enumerate(before)
                if isinstance(o, torch.Tensor) and o.requires_grad and o.is_leaf
            ]
        return self._with_grad(result, call, leaves, before)

    def _with_grad(self, result: Any, call: object, leaves: list[int], before: list) -> Any:
        """A result that needs gradients, linked to the grader's tensors through the worker."""

        def link(t: Any, path: int | None) -> Any:
            if not (isinstance(t, torch.Tensor) and t.requires_grad and leaves):
                return t
            meta = (self.submission, call, path, leaves)
            return _RemoteGrad.apply(t.detach(), meta, *(before[i] for i in leaves))

        if isinstance(result, torch.Tensor):
            return link(result, None)
        if isinstance(result, tuple | list):
            linked = [link(t, i) for i, t in enumerate(result)]
            return tuple(linked) if isinstance(result, tuple) else linked
        return result


class _RemoteGrad(torch.autograd.Function):
    """The result of a student's function as a function of the grader's inputs: its backward
    asks the worker for the gradients through the student's own computation."""

    @staticmethod
    def forward(ctx, value, meta, *inputs):  # noqa: ARG004 (inputs: what gradients reach)
        ctx.meta = meta
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        submission, call, path, leaves = ctx.meta
        request = {
            "op": "vjp",
            "call": call,
            "outputs": [path],
            "grads": [channel.encode(grad_out)],
            "inputs": leaves,
        }
        try:
            reply = submission.ask(request, submission.call_timeout)
            grads = reply.get("grads")
            if not isinstance(grads, list) or len(grads) != len(leaves):
                raise RuntimeError(reply.get("error", "no gradients came back"))
            decoded = [None if g is None else channel.decode(g) for g in grads]
        except WorkerLost as exc:
            raise RuntimeError(f"gradients through your function: {exc}") from None
        return (None, None, *decoded)


def _exception(raised: dict) -> BaseException:
    """The student's exception, rebuilt by name and message (never a KeyboardInterrupt:
    that would stop the grader itself)."""
    name, message = str(raised.get("type"))[:80], str(raised.get("message"))[:2000]
    listed = raised.get("bases")
    bases = [str(b) for b in listed] if isinstance(listed, list) else []
    if name == "SystemExit":
        return SystemExit(message)
    for base in [name, *bases]:
        cls = getattr(builtins, base, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            if base == name:
                with contextlib.suppress(Exception):
                    return cls(message)
            safe = name if name.isidentifier() else "Error"
            return type(safe, (cls,), {})(message)
    safe = name if name.isidentifier() else "Error"
    return type(safe, (Exception,), {})(message)
