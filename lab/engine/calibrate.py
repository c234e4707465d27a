"""How many configurations one batched step should take here: measured once, then remembered.

Stacking K configurations into one step shares the frozen base's matmuls, but on a CPU whose
cores are already busy with one configuration's step, more rows only push activations out of
cache: on 2 cores at batch 64, 16 configurations in one step ran at 0.73x the speed of training
them one by one, while at batch 8 they ran 1.76x faster. No fixed rule is right on every
machine, so the sweep measures:

    alone:    one configuration, a LoRA model + make_optimizer + training_step (as lab.train)
    batched:  the engine (batched.py) at K = 2, 4, 8, ... up to what memory and the group allow

each a few steps after a warm-up step, in interleaved rounds (a noisy machine slows every side
of a round alike), and takes the K whose median seconds per configuration-step is lowest
(K = 1: train each point alone). The answer is remembered per machine and device in
user_cache_root()/calibration.json, so a machine measures once per kind of group.

Measuring costs time, so a group is measured only when nothing is remembered for it and the
measurement is under PAYS (5%) of the group's own training; otherwise what is remembered is used,
else the static rule (lab.engine.plan.chunk_size). Set LORA_LAB_CALIBRATE=0 to turn it off (the
static rule, no file read or written), or LORA_LAB_CALIBRATE=always to measure whenever nothing
is remembered, however short the group. Chunking never changes a configuration's numbers (each
trains as it would alone), and measuring leaves the global random state as it found it.

The file lives in a folder the user (or anyone with their account) can write, so nothing in it
is trusted: anything but a calibration file as this module writes it (not JSON, nested too
deeply for the parser, a FIFO, impossible numbers) is warned of once, ignored, and replaced by a
valid file; a sweep never fails because of it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ALL_LINEAR
from ..fileio import atomic_write_bytes, regular_file, user_cache_root
from ..model import ModelConfig, ToyTransformer
from ..step import autocast_dtype, make_optimizer, training_step
from ..tasks import Task
from .batched import AdapterSpec, BatchedTrainer
from .cache import remove_non_file

__all__ = [
    "ENV_VAR",
    "PAYS",
    "Calibration",
    "calibrated_chunk_size",
    "calibration_path",
    "candidates",
    "choose",
    "measure",
    "measurement_config_steps",
    "mode",
    "situation",
]

ENV_VAR = "LORA_LAB_CALIBRATE"
FORMAT = "lora-lab-calibration/1"
PAYS = 0.05  # measure only when it costs under 5% of the group's training
STEPS = 3  # timed steps per side and round, after one warm-up step
ROUNDS = 3  # interleaved rounds; each side's median is compared
# Batching must beat training alone by this much to be chosen: a tie within the noise of a few
# steps goes to the plain loop, which is what a unit of one trains with.
MARGIN = 0.02
_MODES = {"0": "off", "off": "off", "false": "off", "no": "off",
          "": "auto", "1": "auto", "auto": "auto", "on": "auto", "true": "auto", "yes": "auto",
          "always": "always"}  # fmt: skip
# What this process measured: the answer when the file cannot be written (a read-only home).
_MEMORY: dict[str, dict] = {}


def mode() -> str:
    """$LORA_LAB_CALIBRATE as "off" (0), "auto" (unset or 1: when it pays) or "always"."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value not in _MODES:
        raise ValueError(
            f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected 0 (off), 1 (when it pays, the "
            "default) or always"
        )
    return _MODES[value]


def calibration_path() -> Path:
    """Where answers are remembered: user_cache_root()/calibration.json."""
    return user_cache_root() / "calibration.json"


@dataclass
class Calibration:
    """What one measurement found: the fastest chunk size and each candidate's median."""

    chunk: int  # the fastest: 1 means each configuration trains alone
    ms_per_config_step: dict[int, float]  # median per candidate (1: alone)
    seconds: float  # the measurement's own wall time
    rounds: int
    steps: int
    samples: dict[int, list[float]] = field(default_factory=dict)  # every round's figure

    def to_dict(self) -> dict:
        """The remembered form (JSON keys are strings)."""
        return {
            "chunk": self.chunk,
            "ms_per_config_step": {str(k): v for k, v in self.ms_per_config_step.items()},
            "measured_up_to": max(self.ms_per_config_step),
            "seconds": self.seconds,
            "rounds": self.rounds,
            "steps": self.steps,
        }


def candidates(limit: int) -> list[int]:
    """1 (alone), then 2, 4, 8, ... up to `limit`, and `limit` itself."""
    out = [1]
    while out[-1] * 2 <= limit:
        out.append(out[-1] * 2)
    if limit > out[-1]:
        out.append(limit)
    return out


def measurement_config_steps(limit: int, steps: int = STEPS, rounds: int = ROUNDS) -> int:
    """Configuration-steps a measurement up to `limit` trains, warm-up steps included."""
    return rounds * (steps + 1) * sum(candidates(limit))


def choose(medians: dict[int, float], margin: float = MARGIN) -> int:
    """The chunk size with the lowest median; batching must beat alone (1) by `margin`."""
    best = min(sorted(medians), key=lambda k: medians[k])  # ties: the smaller chunk
    if best != 1 and 1 in medians and medians[best] > (1 - margin) * medians[1]:
        return 1
    return best


def _spread(specs: Sequence[AdapterSpec], k: int) -> list[AdapterSpec]:
    """k of `specs` spread evenly over the group (a group is often sorted by rank)."""
    n = len(specs)
    return [specs[i * n // k] for i in range(k)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepTimer:
    """timer(k): seconds per configuration-step of k configurations (1: alone) on `device`."""

    def __init__(self, base, task, specs, batch_size, device, steps, clock) -> None:
        self.base, self.task, self.specs = base, task, list(specs)
        self.batch_size, self.device, self.steps, self.clock = batch_size, device, steps, clock

    def __call__(self, k: int) -> float:
        step = self._alone() if k == 1 else self._batched(k)
        step()  # warm-up: first-touch allocations, lazy initialisation
        _sync(self.device)
        start = self.clock()
        for _ in range(self.steps):
            step()
        _sync(self.device)
        return (self.clock() - start) / (k * self.steps)

    def _alone(self) -> Callable[[], object]:
        """One configuration as lab.train runs it: its LoRA model, AdamW, the shared step."""
        spec = self.specs[len(self.specs) // 2]
        model = copy.deepcopy(self.base)
        spec.add_to(model)
        model.to(self.device).train()
        optimizer = make_optimizer(model, spec.lr)
        dtype = autocast_dtype(self.device)
        gen = torch.Generator().manual_seed(spec.seed)
        order = torch.randint(self.task.n_train, (self.steps + 1, self.batch_size), generator=gen)
        xs = self.task.train_inputs[order].to(self.device)
        ys = self.task.train_targets[order].to(self.device)
        i = iter(range(self.steps + 1))

        def step() -> None:
            j = next(i)
            training_step(model, xs[j], ys[j], optimizer, dtype)

        return step

    def _batched(self, k: int) -> Callable[[], object]:
        specs = _spread(self.specs, k)
        trainer = BatchedTrainer(self.base, self.task, specs, self.steps + 1, self.batch_size,
                                 self.device)  # fmt: skip
        return trainer.step


def measure(
    specs: Sequence[AdapterSpec],
    task: Task,
    batch_size: int,
    device: torch.device | str,
    limit: int,
    *,
    base: ToyTransformer | None = None,
    steps: int = STEPS,
    rounds: int = ROUNDS,
    timer: Callable[[int], float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Calibration:
    """Time alone against batched chunks of 2, 4, ... `limit` of `specs` in interleaved rounds.

    Each round times every candidate once (a fresh model or trainer, one warm-up step, `steps`
    timed steps), in an order rotated from round to round. `timer(k)`, when given, replaces the
    real measurement (seconds per configuration-step of k configurations). Prints nothing and
    restores the global random state (CPU and `device`) afterwards.
    """
    device = torch.device(device)
    limit = max(1, min(int(limit), len(specs)))
    cands = candidates(limit)
    if timer is None:
        if base is None:
            from ..base import load_base_model  # only when measuring for real

            base = load_base_model("cpu")
        timer = _StepTimer(base, task, specs, batch_size, device, steps, clock)
    samples: dict[int, list[float]] = {k: [] for k in cands}
    devices = [device] if device.type == "cuda" else []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=devices):
        for r in range(rounds):
            for k in cands[r % len(cands) :] + cands[: r % len(cands)]:
                samples[k].append(float(timer(k)))
    medians = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    return Calibration(choose(medians), medians, time.perf_counter() - start, rounds, steps,
                       samples)  # fmt: skip


def situation(
    config: ModelConfig, specs: Sequence[AdapterSpec], batch_size: int, device: torch.device | str
) -> str:
    """The remembered answer's key: what changes which chunk size is fastest.

    The machine (processor, cores, torch threads, torch version), the device (type and GPU
    name), the batch size, the base model's dimensions, the group's largest adapter (rank x
    targeted layers, rounded up to a power of two) and whether any configuration uses dropout.
    The task, steps and learning rates do not change a step's cost, so they are not in it.
    """
    device = torch.device(device)
    where = device.type
    if device.type == "cuda":
        where += f" {torch.cuda.get_device_name(device)}"
    size = max(s.rank * (6 if s.targets == (ALL_LINEAR,) else len(s.targets)) for s in specs)
    parts = [
        f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
        f"{torch.get_num_threads()} threads",
        f"torch {torch.__version__}",
        where,
        f"batch {batch_size}",
        f"base d{config.d_model} L{config.n_layers} h{config.n_heads} ff{config.d_ff} "
        f"v{config.vocab_size} t{config.max_seq_len}",
        f"adapter <= {2 ** math.ceil(math.log2(max(size, 1)))}",
        "dropout" if any(s.dropout > 0 for s in specs) else "no dropout",
    ]
    return " | ".join(parts)


MAX_FILE_BYTES = 4 << 20  # an entry is about 300 bytes; a bigger file is not one of ours
MAX_CHUNK = 10**6  # the most configurations one step could hold (as --max-configs allows)
# Corrupt file versions (path, inode, mtime, size) already warned of by this process.
_WARNED: set[tuple] = set()


def _entry_problem(entry: object) -> str | None:
    """What is wrong with one remembered entry (None: nothing), as to_dict writes it."""
    if not isinstance(entry, dict):
        return f"an entry is {type(entry).__name__}, not a dict"
    chunk, top = entry.get("chunk"), entry.get("measured_up_to")
    if not all(type(v) is int for v in (chunk, top)):
        return f"chunk {chunk!r} and measured_up_to {top!r} must be whole numbers"
    if not 1 <= chunk <= top <= MAX_CHUNK:
        return f"chunk {chunk} and measured_up_to {top}: need 1 <= chunk <= measured_up_to"
    medians = entry.get("ms_per_config_step", {})
    if not isinstance(medians, dict) or not all(
        isinstance(k, str) and k.isdigit() and type(v) in (int, float) and math.isfinite(v)
        and v > 0
        for k, v in medians.items()
    ):  # fmt: skip
        return "ms_per_config_step must map chunk sizes to positive finite times"
    for name in ("rounds", "steps"):
        if name in entry and not (type(entry[name]) is int and entry[name] >= 1):
            return f"{name}={entry[name]!r} is not a positive whole number"
    seconds = entry.get("seconds", 0.0)
    if not (type(seconds) in (int, float) and math.isfinite(seconds) and seconds >= 0):
        return f"seconds={seconds!r} is not a finite time"
    return None


def _parse(path: Path) -> dict:
    """The entries in `path`; FileNotFoundError if there is none, ValueError if it is corrupt.

    Anything but a calibration file as `_remember` writes it is corrupt: another kind of file
    (a folder, a FIFO, a device), one too big, not UTF-8 JSON, nested too deeply for the
    parser, another format, or an entry whose numbers are impossible (a chunk of 0 or above
    what was measured, a NaN or negative time, a string where a number belongs).
    """
    try:
        regular_file(path, "calibration file")
    except FileNotFoundError:
        if not os.path.lexists(path):
            raise
        raise ValueError("a broken symlink") from None
    except OSError as exc:
        raise ValueError(str(exc)) from None
    with open(path, "rb") as f:
        raw = f.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise ValueError(f"over {MAX_FILE_BYTES:,} bytes, far more than a calibration takes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply to be a calibration file") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except ValueError as exc:  # not JSON, or a number too long to read
        raise ValueError(f"not valid JSON: {str(exc)[:100]}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise ValueError("'entries' is not a dict")
    for key, entry in entries.items():
        problem = _entry_problem(entry)
        if problem:
            raise ValueError(f"entry {key[:60]!r}: {problem}")
    return entries


def _stamp(path: Path) -> tuple:
    """Which version of the file this is: a new corrupt file is warned of again."""
    try:
        st = path.stat()
        return (str(path), st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        return (str(path),)


def _read(path: Path, warn: bool = True) -> tuple[dict, bool]:
    """The remembered answers in `path` ({} if none) and whether the file is corrupt.

    A corrupt or unreadable file counts as empty, with one warning per version of the file
    (unless `warn` is False). Never raises.
    """
    try:
        return _parse(path), False
    except FileNotFoundError:
        return {}, False
    except (OSError, ValueError) as exc:
        stamp = _stamp(path)
        if warn and stamp not in _WARNED:
            _WARNED.add(stamp)
            why = str(exc).removeprefix(f"calibration file {path} ")
            warnings.warn(
                f"ignoring the chunk-size calibration file {path} ({why}); it is rewritten "
                "with what this machine measures",
                stacklevel=4,
            )
        return {}, True


def _remember(path: Path, key: str, entry: dict | None) -> None:
    """Add `entry` to the file (atomically) and to this process's memory; never raises.

    `entry` None only rewrites the file: a corrupt one becomes a valid one with no entries.
    """
    if entry is not None:
        _MEMORY[f"{path}\n{key}"] = entry
    entries, _ = _read(path, warn=False)  # a corrupt file was warned of when it was looked up
    if entry is not None:
        entries[key] = entry
    data = {"format": FORMAT, "entries": dict(sorted(entries.items()))}
    # A read-only home (or a folder in the file's place): the answer stays in memory.
    with contextlib.suppress(OSError):
        remove_non_file(path)  # a FIFO or a link to /dev/zero holds nothing
        atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


def _recall(path: Path, key: str) -> dict | None:
    """The remembered entry for `key`: the file's, else this process's own; None if neither.

    A corrupt file is warned of and replaced at once by a valid one holding nothing, so that
    it is not warned of again whether or not anything is measured now.
    """
    entries, corrupt = _read(path)
    if corrupt:
        _remember(path, key, None)
    return entries.get(key) or _MEMORY.get(f"{path}\n{key}")


def calibrated_chunk_size(
    specs: Sequence[AdapterSpec],
    task: Task,
    batch_size: int,
    steps: int,
    device: torch.device | str,
    *,
    static: int,
    limit: int,
    config: ModelConfig,
    path: Path | None = None,
    base: ToyTransformer | None = None,
    timer: Callable[[int], float] | None = None,
) -> int:
    """The chunk size for a group of `specs` training `steps` steps each; at most `limit`.

    Remembered answer if any (measured up to at least this group's size, or found smaller than
    what was measured); else, when $LORA_LAB_CALIBRATE allows and the measurement costs under
    PAYS of the group's training, a measurement (`measure`), remembered in `path` (default
    calibration_path()); else `static`. Off ($LORA_LAB_CALIBRATE=0): `static`, nothing read.
    """
    setting = mode()
    n = len(specs)
    if setting == "off" or n < 2 or limit < 2:
        return max(1, min(static, limit, n))
    path = calibration_path() if path is None else Path(path)
    key = situation(config, specs, batch_size, device)
    cap = min(limit, n)
    entry = _recall(path, key)
    if entry is not None and (entry["chunk"] < entry["measured_up_to"]
                              or cap <= entry["measured_up_to"]):  # fmt: skip
        return max(1, min(entry["chunk"], cap))
    pays = measurement_config_steps(cap) < PAYS * n * steps
    if setting == "always" or pays:
        found = measure(specs, task, batch_size, device, cap, base=base, timer=timer)
        _remember(path, key, found.to_dict())
        return found.chunk
    if entry is not None:  # measured on a smaller group: still this machine's best guess
        return max(1, min(entry["chunk"], cap))
    return max(1, min(static, limit, n))
