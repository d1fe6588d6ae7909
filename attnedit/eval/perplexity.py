"""Token-level perplexity with a sliding window, the way the Hugging Face perplexity guide computes it.

The whole text is tokenised once. Windows of ``max_length`` tokens start every ``stride`` tokens;
each window scores only the tokens the previous window did not (the first window scores all but its
first token), so every token after the first is scored exactly once, with up to
``max_length - stride`` tokens of context before it. Perplexity is ``exp`` of the mean NLL over the
scored tokens. (The guide's own loop weights each window by ``trg_len - 1`` tokens; we count the
scored tokens exactly, which is what token-level perplexity means.)

WikiText-2 is read from the raw test file and laid out as Hugging Face ``wikitext-2-raw-v1``'s
``test["text"]`` rows joined by ``"\\n\\n"``, as in the guide, so figures are comparable with
published ones computed that way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import AttnEditError

WIKITEXT2_FILE = Path("wikitext-2-raw") / "wiki.test.raw"


@dataclass(frozen=True)
class PerplexitySettings:
    """Window length, stride, and an optional cap on the tokens read (for quick runs)."""

    max_length: int = 2048  # capped at the model's max_position_embeddings
    stride: int = 1024
    max_tokens: int | None = None  # score only the first N tokens of the text

    def __post_init__(self):
        if self.max_length < 2 or not 1 <= self.stride <= self.max_length:
            raise AttnEditError("perplexity needs max_length >= 2 and 1 <= stride <= max_length")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise AttnEditError("perplexity --ppl-tokens must be at least 2")


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per scored token, nats
    tokens: int  # scored tokens

    def metrics(self) -> dict:
        return asdict(self)


def wikitext2_text(path: str | Path) -> str:
    """The raw WikiText-2 test file as the HF guide's ``"\\n\\n".join(test["text"])``.

    HF's loader yields one row per line, keeping the newline, and an empty string for blank lines.
    """
    path = Path(path)
    if not path.is_file():
        raise AttnEditError(f"WikiText-2 test file not found at {path}; pass --data-dir with wikitext-2-raw/wiki.test.raw")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return "\n\n".join(line if line.strip() else "" for line in lines)


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of the whole text, shape (1, n), optionally cut to ``max_tokens``."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids[:, :max_tokens] if max_tokens else ids


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)`` per window: the window is ``ids[begin:end]``, its last
    ``n_scored`` tokens are scored (the first window: all but its first token)."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        # a token needs one before it in its window: with stride == max_length, each window's
        # first token goes unscored, as in the guide
        out.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n_tokens:
            break
    return [w for w in out if w[2] > 0]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, settings: PerplexitySettings = PerplexitySettings(), progress: str | None = None) -> PerplexityResult:
    """Sliding-window token-level perplexity of ``model`` (an HF causal LM) on ``ids`` (1, n);
    ``progress`` names a progress bar on stderr (None: no bar)."""
    if ids.shape[1] < 2:
        raise AttnEditError("perplexity needs at least 2 tokens of text")
    limit = getattr(model.config, "max_position_embeddings", None) or settings.max_length
    max_length = min(settings.max_length, limit)
    stride = min(settings.stride, max_length)
    device = next(model.parameters()).device
    nll_sum, scored = 0.0, 0
    spans = windows(ids.shape[1], max_length, stride)
    for begin, end, n in tqdm(spans, desc=progress, disable=progress is None, unit="window"):
        window = ids[:, begin:end].to(device)
        # logits at positions end-n-1 .. end-2 predict the n scored tokens
        logits = model(window, logits_to_keep=n + 1, use_cache=False).logits[:, :-1]
        targets = window[:, -n:]
        nll_sum += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"))
        scored += n
    nll = nll_sum / scored
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=scored)
