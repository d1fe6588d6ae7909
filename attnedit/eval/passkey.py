"""Synthetic passkey retrieval: can the model fetch a 5-digit key hidden at a given depth of filler?

Each prompt is exactly ``context`` tokens: an instruction, repeated filler sentences with the key
sentence placed at ``depth`` (0 = right after the instruction, 1 = right before the question), and
the question ``What is the pass key? The pass key is``. The model answers greedily through its real
cache; a trial counts when the first number it writes is the key. Student and teacher see the same
prompts (the student's tokenizer, which is the teacher's).

Sliding-window layers cannot see a key further back than their window; only full-attention layers
(and sink tokens) can carry it, so the accuracy grid shows what a hybrid layout keeps and loses.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AttnEditError, is_out_of_memory
from ..schema import require, setting
from .generation import generate_greedy
from .models import check_contexts
from .progress import Progress, models_key

INSTRUCTION = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about it.\n"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
FILLERS = ("same", "varied")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
VARIED = "each with its own shuffled filler"  # how every output names filler: varied (filler_note)


@dataclass
class PasskeySettings:
    """Where and how often the key is hidden (``attnedit passkey``'s flags, the recipe's ``eval.passkey:``)."""

    contexts: list[int] = setting([1024, 2048, 4096], "prompt lengths in tokens; a prompt needs about 100 or more")
    depths: list[float] = setting(list(DEFAULT_DEPTHS), "where the key sits, 0 = start .. 1 = end")
    trials: int = setting(5, "keys per cell, run as one batch")
    seed: int = setting(0, "seed of the keys")
    filler: str = setting(
        "same",
        "'same': every trial's filler is the same repeated sentences (the classic prompt), so the trials of a cell "
        "differ only in the key; 'varied': each trial repeats them in its own shuffled order, so a cell samples "
        "contexts too",
        FILLERS,
    )

    def __post_init__(self):
        require(self, [
            (self.filler in FILLERS, "filler", "must be 'same' or 'varied'"),
            (all(c >= 1 for c in self.contexts), "contexts", "must be positive integers"),
            (all(0.0 <= d <= 1.0 for d in self.depths), "depths", "must be fractions between 0 and 1, e.g. 0,0.5,1"),
            (self.trials >= 1, "trials", "must be at least 1"),
        ])  # fmt: skip


def filler_note(filler: str | None) -> str:
    """What printed figures add after the number of keys: ", each with its own shuffled filler" for 'varied'."""
    return f", {VARIED}" if filler == "varied" else ""


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def filler_tokens(tokenizer, n: int, order_seed: int | None = None) -> list[int]:
    """``n`` tokens of filler: :data:`FILLER` repeated, or with ``order_seed`` its sentences repeated in orders
    shuffled by that seed (a different text for each seed, the same sentences)."""
    if order_seed is None:
        unit = _tokens(tokenizer, FILLER)
        return (unit * (n // len(unit) + 1))[:n]
    rng = random.Random(order_seed)
    sentences = [x.strip() + "." for x in FILLER.split(".") if x.strip()]
    out: list[int] = []
    while len(out) < n:
        rng.shuffle(sentences)
        out += _tokens(tokenizer, " ".join(sentences) + " ")
    return out[:n]


def passkey_prompt(tokenizer, context: int, depth: float, key: str, order_seed: int | None = None) -> list[int]:
    """Token ids of one prompt of exactly ``context`` tokens with ``key`` at ``depth`` (0..1) of the filler
    (the classic repeated filler, or with ``order_seed`` the shuffled one of :func:`filler_tokens`)."""
    if not 0.0 <= depth <= 1.0:
        raise AttnEditError(f"depth {depth} is outside 0..1; give depths as fractions, e.g. --depths 0,0.5,1")
    start = tokenizer("")["input_ids"]  # the special tokens this tokenizer puts first (BOS), if any
    head, needle, question = (
        _tokens(tokenizer, INSTRUCTION),
        _tokens(tokenizer, NEEDLE.format(key=key)),
        _tokens(tokenizer, QUESTION),
    )
    n_fill = context - len(start) - len(head) - len(needle) - len(question)
    if n_fill < 0:
        raise AttnEditError(f"context {context} is too short for a passkey prompt; use at least {context - n_fill} tokens")
    filler = filler_tokens(tokenizer, n_fill, order_seed)
    cut = round(depth * n_fill)
    return start + head + filler[:cut] + needle + filler[cut:] + question


def answer_is(text: str, key: str) -> bool:
    """Whether the first number in ``text`` is ``key``."""
    found = re.search(r"\d+", text)
    return found is not None and found.group() == key


def trial_keys(trials: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [str(rng.randint(10000, 99999)) for _ in range(trials)]


@torch.no_grad()
def greedy_answers(model, tokenizer, rows: list[list[int]], new_tokens: int = 8) -> list[str]:
    """The text each prompt in ``rows`` (equal-length token ids) makes the model write, greedily through its
    real cache, all rows as one batch."""
    ids = torch.tensor(rows, device=next(model.parameters()).device)
    return tokenizer.batch_decode(generate_greedy(model, ids, new_tokens).cpu(), skip_special_tokens=True)


def passkey_accuracy(model, tokenizer, context: int, depth: float, keys: list[str], new_tokens: int = 8, filler: str = "same") -> float:
    """Fraction of ``keys`` the model retrieves at (``context``, ``depth``); all trials run as one batch.
    With ``filler='varied'`` trial i's filler is shuffled with seed i (the same texts for every model)."""
    seeds = range(len(keys)) if filler == "varied" else [None] * len(keys)
    rows = [passkey_prompt(tokenizer, context, depth, k, s) for k, s in zip(keys, seeds)]
    answers = greedy_answers(model, tokenizer, rows, new_tokens)
    return sum(answer_is(a, k) for a, k in zip(answers, keys)) / len(keys)


def run_passkey(
    models: dict,
    tokenizer,
    contexts: list[int],
    depths: list[float],
    trials: int = 5,
    seed: int = 0,
    log=print,
    filler: str = "same",
    progress: Progress | None = None,
) -> dict:
    """Accuracy per (context, depth) for each model in ``models``, as ``passkey.json``:
    ``{"contexts": [...], "depths": [...], "trials": int, "filler": str, NAME: [[accuracy per depth] per context], ...}``.
    With ``progress``, each model's row of a context is kept there as soon as it is done, and rows it holds already
    are not measured again."""
    if tokenizer is None:
        raise AttnEditError(
            "the model folder has no tokenizer; passkey retrieval needs one: save the teacher's tokenizer into it "
            "(tokenizer.save_pretrained), or edit again with attnedit edit ... --tokenizer PATH"
        )
    if trials < 1 or not contexts or not depths:
        raise AttnEditError("passkey needs at least one context, one depth and one trial")
    for name, model in models.items():
        check_contexts(model.config, contexts, f"the {name}")
        if model.config.vocab_size < len(tokenizer):
            raise AttnEditError(f"the {name}'s vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's ({len(tokenizer)})")
    keys = trial_keys(trials, seed)
    if filler not in FILLERS:
        raise AttnEditError(f"passkey filler {filler!r}: choose 'same' or 'varied'")
    result = {"contexts": list(contexts), "depths": list(depths), "trials": trials, "filler": filler}
    progress = progress or Progress(None, {})
    for name, model in models.items():
        grid = []
        for context in contexts:
            kept = progress.done(name).get(str(context))
            if kept is not None and len(kept) == len(depths):
                grid.append(kept)
                log(f"passkey {name} context {context}: " + " ".join(f"{a:.2f}" for a in grid[-1]) + " (kept from the stopped run)")
                continue
            try:
                grid.append([passkey_accuracy(model, tokenizer, context, d, keys, filler=filler) for d in depths])
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                raise AttnEditError(
                    f"the {name} ran out of memory at context {context} with {len(keys)} trials in one batch; "
                    "use shorter --contexts, fewer --trials or a device with more memory"
                ) from None
            progress.put(name, str(context), grid[-1])
            log(f"passkey {name} context {context}: " + " ".join(f"{a:.2f}" for a in grid[-1]))
        result[name] = grid
    return result


def passkey_json(model: str, teacher: str, student, teacher_model, tokenizer, settings: PasskeySettings, log=print, progress: str | Path | None = None) -> dict:
    """``passkey.json`` for a student and its teacher (both loaded): the grid of :func:`run_passkey` plus both
    names (built as its record, :class:`attnedit.results.Passkey`). With ``progress`` (a file), each finished row is
    kept there and a stopped run goes on from them (:mod:`attnedit.eval.progress`); the caller removes it once the
    result is saved."""
    from ..results import Passkey

    first = next(student.parameters())
    key = {
        **models_key(model, teacher), "depths": settings.depths, "trials": settings.trials, "seed": settings.seed, "filler": settings.filler,
        "device": first.device.type, "dtype": str(first.dtype),
    }  # fmt: skip
    grid = run_passkey(
        {"student": student, "teacher": teacher_model}, tokenizer, settings.contexts, settings.depths, settings.trials,
        settings.seed, log=log, filler=settings.filler, progress=Progress(progress, key),
    )  # fmt: skip
    return Passkey(model=model, teacher_model=teacher, **grid).to_dict()


def format_passkey(result: dict) -> str:
    from ..tables import text_table

    names = [n for n in ("student", "teacher") if n in result]
    headers = ["model", "context"] + [f"depth {d:g}" for d in result["depths"]]
    rows = [[n, c] + [f"{a:.2f}" for a in accs] for n in names for c, accs in zip(result["contexts"], result[n])]
    right = set(range(1, len(headers)))
    note = filler_note(result.get("filler"))
    return f"passkey retrieval, accuracy over {result['trials']} trials per cell{note}\n" + text_table(headers, rows, right)
