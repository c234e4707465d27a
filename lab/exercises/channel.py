"""How the grader and a submission's process talk: frames of JSON, and objects kept in step.

The grader (lab.exercises.autograde) never runs a student's code; a worker process
(lab.exercises.worker) does. To check a function, the grader calls it through the worker: the
arguments go there pickled (the grader's own objects: the worker trusts them), and what comes
back is JSON of plain data only, which the grader reads without running anything the worker
sent: numbers, strings, lists and dicts, tensors as raw bytes with their dtype and shape, and
for anything else only its type's name. So whatever a submission does in its own process, the
grader sees values, and the verdict is computed from them by the grader's own, untouched checks.

A check also looks at what a call did to its arguments: a forward that changed its input in
place, a merge that replaced the weight instead of updating it, a layer whose `merged` flag was
set. So after each call the worker describes the arguments again, object by object: each object
that was there before is named by its place in a walk that both sides take in the same order,
with its new contents; the grader writes those contents into its own objects, which keep their
identity (a weight updated in place is still the same tensor on the grader's side; a weight the
student replaced is a new one there too).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import struct
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

__all__ = [
    "FrameError",
    "WorkerLost",
    "Opaque",
    "apply_state",
    "decode",
    "describe_state",
    "encode",
    "read_frame",
    "walk",
    "write_frame",
]

MAX_FRAME = 64 * 2**20  # bytes: a reply larger than this is refused, not read
MAX_DEPTH = 64  # nesting of lists, dicts and objects in one value
DTYPES = {
    str(d): d
    for d in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
        torch.complex64,
        torch.complex128,
    )
}


class FrameError(RuntimeError):
    """The other side sent something that is not a valid frame (or closed the channel)."""


# ---------------------------------------------------------------------------------------------
# Frames: 4-byte length, then UTF-8 JSON
# ---------------------------------------------------------------------------------------------


def write_frame(fd: int, message: dict) -> None:
    import os

    data = json.dumps(message, allow_nan=True).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data) :]


def _read_exact(fd: int, n: int) -> bytes:
    import os

    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 2**20))
        if not chunk:
            raise FrameError("the channel closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> dict:
    (size,) = struct.unpack(">I", _read_exact(fd, 4))
    if size > MAX_FRAME:
        raise FrameError(f"a frame of {size:,} bytes (at most {MAX_FRAME:,})")
    try:
        message = json.loads(_read_exact(fd, size))
    except (ValueError, RecursionError) as exc:
        raise FrameError(f"a frame that is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise FrameError(f"a frame holding a {type(message).__name__}, not an object")
    return message


# ---------------------------------------------------------------------------------------------
# Values: plain data only
# ---------------------------------------------------------------------------------------------


class Opaque:
    """Something the worker returned that is not plain data: only its type's name came back.

    A check then says what it says about any wrong type ("returned a Foo; expected ...").
    """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} from the submission>"


@functools.cache
def _opaque_type(name: str) -> type:
    safe = name if name.isidentifier() else "object"
    return type(safe, (Opaque,), {})


def _tensor(t: torch.Tensor) -> dict:
    requires_grad = bool(getattr(t, "requires_grad", False))
    t = t.detach().cpu()
    if t.is_sparse or t.layout != torch.strided or str(t.dtype) not in DTYPES:
        return {"opaque": type(t).__name__}
    flat = t.contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {
        "tensor": str(t.dtype),
        "shape": list(t.shape),
        "data": base64.b64encode(raw).decode(),
        "requires_grad": requires_grad,
    }


def encode(value: Any, depth: int = 0) -> Any:
    """A value as plain JSON (the worker's side); see `decode`."""
    if depth > MAX_DEPTH:
        return {"opaque": "deeply nested value"}
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int) and type(value) in (int,):
        return value
    if isinstance(value, float) and type(value) is float:
        return {"float": repr(value)}
    if isinstance(value, torch.Tensor):
        out = _tensor(value)
        if isinstance(value, nn.Parameter):
            out["parameter"] = True
        return out
    if isinstance(value, tuple | list):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [encode(v, depth + 1) for v in value]}
    if isinstance(value, dict) and type(value) in (dict, OrderedDict):
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if type(value) in (set, frozenset):
        return {type(value).__name__: [encode(v, depth + 1) for v in value]}
    numpy_value = _numpy(value)
    if numpy_value is not None:
        return numpy_value
    return {"opaque": type(value).__name__}


def _numpy(value: Any) -> dict | None:
    """A numpy scalar keeps its dtype (a numpy int is a whole number to a check); an array
    comes back as a tensor."""
    module = type(value).__module__ or ""
    if not module.startswith("numpy"):
        return None
    import numpy as np

    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return {"numpy": value.dtype.name, "value": repr(value.item())}
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        try:
            return _tensor(torch.from_numpy(value.copy()))
        except TypeError:
            return None
    return None


def decode(value: Any, depth: int = 0) -> Any:
    """Plain JSON back into values (the grader's side): no code runs, whatever was sent."""
    if depth > MAX_DEPTH:
        raise FrameError("a value nested too deeply")
    if value is None or isinstance(value, bool | str | int) and not isinstance(value, float):
        return value
    if not isinstance(value, dict) or len(value) < 1:
        raise FrameError(f"not a value: {str(value)[:80]}")
    if "float" in value:
        return float(value["float"])  # repr of a float, inf and nan included
    if "tensor" in value:
        return _decode_tensor(value)
    if "tuple" in value or "list" in value:
        items = value.get("tuple", value.get("list"))
        if not isinstance(items, list):
            raise FrameError("a sequence that is not a list")
        out = [decode(v, depth + 1) for v in items]
        return tuple(out) if "tuple" in value else out
    if "set" in value or "frozenset" in value:
        items = value.get("set", value.get("frozenset"))
        if not isinstance(items, list):
            raise FrameError("a set that is not a list")
        try:
            out = {decode(v, depth + 1) for v in items}
        except TypeError:
            raise FrameError("a set of unhashable values") from None
        return out if "set" in value else frozenset(out)
    if "dict" in value:
        pairs = value["dict"]
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 for p in pairs
        ):
            raise FrameError("a dict that is not a list of pairs")
        out = {}
        for k, v in pairs:
            key = decode(k, depth + 1)
            try:
                hash(key)
            except TypeError:
                raise FrameError("a dict key that is not hashable") from None
            out[key] = decode(v, depth + 1)
        return out
    if "numpy" in value:
        import numpy as np

        name = value["numpy"]
        if name not in {"bool", *(f"{k}{b}" for k in ("int", "uint") for b in (8, 16, 32, 64))} | {
            "float16",
            "float32",
            "float64",
        }:
            raise FrameError(f"a numpy type {name!r}")
        text = str(value.get("value"))
        try:
            if name == "bool":
                number = text == "True"
            else:
                number = float(text) if name.startswith("float") else int(text)
        except ValueError:
            raise FrameError(f"a numpy {name} of {text[:40]!r}") from None
        return np.dtype(name).type(number)
    if "opaque" in value:
        return _opaque_type(str(value["opaque"])[:80])()
    raise FrameError(f"not a value: {str(value)[:80]}")


def _decode_tensor(value: dict) -> torch.Tensor:
    dtype = DTYPES.get(value.get("tensor"))
    shape = value.get("shape")
    if (
        dtype is None
        or not isinstance(shape, list)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise FrameError(f"a tensor of dtype {value.get('tensor')!r}, shape {shape!r}")
    raw = base64.b64decode(str(value.get("data", "")), validate=True)
    numel = 1
    for n in shape:
        numel *= n
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != numel * itemsize:
        raise FrameError(f"a tensor of shape {shape} with {len(raw)} bytes")
    if numel == 0:
        t = torch.empty(shape, dtype=dtype)
    else:
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape).clone()
    if value.get("parameter"):
        grad = bool(value.get("requires_grad")) and t.is_floating_point()
        return nn.Parameter(t, requires_grad=grad)
    if value.get("requires_grad") and (t.is_floating_point() or t.is_complex()):
        t.requires_grad_(True)
    return t


# ---------------------------------------------------------------------------------------------
# Objects kept in step: a walk both sides take in the same order
# ---------------------------------------------------------------------------------------------


def _children(obj: Any) -> list[Any]:
    """What the walk visits inside `obj`, in an order pickling preserves."""
    if isinstance(obj, torch.Tensor):
        return []
    if isinstance(obj, list | tuple):
        return list(obj)
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, functools.partial):
        return [*obj.args, *obj.keywords.values()]
    if isinstance(obj, nn.Module) or dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return list(getattr(obj, "__dict__", {}).values())
    return []


def _mutable(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor | list | dict | nn.Module | functools.partial) or (
        dataclasses.is_dataclass(obj) and not isinstance(obj, type)
    )


def walk(roots: Any) -> list[Any]:
    """Every mutable object reachable from `roots`, each once, in a fixed order."""
    seen: dict[int, int] = {}
    order: list[Any] = []
    stack = [roots]
    while stack:
        obj = stack.pop()
        if not _mutable(obj) and not isinstance(obj, tuple):
            continue
        if id(obj) in seen:
            continue
        seen[id(obj)] = len(order)
        order.append(obj)
        stack.extend(reversed(_children(obj)))
    return order


def describe_state(roots: Any, before: list[Any]) -> Any:
    """The worker's side: `roots` after a call, each pre-call object by its place in `before`."""
    index = {id(o): i for i, o in enumerate(before)}
    done: set[int] = set()

    def state(obj: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            return {"opaque": "deeply nested value"}
        i = index.get(id(obj))
        if i is not None:
            if i in done:
                return {"ref": i}
            done.add(i)
            return {"ref": i, "state": contents(obj, depth)}
        if isinstance(obj, torch.Tensor):
            return encode(obj)
        if isinstance(obj, list | tuple):
            kind = "tuple" if isinstance(obj, tuple) else "list"
            return {kind: [state(v, depth + 1) for v in obj]}
        if isinstance(obj, dict) and type(obj) in (dict, OrderedDict):
            return {"dict": [[encode(k), state(v, depth + 1)] for k, v in obj.items()]}
        if isinstance(obj, nn.Module):
            return {"module": type(obj).__name__, "attrs": contents(obj, depth)}
        return encode(obj, depth)

    def contents(obj: Any, depth: int) -> Any:
        if isinstance(obj, torch.Tensor):
            return encode(obj)
        if isinstance(obj, list | tuple):
            return [state(v, depth + 1) for v in obj]
        if isinstance(obj, dict):
            return [[encode(k), state(v, depth + 1)] for k, v in obj.items()]
        if isinstance(obj, functools.partial):
            return [state(v, depth + 1) for v in (*obj.args, *obj.keywords.values())]
        return [[k, state(v, depth + 1)] for k, v in getattr(obj, "__dict__", {}).items()]

    return state(roots, 0)


_MISSING = object()


def _kept(old: Any, new: Any) -> Any:
    """The old value where the new one is the same plain value (nan included), so that a check
    comparing before and after sees no change where there was none."""
    plain = (int, float, str, bytes, bool, type(None), tuple, frozenset)
    if old is _MISSING or type(old) is not type(new) or not isinstance(old, plain):
        return new
    try:
        if old == new or _nan_equal(old, new):
            return old
    except Exception:  # noqa: BLE001 (a value whose == misbehaves: take the new one)
        return new
    return new


def _nan_equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a != a and b != b
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return all(x == y or _nan_equal(x, y) for x, y in zip(a, b, strict=True))
    return False


def _pairs(old: list, new: list) -> list[tuple[Any, Any]]:
    return [(old[i] if i < len(old) else _MISSING, v) for i, v in enumerate(new)]


def apply_state(described: Any, before: list[Any]) -> Any:
    """The grader's side: write a described state into the grader's own objects; the roots.

    Objects named by `ref` are updated in place and keep their identity; anything new is built
    from plain data (a module the student created comes back as a stand-in of that class name
    holding its tensors, enough for a check to see it is not the one it gave).
    """

    def build(d: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise FrameError("a state nested too deeply")
        if isinstance(d, dict) and "ref" in d:
            i = d["ref"]
            if not isinstance(i, int) or not 0 <= i < len(before):
                raise FrameError(f"a reference {i!r} to nothing")
            obj = before[i]
            if "state" in d:
                update(obj, d["state"], depth)
            return obj
        if isinstance(d, dict) and ("list" in d or "tuple" in d):
            items = [build(v, depth + 1) for v in d.get("list", d.get("tuple")) or []]
            return tuple(items) if "tuple" in d else items
        if isinstance(d, dict) and "dict" in d:
            return {decode(k): build(v, depth + 1) for k, v in d["dict"]}
        if isinstance(d, dict) and "module" in d:
            stand_in = _opaque_type(str(d["module"])[:80])()
            for k, v in d.get("attrs", []):
                if isinstance(k, str):
                    vars(stand_in)[k] = build(v, depth + 1)
            return stand_in
        return decode(d, depth)

    def update(obj: Any, s: Any, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            new = decode(s)
            if not isinstance(new, torch.Tensor):
                raise FrameError("a tensor described as something else")
            with torch.no_grad():
                if new.dtype == obj.dtype and new.shape == obj.shape:
                    obj.copy_(new)
                else:
                    obj.data = new
            if obj.is_leaf and (obj.is_floating_point() or obj.is_complex()):
                obj.requires_grad_(new.requires_grad)
            return
        if not isinstance(s, list):
            raise FrameError("an object's contents that are not a list")
        if isinstance(obj, list):
            obj[:] = [_kept(o, build(v, depth + 1)) for o, v in _pairs(obj, s)]
        elif isinstance(obj, tuple):
            for v in s:  # a tuple cannot change; what it holds may
                build(v, depth + 1)
        elif isinstance(obj, dict):
            keys = {k: k for k in obj}  # the old key objects, where a key stays
            pairs = [(decode(k), build(v, depth + 1)) for k, v in s]
            pairs = [(keys.get(k, k), _kept(obj.get(k, _MISSING), v)) for k, v in pairs]
            obj.clear()
            obj.update(pairs)
        elif isinstance(obj, functools.partial):
            for v in s:
                build(v, depth + 1)
        else:  # a module or a dataclass: its attributes, set as they are in the worker
            attrs = {}
            for pair in s:
                if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                    raise FrameError("an attribute that is not a (name, value) pair")
                old = getattr(obj, "__dict__", {}).get(pair[0], _MISSING)
                attrs[pair[0]] = _kept(old, build(pair[1], depth + 1))
            if not hasattr(obj, "__dict__"):
                return
            for name in [n for n in vars(obj) if n not in attrs]:
                del vars(obj)[name]
            vars(obj).update(attrs)

    return build(described, 0)


class WorkerLost(RuntimeError):
    """The submission's process stopped answering (it ran too long, exited, or crashed)."""
