"""What the exercise tests share: a verdict read, answers that break, a grid, a submission."""

from __future__ import annotations

import math
import sys

import nbformat

from lab import practice
from lab.exercises import Feedback
from lab.sweeps import SweepPoint, SweepResult


def forward_ok(x, base, A, B, scaling, dropout):
    return base(x) + (dropout(x) @ A.T @ B.T) * scaling


def assert_not_yet(feedback: Feedback, *phrases: str) -> None:
    assert isinstance(feedback, Feedback) and not feedback.passed, feedback
    assert str(feedback).startswith("not yet: ")
    for phrase in phrases:
        assert phrase in feedback.message, feedback.message


def stub(*args):
    raise NotImplementedError


def assert_passed(feedback: object) -> None:
    assert isinstance(feedback, Feedback) and feedback.passed, feedback
    assert str(feedback).startswith("passed: ")


def exits(*args):
    sys.exit(0)


def returns_nan(*args):
    return float("nan")


def no_args():
    return 1


FULL_BEST, LORA_BEST = 1e-3, 1e-2  # the synthetic grid's best rates: exactly 10x apart


def fake(point: SweepPoint, accuracy: float | None, loss: float = 1.0) -> SweepResult:
    """A made-up result; accuracy None: diverged (held-out loss nan, accuracy 0)."""
    diverged = accuracy is None
    return SweepResult(
        point=point, losses=[2.0, loss], train_eval=None, trainable_parameters=18_432,
        heldout={"loss": math.nan if diverged else loss, "accuracy": accuracy or 0.0, "n": 512},
        total_parameters=400_000, memory=None, wall_seconds=1.0, tokens_per_second=1.0,
        device="cpu", date="", diverged=diverged,
    )  # fmt: skip


def peaked(point: SweepPoint, best: float, top: float) -> SweepResult:
    """Accuracy `top` at lr `best`, falling 0.15 per half-decade away; diverged at lr 0.1."""
    if point.lr >= 0.1:
        return fake(point, None)
    steps = abs(math.log10(point.lr / best)) * 2
    return fake(point, max(0.0, top - 0.15 * steps), loss=0.2 + 0.3 * steps)


SHIFT_ACCURACY = {"q,v": 0.30, "attention": 0.35, "MLP": 0.90, "all-linear": 0.95}  # by name


ATTENTION_BEST = max(SHIFT_ACCURACY[n] for n in practice.LAYER_SETS if n in ("q,v", "attention"))


def synthetic_grid() -> list[SweepResult]:
    """One result per point of the two experiments (they share sort_desc's all-linear r4 runs)."""
    out: dict[SweepPoint, SweepResult] = {}
    for p in practice.lr_points():
        if p.is_full:
            out[p] = peaked(p, FULL_BEST, 0.80)
        else:
            out[p] = peaked(p, 3e-3 if p.rslora else LORA_BEST, 0.90)
    for p in practice.layer_points():
        if p.is_full:
            out[p] = peaked(p, 3e-4, 0.97)
        elif p.task == "shift":
            name = next(
                n for n, (t, _) in practice.LAYER_SETS.items() if tuple(sorted(t)) == p.targets
            )
            out[p] = peaked(p, 1e-2, SHIFT_ACCURACY[name])
        else:
            out.setdefault(p, peaked(p, LORA_BEST, 0.8))
    for p in practice.layer_long_points():  # the runs exercise 10 cites: one per target set
        name = next(n for n, (t, _) in practice.LAYER_SETS.items() if tuple(sorted(t)) == p.targets)
        out[p] = peaked(p, p.lr, SHIFT_ACCURACY[name])
    return list(out.values())


GRID = synthetic_grid()


def find_ok(results):
    trained = [r for r in results if not r.diverged]
    return max(trained, key=lambda r: (r.heldout["accuracy"], -r.heldout["loss"])).point.lr


# A submission for the nbgrader tests (test_grading, test_class_roundtrip): answers, mistakes.


def cells_by_id(nb) -> dict[str, nbformat.NotebookNode]:
    return {c.metadata["nbgrader"]["grade_id"]: c for c in nb.cells if "nbgrader" in c.metadata}


def answer(cell_source: str) -> str:
    """What a student who solved it writes: the solution without nbgrader's markers."""
    return "\n".join(line for line in cell_source.split("\n") if "### " not in line)


# The mistakes the checker tests already use, one per exercise ben gets wrong (and what the
# checker says to each: its hint must reach ben's feedback).
MISTAKES = {
    "ex1_forward_answer": (
        "def check_forward(fn):  # redefining the check changes nothing the grader runs\n"
        "    return 'passed'\n\n\n"
        "def my_forward(x, base, A, B, scaling, dropout):\n"
        "    return base(x) + dropout(x) @ A.T @ B.T\n\n\n"
        "check_forward(my_forward)"
    ),
    "ex3_count_answer": (
        "def my_count(config, targets, rank):\n"
        "    return config.n_layers * len(targets) * rank * config.d_model  # A only\n\n\n"
        "check_count(my_count)"
    ),
    "ex5_sweep_answer": 'ANSWER = "A"\ncheck_sweep_answer(ANSWER)',
    "ex6_memory_answer": (
        "FULL_BYTES = 4 * 406_784  # gradients only: AdamW's two moments forgotten\n"
        "LORA_BYTES = 4 * 8_192\ncheck_memory(FULL_BYTES, LORA_BYTES)"
    ),
    "ex7_nf4_answer": (
        "LEVELS = torch.tensor(lab.NF4_LEVELS)\n\n\n"
        "def my_quantize(block):\n"
        "    absmax = block.max()\n"
        "    return (block[:, None] / absmax - LEVELS).abs().argmin(dim=1), absmax\n\n\n"
        "def my_dequantize(codes, absmax):\n"
        "    return LEVELS[codes.long()] * absmax\n\n\n"
        "check_nf4(my_quantize, my_dequantize)"
    ),
    "ex9a_lr_prediction_answer": (
        "LORA_LR = 3e-3  # full fine-tuning's own\ncheck_lr_prediction(LORA_LR)"
    ),
    "ex10b_shift_targets_answer": (
        'TARGETS = ("q_proj", "v_proj")\nRANK = 18\ncheck_shift_targets(TARGETS, RANK)'
    ),
}


# Submissions for the autograder tests (test_autograde, test_grading): built from the release.


def grade_id(cell) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def is_graded_test(cell) -> bool:
    meta = cell.metadata.get("nbgrader", {})
    return cell.cell_type == "code" and bool(meta.get("grade")) and not meta.get("solution")


def submission(solved: tuple[str, ...] | str = (), cheats: dict[str, str] | None = None):
    """The released notebook as nbgrader hands it to autograde: its graded cells' hidden tests
    restored from the source; the answers in `solved` ("all" for every one) filled in from the
    answer key; each cheat's code appended to the cell with that grade id ("imports" is the
    first cell)."""
    from lab.exercises.course import SOURCE, STUDENT  # imports nbgrader: only where needed

    key = {grade_id(c): c for c in nbformat.read(SOURCE, as_version=4).cells if grade_id(c)}
    nb = nbformat.read(STUDENT, as_version=4)
    for cell in nb.cells:
        gid = grade_id(cell)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        if gid is None:
            continue
        if is_graded_test(cell):
            cell.source = key[gid].source
        elif solved == "all" or gid in solved:
            cell.source = answer(key[gid].source)
        if cheats and gid in cheats:
            cell.source += "\n\n" + cheats[gid]
    return nb


# A cheat in the submission's first cell: every check, grade and torch's comparisons rebound to
# pass. The autograder must grade the notebook as if the cell were not there.
ACCEPTANCE_CHEAT = """\
import torch, builtins
import lab, lab.exercises as ex
_ok = ex.Feedback(True, "looks fine")
for _n in dir(ex):
    if _n.startswith("check_"):
        setattr(ex, _n, lambda *a, **k: _ok)
ex.grade = lambda *a, **k: print("passed")
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
"""
