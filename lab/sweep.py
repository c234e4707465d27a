"""Sweeps: train a grid of LoRA settings once, cache every result on disk, summarise the cache.

Data flows one way: a `SweepPoint` says what to train, `run_point` trains it (tasks -> model +
LoRA -> train) and returns a `SweepResult`, and `SweepCache` keeps one JSON file per point so a
point already run is never trained again, even after a kernel restart. The summary helpers at the
end turn cached results into the plain lists that `lab.plots` draws. Nothing here imports plots or
widgets.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .analysis import count_full, count_lora
from .base import BASE_MODEL_PATH, load_base_config, load_base_model
from .batched import AdapterSpec, bytes_per_config, default_max_configs, train_batched
from .fileio import atomic_write_bytes
from .lora import count_parameters
from .memory import measure_step_memory
from .model import ModelConfig, ToyTransformer, default_device
from .tasks import FINETUNE_TASKS, get_task
from .train import train

__all__ = [
    "ALL_TARGETS",
    "DEFAULT_GRID_PATH",
    "DEFAULT_STEPS",
    "FORMAT",
    "SweepCache",
    "SweepPoint",
    "SweepResult",
    "accuracy_table",
    "by_rank",
    "default_cache_dir",
    "describe",
    "dropout_series",
    "full_point",
    "grid",
    "load_grid_file",
    "run_group",
    "run_point",
    "select",
    "sweep",
    "trainable_counts",
]

# Bump when results stop being comparable (training loop, tasks or the stored fields change):
# the tag is part of every key, so old cache files are simply never looked up again.
FORMAT = "lora-lab-sweep/1"
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ("q_proj", "v_proj")  # the LoRA paper's choice
DEFAULT_ALPHA = 16.0
LORA_LR = 2e-2  # adapters start at zero and are small: they want a larger step than full FT
FULL_LR = 1e-3  # full fine-tuning at 2e-2 would wreck the pretrained weights
DEFAULT_GRID_PATH = Path(__file__).parent / "data" / "default_grid.json"
DEFAULT_STEPS = 600  # enough for rank to matter on sort_desc, ~30 s a point on a laptop CPU
SMALL_DATA_LIMIT = 1000  # tasks with at most this many training examples also get a train eval


# ---------------------------------------------------------------------------------------------
# What to train
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    """One training run's settings; rank None means full fine-tuning (no adapter)."""

    task: str
    rank: int | None
    alpha: float = DEFAULT_ALPHA
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # leaf names, stored sorted
    rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    steps: int = DEFAULT_STEPS
    lr: float | None = None  # None: LORA_LR for LoRA, FULL_LR for full fine-tuning
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)  # normalising a frozen dataclass

        if self.task not in FINETUNE_TASKS:
            raise ValueError(f"task={self.task!r}: expected one of {', '.join(FINETUNE_TASKS)}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed={self.seed!r}: expected an int")
        if self.lr is None:
            put("lr", FULL_LR if self.rank is None else LORA_LR)
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r}: expected a positive finite number")
        put("lr", float(self.lr))
        if self.rank is None:
            # Full fine-tuning has no adapter: its adapter settings are fixed so that every
            # spelling of "full fine-tuning" is the same point (and the same cache file).
            for name, value in (
                ("alpha", 0.0),
                ("dropout", 0.0),
                ("targets", ()),
                ("rslora", False),
            ):
                put(name, value)
            return
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r}: expected an int >= 1, or None for full FT")
        if not (
            isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ValueError(f"alpha={self.alpha!r}: expected a positive number")
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout={self.dropout!r}: expected a number in [0, 1)")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = sorted(set(targets) - set(ALL_TARGETS))
        if not targets or unknown:
            raise ValueError(f"targets={targets!r}: expected some of {', '.join(ALL_TARGETS)}")
        put("alpha", float(self.alpha))
        put("dropout", float(self.dropout))
        put("targets", tuple(sorted(set(targets))))
        put("rslora", bool(self.rslora))

    def spec(self) -> AdapterSpec:
        """The point's adapter and optimizer settings, for lab.batched (LoRA points only)."""
        if self.is_full:
            raise ValueError("full fine-tuning has no adapter, so no AdapterSpec")
        return AdapterSpec(
            self.targets, self.rank, self.alpha, self.dropout, self.rslora, self.lr, self.seed
        )

    @property
    def is_full(self) -> bool:
        """True for full fine-tuning (no adapter)."""
        return self.rank is None

    def to_dict(self) -> dict:
        """The fields as plain JSON values."""
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict) -> SweepPoint:
        """Inverse of to_dict (validates like the constructor)."""
        return cls(**{**data, "targets": tuple(data.get("targets", DEFAULT_TARGETS))})

    @property
    def key(self) -> str:
        """Stable cache key: a hash of the format tag, the base model and the settings."""
        canonical = json.dumps(
            {"format": FORMAT, "base": base_fingerprint(), **self.to_dict()}, sort_keys=True
        )
        return hashlib.sha1(canonical.encode()).hexdigest()[:20]


@functools.cache
def _fingerprint(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def base_fingerprint(path: Path = BASE_MODEL_PATH) -> str:
    """A short hash of the base model file: results of another base are other cache entries."""
    try:
        stat = path.stat()
    except OSError:
        return "missing"
    return _fingerprint(str(path), stat.st_mtime_ns, stat.st_size)


def grid(
    task: str,
    ranks: Iterable[int],
    alphas: Iterable[float] = (DEFAULT_ALPHA,),
    dropouts: Iterable[float] = (0.0,),
    targets: Sequence[str] = DEFAULT_TARGETS,
    rslora: bool = False,
    steps: int = DEFAULT_STEPS,
    lr: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> list[SweepPoint]:
    """The cartesian product ranks x alphas x dropouts (in that order), duplicates removed."""
    points = [
        SweepPoint(task, r, a, d, tuple(targets), rslora, steps, lr, batch_size, seed)
        for r in ranks
        for a in alphas
        for d in dropouts
    ]
    return list(dict.fromkeys(points))


def full_point(
    task: str,
    steps: int = DEFAULT_STEPS,
    lr: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> SweepPoint:
    """The full fine-tuning reference for a task."""
    return SweepPoint(task, None, steps=steps, lr=lr, batch_size=batch_size, seed=seed)


def describe(point: SweepPoint) -> str:
    """A short label: 'r8 α16 p0.1' (plus targets and scaling when not the defaults)."""
    if point.is_full:
        return "full fine-tuning"
    text = f"r{point.rank} α{point.alpha:g}"
    if point.dropout:
        text += f" p{point.dropout:g}"
    if point.targets != DEFAULT_TARGETS:
        text += " " + ",".join(t.removesuffix("_proj") for t in point.targets)
    if point.rslora:
        text += " rsLoRA"
    return text


# ---------------------------------------------------------------------------------------------
# What a run measured
# ---------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """What training one SweepPoint measured (JSON round-trip with to_dict/from_dict)."""

    point: SweepPoint
    losses: list[float]  # training loss per step
    heldout: dict[str, float]  # loss, accuracy (exact match), n
    train_eval: dict[str, float] | None  # same on the train split; small-data tasks only
    trainable_parameters: int
    total_parameters: int
    memory: dict | None  # MemoryBreakdown.to_dict() of the first step
    wall_seconds: float
    tokens_per_second: float
    device: str
    date: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-friendly dict, tagged with the format and the point's key."""
        out = dataclasses.asdict(self)
        out["point"] = self.point.to_dict()
        return {"format": FORMAT, "key": self.point.key, **out}

    @classmethod
    def from_dict(cls, data: dict) -> SweepResult:
        """Inverse of to_dict; raises ValueError if the data is not a valid result."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT!r} result")
        names = [f.name for f in dataclasses.fields(cls)]
        try:
            fields = {n: data[n] for n in names if n in data}
            fields["point"] = SweepPoint.from_dict(data["point"])
            result = cls(**fields)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed result: {exc!r}") from exc
        if not isinstance(result.losses, list) or not isinstance(result.heldout, dict):
            raise ValueError("malformed result: losses must be a list, heldout a dict")
        if not {"loss", "accuracy"} <= set(result.heldout):
            raise ValueError("malformed result: heldout lacks loss or accuracy")
        return result


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def group_key(point: SweepPoint) -> tuple:
    """Points with equal keys can train together in one batched run (LoRA points only)."""
    return (point.task, point.steps, point.batch_size)


def _first_step_memory(point: SweepPoint, base: ToyTransformer, device: torch.device) -> dict:
    """The memory of the point's first training step, measured as run_point measures it.

    A scratch copy of `base` with a fresh adapter runs one tracked step on the same first
    batch the point trains on; the trained models are not touched.
    """
    task = get_task(point.task)
    with torch.random.fork_rng(devices=[]):
        model = copy.deepcopy(base).to(device)
        point.spec().add_to(model)
        model.train()
        idx = torch.randint(task.n_train, (point.batch_size,),
                            generator=torch.Generator().manual_seed(point.seed))  # fmt: skip
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=point.lr)  # fmt: skip
        autocast = torch.bfloat16 if device.type == "cuda" else None
        x, y = task.train_inputs[idx].to(device), task.train_targets[idx].to(device)
        return measure_step_memory(model, x, y, optimizer, autocast).to_dict()


def run_group(
    points: Sequence[SweepPoint],
    device: torch.device | str | None = None,
    progress: bool = True,
    max_configs: int | None = None,
    on_result: Callable[[SweepResult], None] | None = None,
) -> list[SweepResult]:
    """Train LoRA points that share task, steps and batch size together (lab.batched).

    Each point trains exactly as `run_point` would train it alone (same data order, adapter
    initialisation, dropout masks and optimizer; see tests/test_batched.py) and is measured the
    same way: held-out (and, for small data sets, train) evaluation and the first step's memory.
    A group larger than `max_configs` trains in chunks (default `lab.batched.default_max_configs`:
    what fits in half the free memory, and on a CPU about 128 sequences per step, where it ran
    fastest); if a chunk still runs out of memory it is split in half and retried. Each result's
    wall_seconds is its share of its chunk's training time; extra["batched"] says how it ran.
    """
    points = list(dict.fromkeys(points))
    if not points:
        return []
    full = [p for p in points if p.is_full]
    if full:
        raise ValueError(f"{describe(full[0])} has no adapter to batch; train it with run_point")
    keys = {group_key(p) for p in points}
    if len(keys) > 1:
        raise ValueError(
            f"points differ in (task, steps, batch_size): {sorted(keys)}; "
            "a batched group shares all three (sweep() groups them for you)"
        )
    if max_configs is not None and (
        not isinstance(max_configs, int) or isinstance(max_configs, bool) or max_configs < 1
    ):
        raise ValueError(f"max_configs={max_configs!r}: expected a positive int or None")
    device = torch.device(device) if device is not None else default_device()
    base = load_base_model("cpu")
    if max_configs is None:
        batch_size = points[0].batch_size
        needed = bytes_per_config(base.config, [p.spec() for p in points], batch_size)
        max_configs = default_max_configs(batch_size, device, needed)
    results: list[SweepResult] = []
    pending = [points[i : i + max_configs] for i in range(0, len(points), max_configs)]
    while pending:
        chunk = pending.pop(0)
        try:
            results += _run_chunk(chunk, base, device, progress, on_result)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if len(chunk) == 1 or not _out_of_memory(exc):
                raise
            half = len(chunk) // 2
            warnings.warn(
                f"{len(chunk)} configurations did not fit in memory; retrying as "
                f"{half} + {len(chunk) - half}",
                stacklevel=2,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
            pending[:0] = [chunk[:half], chunk[half:]]
    return results


def _out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and the CPU allocator's "can't allocate memory"."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def _run_chunk(
    chunk: list[SweepPoint],
    base: ToyTransformer,
    device: torch.device,
    progress: bool,
    on_result: Callable[[SweepResult], None] | None,
) -> list[SweepResult]:
    first = chunk[0]
    task = get_task(first.task)
    specs = [p.spec() for p in chunk]
    run = train_batched(base, task, specs, first.steps, first.batch_size, device, progress)
    share = run.wall_seconds / len(chunk)
    tokens = first.steps * first.batch_size * task.train_inputs.shape[1]
    results = []
    for k, (point, model) in enumerate(zip(chunk, run.models, strict=True)):
        counts = count_parameters(model)
        small = task.n_train <= SMALL_DATA_LIMIT
        result = SweepResult(
            point=point,
            losses=[float(x) for x in run.losses[k]],
            heldout=task.evaluate(model),
            train_eval=task.evaluate(model, split="train") if small else None,
            trainable_parameters=counts.trainable,
            total_parameters=counts.total,
            memory=_first_step_memory(point, base, device),
            wall_seconds=share,
            tokens_per_second=tokens / share,
            device=str(device),
            date=_now(),
            extra={"batched": {"configs": len(chunk), "chunk_seconds": run.wall_seconds}},
        )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def run_point(
    point: SweepPoint, device: torch.device | str | None = None, progress: bool = True
) -> SweepResult:
    """Train one point from the shipped base and measure it (no caching here)."""
    task = get_task(point.task)
    model = load_base_model(device)
    if not point.is_full:
        point.spec().add_to(model)  # seeds LoRA's A init and adapter dropout
    counts = count_parameters(model)
    run = train(model, task, point.steps, point.lr, point.batch_size, point.seed, device, progress)
    # Overfitting only shows on a small train set; evaluating 20,000 examples would cost more
    # than it tells.
    train_eval = task.evaluate(model, split="train") if task.n_train <= SMALL_DATA_LIMIT else None
    return SweepResult(
        point=point,
        losses=[float(x) for x in run.losses],
        heldout=dict(run.heldout),
        train_eval=train_eval,
        trainable_parameters=counts.trainable,
        total_parameters=counts.total,
        memory=None if run.memory is None else run.memory.to_dict(),
        wall_seconds=run.wall_seconds,
        tokens_per_second=run.tokens_per_second,
        device=run.device,
        date=_now(),
    )


# ---------------------------------------------------------------------------------------------
# The cache: one JSON file per point
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$LORA_LAB_CACHE if set, else the user's cache folder (~/.cache/lora-lab/sweeps)."""
    if os.environ.get("LORA_LAB_CACHE"):
        return Path(os.environ["LORA_LAB_CACHE"]).expanduser()
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "lora-lab" / "sweeps"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora-lab" / "sweeps"


class SweepCache:
    """Results on disk, one `<key>.json` per point, written atomically; survives restarts."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        # Parsed files by path, reused while (mtime, size) are unchanged: redraws stay fast.
        self._memo: dict[Path, tuple[tuple[int, int], SweepResult | None]] = {}

    def __repr__(self) -> str:
        return f"SweepCache({str(self.directory)!r})"

    def path(self, point: SweepPoint) -> Path:
        """Where the point's result lives (whether or not it exists)."""
        return self.directory / f"{point.key}.json"

    def _read(self, path: Path) -> SweepResult | None:
        """The result in `path`, or None (with a warning) if it is unreadable or not a result."""
        try:
            stat = path.stat()
        except OSError:
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if path in self._memo and self._memo[path][0] == stamp:
            return self._memo[path][1]
        try:
            result = SweepResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
            if result.point.key != path.stem:
                # Written by another format version or for another base model: stale, not
                # corrupt; it is never looked up, so skip it quietly.
                result = None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            warnings.warn(f"ignoring unreadable sweep cache file {path}: {exc}", stacklevel=3)
            result = None
        self._memo[path] = (stamp, result)
        return result

    def get(self, point: SweepPoint) -> SweepResult | None:
        """The cached result of `point`, or None."""
        return self._read(self.path(point))

    def __contains__(self, point: object) -> bool:
        return isinstance(point, SweepPoint) and self.get(point) is not None

    def put(self, result: SweepResult) -> Path:
        """Store a result (replacing any earlier one for the same point); returns its path."""
        data = json.dumps(result.to_dict(), indent=1).encode("utf-8")
        return atomic_write_bytes(self.path(result.point), data)

    def results(self, **filters: object) -> list[SweepResult]:
        """Every valid cached result whose point matches `filters` (field=value), by file name."""
        if not self.directory.is_dir():
            return []
        found = (self._read(p) for p in sorted(self.directory.glob("*.json")))
        return select([r for r in found if r is not None], **filters)

    def __len__(self) -> int:
        return len(self.results())

    def seed_from(self, path: str | os.PathLike = DEFAULT_GRID_PATH) -> int:
        """Copy a grid file's results into the cache, never overwriting; returns how many."""
        added = 0
        for result in load_grid_file(path):
            if result.point not in self:
                self.put(result)
                added += 1
        return added


def load_grid_file(path: str | os.PathLike = DEFAULT_GRID_PATH) -> list[SweepResult]:
    """The results in a grid file written by scripts/make_default_grid.py."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    if data.get("base") != base_fingerprint():
        warnings.warn(
            f"{path} was computed on another base model ({data.get('base')}, this one is "
            f"{base_fingerprint()}); rebuild it with scripts/make_default_grid.py",
            stacklevel=2,
        )
        return []
    return [SweepResult.from_dict(item) for item in data["results"]]


# ---------------------------------------------------------------------------------------------
# Training a grid
# ---------------------------------------------------------------------------------------------


def sweep(
    points: Iterable[SweepPoint],
    cache: SweepCache | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    *,
    run_fn: Callable[..., SweepResult] | None = None,
    on_result: Callable[[SweepResult], None] | None = None,
    batched: bool = True,
    max_configs: int | None = None,
) -> list[SweepResult]:
    """Results for `points` in order: cached ones are read, the others trained and cached.

    By default the LoRA points still to train are grouped by (task, steps, batch_size) and each
    group trains in one batched run (`run_group`; `max_configs` caps a chunk); full fine-tuning
    points train one by one with `run_point`. `batched=False` trains every point alone.
    `cache` defaults to `SweepCache()` (the user's cache folder or $LORA_LAB_CACHE). A `run_fn`
    replaces run_point and turns batching off: it is called as run_fn(point, device=...,
    progress=...), so tests and widgets can pass a fake trainer. `on_result` is called after
    each newly trained point.
    """
    cache = SweepCache() if cache is None else cache
    points = list(dict.fromkeys(points))
    results = {p: cache.get(p) for p in points}
    todo = [p for p in points if results[p] is None]
    bar = tqdm(total=len(todo), desc="sweep", unit="point", disable=not progress or not todo)

    def done(result: SweepResult) -> None:
        cache.put(result)
        results[result.point] = result
        bar.update(1)
        if on_result is not None:
            on_result(result)

    if run_fn is not None or not batched:
        run_fn = run_point if run_fn is None else run_fn
        for point in todo:
            done(run_fn(point, device=device, progress=progress))
    else:
        groups: dict[tuple, list[SweepPoint]] = {}
        for point in todo:
            if point.is_full:
                done(run_point(point, device=device, progress=progress))
            else:
                groups.setdefault(group_key(point), []).append(point)
        for group in groups.values():
            run_group(group, device, progress, max_configs, on_result=done)
    bar.close()
    return [results[p] for p in points]


# ---------------------------------------------------------------------------------------------
# Summaries: plain lists for lab.plots
# ---------------------------------------------------------------------------------------------


def select(results: Iterable[SweepResult], **filters: object) -> list[SweepResult]:
    """Results whose point has every given field equal to the given value (targets: any order)."""
    names = {f.name for f in dataclasses.fields(SweepPoint)}
    unknown = sorted(set(filters) - names)
    if unknown:
        raise ValueError(f"unknown SweepPoint fields {unknown}; valid: {sorted(names)}")
    if "targets" in filters:
        filters["targets"] = tuple(sorted(filters["targets"]))
    return [r for r in results if all(getattr(r.point, k) == v for k, v in filters.items())]


def by_rank(results: Iterable[SweepResult]) -> dict[int, SweepResult]:
    """LoRA results keyed by rank, ascending; the first result of each rank wins."""
    out: dict[int, SweepResult] = {}
    for r in results:
        if not r.point.is_full:
            out.setdefault(r.point.rank, r)
    return dict(sorted(out.items()))


def accuracy_table(
    results: Iterable[SweepResult], ranks: Sequence[int], alphas: Sequence[float]
) -> list[list[float]]:
    """Held-out accuracy, one row per rank and one column per alpha; nan where not run."""
    found = {(r.point.rank, r.point.alpha): r.heldout["accuracy"] for r in results}
    return [[found.get((rank, float(a)), math.nan) for a in alphas] for rank in ranks]


def dropout_series(
    results: Iterable[SweepResult],
) -> tuple[list[float], list[float], list[float]]:
    """(dropouts, train losses, held-out losses) by dropout, from results with a train eval."""
    rows = sorted({r.point.dropout: r for r in results if r.train_eval is not None}.items())
    return (
        [p for p, _ in rows],
        [r.train_eval["loss"] for _, r in rows],
        [r.heldout["loss"] for _, r in rows],
    )


def trainable_counts(
    ranks: Sequence[int],
    targets: Sequence[str] = DEFAULT_TARGETS,
    config: ModelConfig | None = None,
) -> tuple[list[int], int]:
    """Exact trainable parameters per rank, and full fine-tuning's, counted on the meta device."""
    config = config or load_base_config()
    targets = tuple(sorted(targets))
    return [count_lora(config, rank, targets)[0] for rank in ranks], count_full(config)
