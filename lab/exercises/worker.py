"""The process a submission's code runs in while it is graded (``python -m lab.exercises.worker``).

The grader (lab.exercises.autograde) starts it inside the sandbox (lab.exercises.sandbox) and
sends it requests on one pipe; it answers on another, in lab.exercises.channel's frames:

- ``run``: execute one notebook cell in an IPython shell, as a kernel would (magics, display,
  the last expression's value), and send back the cell's outputs;
- ``names``: the values of some names in the notebook (plain data), or a handle for a function;
- ``call``: call one of those functions on arguments the grader pickled, and send back its
  result, what the call did to the arguments, and what the grader asked to watch (did the
  forward build B @ A; did a count build a model);
- ``vjp``: gradients through a result of an earlier call (a check that trains through the
  student's forward needs them).

Nothing here decides a grade: everything this process says is a claim about the submission's
code, which the grader judges with its own checks. A submission that rewrites this file's
functions in its own process can only change what the grader is told its code did.
"""

from __future__ import annotations

import base64
import builtins
import io
import os
import pickle
import sys
import traceback
import types
from typing import Any

__all__ = ["main"]

WATCHED = ("builtins", "torch", "torch.nn", "torch.nn.functional")  # and every lab module
# Besides those, what this file itself relies on: put back (not reported) while it works.
RELIED_ON = ("json", "pickle", "base64", "struct", "os", "io", "types", "traceback", "select")
MAX_TEXT = 200_000  # characters of one cell's text output sent back
KEEP_CALLS = 8  # results kept for gradients (a check asks right after its call)


def _watched_modules() -> dict[str, object]:
    names = [n for n in sys.modules if n == "lab" or n.startswith("lab.")]
    return {n: sys.modules[n] for n in (*WATCHED, *names) if n in sys.modules}


def _snapshot(modules: dict[str, object]) -> dict[str, dict[str, object]]:
    return {name: dict(vars(m)) for name, m in modules.items()}


class _World:
    """The modules this process relies on, as they were before the submission ran.

    The submission's code runs in the world it made (a rebound torch.allclose is its own
    business); this file's own work (reading a request, describing a result) runs with the
    modules put back as they were, so a submission that rebinds builtins or json cannot garble
    what the grader is told, only what its own functions compute.
    """

    def __init__(self, modules: dict[str, object]) -> None:
        self.modules = modules
        self.clean = _snapshot(modules)

    def put_back(self) -> dict[str, object]:
        """Restore the clean modules; what the submission had made, to restore it after."""
        saved: dict[str, object] = {"sys.modules": {n: sys.modules.get(n) for n in self.modules}}
        for name, module in self.modules.items():
            now = vars(module)
            saved[name] = dict(now)
            for key, value in self.clean[name].items():
                if now.get(key, self) is not value:
                    now[key] = value
            sys.modules[name] = module
        return saved

    def give_back(self, saved: dict[str, object]) -> None:
        for name, module in self.modules.items():
            now = vars(module)
            now.update(saved[name])
            for key in [k for k in now if k not in saved[name]]:
                del now[key]
        for name, module in saved["sys.modules"].items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _changes(modules: dict[str, object], before: dict[str, dict[str, object]]) -> list[str]:
    """Names the submission rebound, added or deleted in the lab's, torch's or builtins' modules.

    torch fills some in itself as it goes (a submodule imported on first use, a function wrapped
    by its compiler when that loads): those are not the submission's doing.
    """
    found = []
    missing = object()
    for name, module in modules.items():
        if sys.modules.get(name) is not module:
            found.append(f"sys.modules[{name!r}]")
            continue
        now, old = vars(module), before[name]
        for key in sorted(set(now) | set(old)):
            new, was = now.get(key, missing), old.get(key, missing)
            if new is was or key.startswith("__"):
                continue
            if was is missing and isinstance(new, types.ModuleType):
                continue  # a submodule imported on first use
            if getattr(new, "__wrapped__", None) is was:
                continue  # torch wrapping its own function
            found.append(f"{name}.{key}")
    return found


class _Outputs:
    """A cell's outputs in nbformat's shape, collected while it runs."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.size = 0

    def stream(self, name: str, text: str) -> None:
        if self.size > MAX_TEXT or not text:
            return
        text = text[: MAX_TEXT - self.size]
        self.size += len(text)
        if self.items and self.items[-1].get("name") == name:
            self.items[-1]["text"] += text
        else:
            self.items.append({"output_type": "stream", "name": name, "text": text})

    def data(self, kind: str, data: dict, metadata: dict, count: int | None = None) -> None:
        clean = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}
        clean = {k: v[:MAX_TEXT] for k, v in clean.items()}
        out = {"output_type": kind, "data": clean, "metadata": {}}
        if kind == "execute_result":
            out["execution_count"] = count
        self.items.append(out)


class _Stream(io.TextIOBase):
    def __init__(self, name: str, sink: list) -> None:
        self.name, self.sink = name, sink

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.sink and isinstance(text, str):
            self.sink[0].stream(self.name, text)
        return len(text) if isinstance(text, str) else 0


def _shell(sink: list):
    """An IPython shell whose outputs go to the current cell's collector (sink[0])."""
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    class Hook(DisplayHook):
        def write_output_prompt(self) -> None:
            pass

        def write_format_data(self, format_dict, md_dict=None) -> None:
            if sink:
                sink[0].data("execute_result", format_dict, md_dict or {}, self.prompt_count)

    class Publisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kw):
            if sink:
                sink[0].data("display_data", data, metadata or {})

    class Shell(InteractiveShell):
        def _showtraceback(self, etype, evalue, stb) -> None:
            if sink:
                sink[0].items.append(
                    {
                        "output_type": "error",
                        "ename": getattr(etype, "__name__", "Error"),
                        "evalue": str(evalue)[:2000],
                        "traceback": [str(line)[:2000] for line in stb][-30:],
                    }
                )

    shell = Shell.instance(displayhook_class=Hook, display_pub_class=Publisher, colors="NoColor")
    shell.history_manager.enabled = False
    return shell


def main() -> int:
    requests, replies = int(sys.argv[1]), int(sys.argv[2])
    # The grader's own helpers, taken before any of the submission's code runs.
    import torch

    import lab
    from lab.exercises import channel, count_check, forward_check

    # `import lab` loads each public name on first use. Load them all before the snapshot, so
    # that a name the lab loads later is not taken for one the submission added.
    for name in lab.__all__:
        getattr(lab, name)

    builds_delta, builds_modules = forward_check._BuildsDelta, count_check._BuildsModules
    write, read, encode = channel.write_frame, channel.read_frame, channel.encode
    walk, describe = channel.walk, channel.describe_state
    loads, b64decode = pickle.loads, base64.b64decode

    sink: list[_Outputs] = []
    sys.stdout, sys.stderr = _Stream("stdout", sink), _Stream("stderr", sink)
    shell = _shell(sink)
    shell.run_cell("%matplotlib inline", store_history=False, silent=True)
    modules = _watched_modules()
    snapshot = _snapshot(modules)
    handles: dict[int, Any] = {}
    calls: dict[int, tuple[Any, list[Any]]] = {}
    count = 0

    def value_of(name: str) -> Any:
        ns = shell.user_ns
        if name not in ns:
            return {"missing": True}
        value = ns[name]
        # A function is called where it lives; a model, a tensor or a class comes as data.
        if callable(value) and not isinstance(value, type | torch.Tensor | torch.nn.Module):
            handles[id(value)] = value
            return {"callable": id(value), "type": type(value).__name__}
        return encode(value)

    world = _World({**modules, **{n: sys.modules[n] for n in RELIED_ON if n in sys.modules}})

    def student(code: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the submission's code in the world it made, then put the clean one back."""
        world.give_back(saved)
        try:
            return code(*args, **kwargs)
        finally:
            saved.update(world.put_back())

    saved = world.put_back()
    while True:
        try:
            request = read(requests)
        except channel.FrameError:
            return 0
        op = request.get("op")
        if op == "exit":
            return 0
        if op == "run":
            sink[:] = [_Outputs()]
            count += 1
            result = student(shell.run_cell, request["source"], store_history=True)
            outputs = sink[0].items
            sink.clear()
            world.give_back(saved)
            changed = _changes(modules, snapshot)
            saved.update(world.put_back())
            write(
                replies,
                {
                    "id": request.get("id"),
                    "outputs": outputs,
                    "ok": bool(result.success),
                    "changed": changed,
                },
            )
        elif op == "names":
            write(
                replies,
                {"id": request.get("id"), "values": {n: value_of(n) for n in request["names"]}},
            )
        elif op == "call":
            fn = handles.get(request["handle"])
            args, kwargs = loads(b64decode(request["payload"]))
            before = walk((args, kwargs))
            watch = request.get("watch", [])
            reply: dict[str, Any] = {"watch": {}}
            torch.set_grad_enabled(bool(request.get("grad", True)))
            try:
                contexts = []
                for w in watch:
                    if w["kind"] == "builds_delta":
                        watcher = builds_delta(before[w["A"]], before[w["B"]])
                        contexts.append(("builds_delta", watcher))
                    elif w["kind"] == "builds_modules":
                        contexts.append(("builds_modules", builds_modules()))
                for _, ctx in contexts:
                    ctx.__enter__()
                try:
                    sink[:] = [_Outputs()]  # what the function prints is not sent
                    out = student(fn, *args, **kwargs)
                finally:
                    sink.clear()
                    for kind, ctx in reversed(contexts):
                        ctx.__exit__(None, None, None)
                        reply["watch"][kind] = (
                            bool(ctx.built) if kind == "builds_delta" else int(ctx.count)
                        )
                count += 1
                calls[count] = (out, before)
                for old in [k for k in calls if k <= count - KEEP_CALLS]:
                    del calls[old]
                reply["call"] = count
                reply["result"] = describe(out, before)
            except BaseException as exc:  # the student's exception is the answer's behaviour
                reply["raised"] = {
                    "type": str(getattr(type(exc), "__name__", "Exception")),
                    "bases": [str(getattr(c, "__name__", "")) for c in type(exc).__mro__],
                    "message": _text(exc),
                }
            reply["args"] = describe((args, kwargs), before)
            torch.set_grad_enabled(True)
            write(replies, {"id": request.get("id"), **reply})
        elif op == "vjp":
            out, before = calls.get(request.get("call"), (None, []))
            try:
                outputs = [out if p is None else out[p] for p in request["outputs"]]
                grads_out = [channel.decode(g) for g in request["grads"]]
                inputs = [before[i] for i in request["inputs"]]
                grads = student(
                    torch.autograd.grad,
                    outputs,
                    inputs,
                    grads_out,
                    allow_unused=True,
                    retain_graph=True,
                )
                write(
                    replies,
                    {
                        "id": request.get("id"),
                        "grads": [None if g is None else encode(g) for g in grads],
                    },
                )
            except BaseException as exc:
                write(
                    replies,
                    {"id": request.get("id"), "error": f"{type(exc).__name__}: {_text(exc)[:500]}"},
                )
        else:
            write(replies, {"id": request.get("id"), "error": f"unknown request {op!r}"})


def _text(exc: BaseException) -> str:
    """An exception's message, even one whose __str__ is broken on purpose."""
    try:
        return str(exc)[:2000]
    except BaseException:  # noqa: BLE001 (a student's exception class may raise here)
        return "(its message could not be read)"


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:
        builtins.print(traceback.format_exc(), file=sys.__stderr__)
        code = 70
    os._exit(code)
