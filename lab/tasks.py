"""The lab's own language: character-level algorithmic tasks, generated offline, deterministic.

Every example is one token sequence ``<task> prompt <sep> answer <eos>``, right-padded to
``SEQ_LEN`` tokens. The model is trained to predict the answer and ``<eos>`` only (the prompt and
padding carry no loss), and an example counts as solved when every answer token and ``<eos>`` is
the model's top prediction (exact match). Under teacher forcing that is the same as greedy decoding
getting the whole answer right, so one forward pass scores a batch.

The base model is pretrained on a mixture of four skills (copy, reverse, sort, add). The
fine-tuning tasks use task tokens the base has never seen, so it starts near 0% on all of them.
They come in two kinds: skills (`SKILL_TASKS`: a rule, scored on prompts never trained on) and
recall (`RECALL_TASKS`: N random key -> value pairs to memorise, scored on those same pairs, so
each holds a known amount of information, `recall_bits(n)`, to measure an adapter's capacity).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .model import IGNORE_INDEX, ToyTransformer, lm_loss

__all__ = [
    "FINETUNE_TASKS",
    "PRETRAIN_TASKS",
    "RECALL_KEY_LEN",
    "RECALL_SIZES",
    "RECALL_TASKS",
    "RECALL_VALUE_LEN",
    "SEQ_LEN",
    "SKILL_TASKS",
    "TASKS",
    "VOCAB",
    "Task",
    "decode",
    "encode",
    "get_task",
    "recall_bits",
]

SPECIALS = ["<pad>", "<sep>", "<eos>"]
DIGITS = list("0123456789")
LETTERS = list("abcdefghijklmnopqrstuvwxyz")
SYMBOLS = ["+", "-"]
# One token per task: the prompt's first token tells the model what to do.
PRETRAIN_TASKS = ("copy", "reverse", "sort", "add")
SKILL_TASKS = ("sort_desc", "shift", "rotate", "swap", "evens", "sort_desc_small")
# Memorisation: recall_N holds N key -> value pairs (see _build_recall). The sizes are a factor 2
# apart: scripts/make_capacity_grid.py trains 32 to 512, from "rank 16 holds them all" to "only
# full fine-tuning does" at its budget; 1024 is past what that budget lets full fine-tuning hold.
RECALL_SIZES = (32, 64, 128, 256, 512, 1024)
RECALL_TASKS = tuple(f"recall_{n}" for n in RECALL_SIZES)
# Everything a run may be trained on (lab.SweepPoint, lab.train, the CLI): skills, then recall.
FINETUNE_TASKS = SKILL_TASKS + RECALL_TASKS
TASK_TOKENS = [
    f"<{name}>" for name in PRETRAIN_TASKS + ("sort_desc", "shift", "rotate", "swap", "evens")
]
# <recall> comes last, so every token the base model was pretrained with keeps its id.
VOCAB: list[str] = SPECIALS + DIGITS + LETTERS + SYMBOLS + TASK_TOKENS + ["<recall>"]
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
PAD, SEP, EOS = (TOKEN_ID[t] for t in SPECIALS)
SEQ_LEN = 20  # <task> + prompt (<= 8) + <sep> + answer (<= 8) + <eos>, plus one spare
MIN_LEN, MAX_LEN = 3, 8  # letter strings in prompts


def encode(tokens: list[str]) -> list[int]:
    """Token strings -> ids."""
    return [TOKEN_ID[t] for t in tokens]


def decode(ids) -> str:
    """Ids -> readable text, stopping at <eos> and skipping <pad>."""
    out = []
    for i in ids:
        tok = VOCAB[int(i)]
        if tok == "<eos>":
            break
        if tok != "<pad>":
            out.append(tok if len(tok) == 1 else f" {tok} ")
    return "".join(out).strip()


# --- generators: rng -> (prompt tokens, answer tokens) ---------------------------------------


def _letters(rng: random.Random) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN))]


def _copy(rng):
    s = _letters(rng)
    return s, list(s)


def _reverse(rng):
    s = _letters(rng)
    return s, s[::-1]


def _sort(rng):
    s = _letters(rng)
    return s, sorted(s)


def _add(rng):
    # The sum is written least-significant digit first, the order in which carries are known,
    # so a left-to-right model can produce it one digit at a time.
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return list(f"{a}+{b}"), list(str(a + b))[::-1]


def _sort_desc(rng):
    s = _letters(rng)
    return s, sorted(s, reverse=True)


SHIFT = 3  # Caesar shift: a -> d, ..., x -> a


def _shift(rng):
    s = _letters(rng)
    return s, [LETTERS[(LETTERS.index(c) + SHIFT) % 26] for c in s]


def _rotate(rng):
    s = _letters(rng)
    return s, s[1:] + s[:1]


def _swap(rng):
    s = _letters(rng)
    out = list(s)
    out[0:-1:2], out[1::2] = s[1::2], s[0:-1:2]
    return s, out


def _evens(rng):
    s = _letters(rng)
    return s, s[::2]


GENERATORS: dict[str, Callable[[random.Random], tuple[list[str], list[str]]]] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "add": _add,
    "sort_desc": _sort_desc,
    "shift": _shift,
    "rotate": _rotate,
    "swap": _swap,
    "evens": _evens,
}


def _encode_example(task_token: str, prompt: list[str], answer: list[str]) -> tuple[list, list]:
    """One example -> (input ids, target ids), both SEQ_LEN - 1 long."""
    seq = encode([task_token, *prompt, "<sep>", *answer, "<eos>"])
    n_prompt = len(prompt) + 2  # task token, prompt, <sep>: the answer starts after these
    seq = seq + [PAD] * (SEQ_LEN - len(seq))
    inputs, targets = seq[:-1], seq[1:]
    answer_end = n_prompt + len(answer)  # index in targets of <eos>
    targets = [
        t if n_prompt - 1 <= i <= answer_end - 1 else IGNORE_INDEX for i, t in enumerate(targets)
    ]
    return inputs, targets


@dataclass
class Task:
    """A generated task: train and held-out tensors of (inputs, targets), each (n, SEQ_LEN - 1)."""

    name: str
    description: str
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    heldout_inputs: torch.Tensor
    heldout_targets: torch.Tensor
    examples: list[tuple[str, str]] = field(default_factory=list)  # a few (prompt, answer) pairs
    # Information the training set holds, in bits, where it is known: the recall tasks' random
    # values (recall_bits). None for the skills, whose answers follow from their prompts.
    bits: float | None = None

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return len(self.train_inputs)

    def batch(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random training batch (sampled with replacement) from `generator`."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
        idx = torch.randint(self.n_train, (batch_size,), generator=generator)
        return self.train_inputs[idx], self.train_targets[idx]

    @torch.no_grad()
    def evaluate(
        self, model: ToyTransformer, batch_size: int = 512, split: str = "heldout"
    ) -> dict[str, float]:
        """Loss and exact-match accuracy of `model` on the held-out (or train) split.

        The model's train/eval mode is restored afterwards.
        """
        if split not in ("heldout", "train"):
            raise ValueError(f"split={split!r}: expected 'heldout' or 'train'")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
        inputs, targets = getattr(self, f"{split}_inputs"), getattr(self, f"{split}_targets")
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total_loss, total_tokens, correct = 0.0, 0, 0
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size].to(device)
            y = targets[start : start + batch_size].to(device)
            logits = model(x)
            mask = y != IGNORE_INDEX
            n_tokens = int(mask.sum())
            total_loss += float(lm_loss(logits, y)) * n_tokens
            total_tokens += n_tokens
            hit = (logits.argmax(-1) == y) | ~mask
            correct += int(hit.all(dim=1).sum())
        model.train(was_training)
        n = len(inputs)
        return {"loss": total_loss / total_tokens, "accuracy": correct / n, "n": n}


def _generate(names: tuple[str, ...], n: int, seed: int, exclude: set | None = None) -> list:
    """n distinct examples drawn round-robin from `names`' generators, none in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    while len(out) < n:
        name = names[len(out) % len(names)]
        prompt, answer = GENERATORS[name](rng)
        key = (name, tuple(prompt))
        if key in seen:
            continue
        seen.add(key)
        out.append((name, prompt, answer))
    return out


def _to_tensors(examples: list) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_encode_example(f"<{name}>", p, a) for name, p, a in examples]
    inputs = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    targets = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return inputs, targets


DESCRIPTIONS = {
    "pretrain": "the base model's pretraining mixture: copy, reverse, sort and add",
    "copy": "copy a string of letters",
    "reverse": "reverse a string of letters",
    "sort": "sort letters in ascending order",
    "add": "add two numbers below 1000, the sum written least-significant digit first",
    "sort_desc": "sort letters in descending order (new task token)",
    "shift": f"Caesar shift every letter by {SHIFT} (new task token): a token-to-token remap",
    "rotate": "move the first letter to the end (new task token)",
    "evens": "keep every other letter, starting with the first: abcde -> ace (new task token)",
    "swap": "swap neighbouring letters: abcde -> badce (new task token)",
    "sort_desc_small": "sort_desc with only 256 training examples: a small-data regime",
}
RECALL_KEY_LEN, RECALL_VALUE_LEN = 4, 4  # letters: 26**4 = 456,976 possible keys
RECALL_SEED = 2024  # one sequence of pairs; recall_N is its first N


def recall_bits(n: int) -> float:
    """Information in n recall pairs, in bits: n * RECALL_VALUE_LEN * log2(26).

    The model is given each key, so only the values are information to store, and each value
    letter is drawn uniformly from 26: log2(26) = 4.70 bits. That is what the adapter must hold
    to answer every pair; at 4 letters a pair is 18.8 bits.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r}: expected a positive int (a number of pairs)")
    return n * RECALL_VALUE_LEN * math.log2(len(LETTERS))


N_TRAIN, N_HELDOUT, N_SMALL = 20_000, 512, 256
TASKS: tuple[str, ...] = ("pretrain", *PRETRAIN_TASKS, *FINETUNE_TASKS)
_CACHE: dict[str, Task] = {}


def get_task(name: str) -> Task:
    """The named task (see `TASKS`); generated once per process, identical on every machine."""
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    if name not in _CACHE:
        _CACHE[name] = _build(name)
    return _CACHE[name]


def _build(name: str) -> Task:
    if name in RECALL_TASKS:
        return _build_recall(int(name.removeprefix("recall_")))
    base = name.removesuffix("_small")
    names = PRETRAIN_TASKS if name == "pretrain" else (base,)
    seed = sum(ord(c) for c in base)  # a fixed seed per task, independent of build order
    heldout = _generate(names, N_HELDOUT, seed=seed + 1)
    n_train = N_SMALL if name.endswith("_small") else N_TRAIN
    if name == "pretrain":
        n_train *= 4
    held_keys = {(nm, tuple(p)) for nm, p, _ in heldout}
    train = _generate(names, n_train, seed=seed, exclude=held_keys)
    tr_x, tr_y = _to_tensors(train)
    ho_x, ho_y = _to_tensors(heldout)
    shown = [(f"<{nm}> " + "".join(p), "".join(a)) for nm, p, a in heldout[:4]]
    return Task(name, DESCRIPTIONS[name], tr_x, tr_y, ho_x, ho_y, shown)


def _recall_pairs(n: int) -> list[tuple[list[str], list[str]]]:
    """The first n of one fixed sequence of (key, value) pairs: keys distinct, values random.

    Every recall task draws from the same sequence, so recall_256's pairs are recall_1024's
    first 256: a larger N only adds pairs.
    """
    rng = random.Random(RECALL_SEED)
    seen: set[tuple[str, ...]] = set()
    pairs = []
    while len(pairs) < n:
        key = [rng.choice(LETTERS) for _ in range(RECALL_KEY_LEN)]
        value = [rng.choice(LETTERS) for _ in range(RECALL_VALUE_LEN)]
        if tuple(key) in seen:  # a repeated key would ask for two answers to one prompt
            continue
        seen.add(tuple(key))
        pairs.append((key, value))
    return pairs


def _build_recall(n: int) -> Task:
    """recall_n: the n pairs are both the training set and the held-out set (the same tensors).

    Memorisation is the point: there is no rule to generalise, so held-out accuracy is the
    fraction of the training pairs the model recalls exactly.
    """
    examples = [("recall", key, value) for key, value in _recall_pairs(n)]
    x, y = _to_tensors(examples)
    description = (
        f"recall {n:,} random key -> value pairs ({RECALL_KEY_LEN}-letter keys, "
        f"{RECALL_VALUE_LEN}-letter values; new task token), scored on the same pairs it trains "
        f"on: memorisation, not generalisation; {recall_bits(n):,.0f} bits to store"
    )
    shown = [(f"<recall> {''.join(k)}", "".join(v)) for _, k, v in examples[:4]]
    return Task(f"recall_{n}", description, x, y, x, y, shown, bits=recall_bits(n))
