"""Tokenise documents, pack them into fixed-length blocks with EOS between documents, shuffle, hold out.

Held-out split: the leading documents of the first file (in ``data.files`` order) until ``heldout_blocks``
blocks are filled, always whole documents; training skips exactly those documents. It depends on the
files, tokenizer and ``seq_len`` only, not on the seed, so every run of a recipe validates on the same text.

Training order: each epoch visits the files in an order shuffled from ``(seed, epoch)``; documents are
packed in file order and every run of ``shuffle_buffer`` consecutive blocks (a *chunk*) is permuted with
a generator seeded from ``(seed, epoch, chunk)``. The state of the stream is therefore the chunk's start
position in the files plus the number of its blocks already served: a few integers. An exact resume
reads the file up to that position (decompressing and parsing, not tokenising: ~2 s per Wikipedia
shard on a 2-core CPU) and tokenises one chunk again.
"""

from __future__ import annotations

import copy
import hashlib
import random
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import astuple, dataclass
from itertools import islice
from pathlib import Path

import torch

from ..errors import AttnEditError
from ..io import content_sha256
from .config import DataConfig
from .sources import Source, check_files, iter_pieces

TOKENIZE_PIECES = 64  # pieces per tokenizer call (fast tokenizers encode a batch in parallel)
TOKENIZE_CHARS = 1 << 20  # ... or fewer, once their text reaches this many characters
STATE_VERSION = 1


@dataclass(frozen=True)
class Position:
    """Where reading resumes: file (index in the epoch's order), piece within it, tokens of it consumed."""

    file: int = 0
    piece: int = 0
    token: int = 0


def eos_id(cfg: DataConfig, tokenizer) -> int:
    """The id placed after every document: ``cfg.eos_token`` if set, else the tokenizer's EOS."""
    if cfg.eos_token is not None:
        tid = tokenizer.convert_tokens_to_ids(cfg.eos_token)
        if tid is None or (tid == tokenizer.unk_token_id and cfg.eos_token != tokenizer.unk_token):
            raise AttnEditError(f"data.eos_token={cfg.eos_token!r} is not a token of the tokenizer; name one of its special tokens")
        return int(tid)
    if tokenizer.eos_token_id is None:
        raise AttnEditError("the tokenizer has no EOS token; set data.eos_token to the token that separates documents")
    return int(tokenizer.eos_token_id)


def resolve_tokenizer(cfg: DataConfig, teacher_tokenizer, vocab_size: int | None = None):
    """The tokenizer to use: the teacher's, or ``cfg.tokenizer`` after checking it matches the teacher's.

    ``vocab_size`` (the teacher's embedding rows) rejects a tokenizer that would index past the embedding.
    """
    tok = teacher_tokenizer
    if cfg.tokenizer is not None:
        from transformers import AutoTokenizer

        from ..teachers import SMOLLM2_ALIAS, local_path

        path = local_path(cfg.tokenizer) if cfg.tokenizer == SMOLLM2_ALIAS else cfg.tokenizer
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise AttnEditError(f"cannot load data.tokenizer {cfg.tokenizer!r} ({str(e).splitlines()[0]}); give a tokenizer folder or null") from None
        if teacher_tokenizer is not None and tok.get_vocab() != teacher_tokenizer.get_vocab():
            raise AttnEditError(
                f"data.tokenizer {cfg.tokenizer!r} does not match the teacher's vocabulary ({len(tok)} vs "
                f"{len(teacher_tokenizer)} tokens); use the teacher's tokenizer (data.tokenizer: null)"
            )
    if tok is None:
        raise AttnEditError("the teacher comes without a tokenizer; set data.tokenizer to a tokenizer folder that matches it")
    if vocab_size is not None and len(tok) > vocab_size:
        raise AttnEditError(f"the tokenizer has {len(tok)} tokens but the teacher embeds only {vocab_size}; use the teacher's own tokenizer")
    return tok


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _batches(pieces: Iterator[tuple[int, tuple[str, bool]]]) -> Iterator[list[tuple[int, tuple[str, bool]]]]:
    """Group pieces for one tokenizer call: at most TOKENIZE_PIECES, and about TOKENIZE_CHARS of text."""
    batch, chars = [], 0
    for item in pieces:
        batch.append(item)
        chars += len(item[1][0])
        if len(batch) == TOKENIZE_PIECES or chars >= TOKENIZE_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenised(path: Source, cfg: DataConfig, tokenizer, eos: int, first: int) -> Iterator[tuple[int, list[int], bool]]:
    """``(piece index, token ids, ends document)`` of ``path`` from piece ``first`` on; EOS ends each document."""
    for batch in _batches(enumerate(islice(iter_pieces(path, cfg.text_field, cfg.txt_documents), first, None), first)):
        for (index, (_, ends)), ids in zip(batch, _encode(tokenizer, [text for _, (text, _) in batch])):
            yield index, ids + [eos] if ends else ids, ends


def _split_heldout(cfg: DataConfig, tokenizer, files: list[Source], eos: int) -> tuple[torch.Tensor, dict[Source, int]]:
    """The held-out blocks and, per file, how many leading pieces they use (training skips those)."""
    need = cfg.heldout_blocks * cfg.seq_len
    tokens: list[int] = []
    skip: dict[Source, int] = {}
    if need:
        for path in files:
            for index, ids, ends in _tokenised(path, cfg, tokenizer, eos, 0):
                skip[path] = index + 1
                tokens.extend(ids[: need - len(tokens)])
                if len(tokens) == need and ends:
                    return torch.tensor(tokens, dtype=torch.long).view(-1, cfg.seq_len), skip
        raise AttnEditError(
            f"the data files hold fewer than heldout_blocks x seq_len = {need} tokens plus training data; add files or lower data.heldout_blocks"
        )
    return torch.empty(0, cfg.seq_len, dtype=torch.long), skip


def heldout_blocks(cfg: DataConfig, tokenizer) -> torch.LongTensor:
    """``[cfg.heldout_blocks, cfg.seq_len]`` validation blocks, the same for every seed; never in training."""
    files = check_files(cfg)
    return _split_heldout(cfg, tokenizer, files, eos_id(cfg, tokenizer))[0]


def epoch_order(n_files: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch ``epoch`` visits the files, shuffled from ``(seed, epoch)``."""
    order = list(range(n_files))
    random.Random(f"attnedit-data:{seed}:{epoch}").shuffle(order)
    return order


class _Packer:
    """Cuts a stream of tokenised pieces into ``seq_len`` blocks and knows the position of its next token."""

    def __init__(self, pieces: Iterator[tuple[Position, list[int]]], seq_len: int, start: Position):
        self.pieces, self.seq_len = pieces, seq_len
        self.position = start  # of the next unconsumed token
        self.ids: list[int] = []  # the current piece's ids from the token at which it was entered
        self.offset = 0  # ids consumed of it

    def block(self) -> list[int] | None:
        """The next block, or None when the epoch has fewer than ``seq_len`` tokens left (they are dropped)."""
        out: list[int] = []
        while len(out) < self.seq_len:
            if self.offset == len(self.ids):
                nxt = next(self.pieces, None)
                if nxt is None:
                    return None
                (self.position, self.ids), self.offset = nxt, 0
                continue
            take = self.ids[self.offset : self.offset + self.seq_len - len(out)]
            out.extend(take)
            self.offset += len(take)
            p = self.position
            self.position = Position(p.file, p.piece, p.token + len(take))
        return out


class BlockStream:
    """Endless, shuffled ``[batch, seq_len]`` training batches from ``cfg.files``; resumable exactly.

    Memory stays flat: two chunks of ``shuffle_buffer`` blocks plus one tokenizer batch of text. With
    ``prefetch`` a background thread reads and tokenises the next chunk while the current one is served
    (the tokenizer and decompression release the GIL); the batches are the same either way.
    """

    def __init__(self, cfg: DataConfig, tokenizer, seed: int = 0, prefetch: bool = True):
        # a private copy when reading ahead: a Hugging Face tokenizer call may reset the shared backend's
        # truncation/padding settings, which a caller using the same tokenizer meanwhile could change
        self.cfg, self.tokenizer, self.seed = cfg, copy.deepcopy(tokenizer) if prefetch else tokenizer, seed
        self.files = check_files(cfg)
        self.eos = eos_id(cfg, tokenizer)
        self._skip = _split_heldout(cfg, tokenizer, self.files, self.eos)[1]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="attnedit-data") if prefetch else None
        self._ahead: Future | None = None
        self.tokens_served = 0
        self._restart(0, -1, Position())

    # reading (only the prefetch thread touches the reader while a chunk is being read ahead) --------
    def _pieces(self, order: list[int], start: Position) -> Iterator[tuple[Position, list[int]]]:
        """Tokenised pieces of one epoch from ``start``, each with the position of its first token."""
        for f in range(start.file, len(order)):
            path = self.files[order[f]]
            first = max(start.piece if f == start.file else 0, self._skip.get(path, 0))
            for index, ids, _ in _tokenised(path, self.cfg, self.tokenizer, self.eos, first):
                token = start.token if (f, index) == (start.file, start.piece) else 0
                yield Position(f, index, token), ids[token:]

    def _seek(self, epoch: int, chunk: int, start: Position) -> None:
        """Point the reader at ``start`` of ``epoch``; the next chunk it reads gets index ``chunk + 1``."""
        pieces = self._pieces(epoch_order(len(self.files), self.seed, epoch), start)
        self._reader = [epoch, chunk, _Packer(pieces, self.cfg.seq_len, start)]

    def _read_chunk(self) -> tuple[int, int, Position, torch.Tensor]:
        """``(epoch, chunk index, start, shuffled blocks)`` of the next chunk; moves on to new epochs."""
        epoch, chunk, packer = self._reader
        start = packer.position
        blocks = []
        while len(blocks) < self.cfg.shuffle_buffer and (b := packer.block()) is not None:
            blocks.append(b)
        if not blocks:
            if chunk < 0 and start == Position():
                raise AttnEditError(
                    f"no training block of seq_len={self.cfg.seq_len} tokens is left after the held-out split; "
                    "add data files or lower data.seq_len / data.heldout_blocks"
                )
            self._seek(epoch + 1, -1, Position())
            return self._read_chunk()
        self._reader[1] = chunk + 1
        order = list(range(len(blocks)))
        random.Random(f"attnedit-chunk:{self.seed}:{epoch}:{chunk + 1}").shuffle(order)
        return epoch, chunk + 1, start, torch.tensor(blocks, dtype=torch.long)[order]

    def _read_ahead(self) -> None:
        if self._pool is not None:
            self._ahead = self._pool.submit(self._read_chunk)

    def _next_chunk(self) -> None:
        ahead, self._ahead = self._ahead, None
        self.epoch, self._chunk_index, self._chunk_start, self._chunk = ahead.result() if ahead else self._read_chunk()
        self._served = 0
        self._read_ahead()

    def _restart(self, epoch: int, chunk: int, start: Position, served: int | None = None) -> None:
        """Serve from chunk ``chunk`` of ``epoch`` (read again from ``start``), ``served`` blocks of it used."""
        if self._ahead is not None:
            if not self._ahead.cancel():
                self._ahead.exception()  # wait for a running read to finish before the reader moves
            self._ahead = None
        self._seek(epoch, chunk - 1 if served is not None else chunk, start)
        self.epoch, self._chunk_index, self._chunk_start = epoch, chunk, start
        self._chunk, self._served = torch.empty(0, self.cfg.seq_len, dtype=torch.long), 0
        if served is not None:
            self._next_chunk()
            self._served = served
        else:
            self._read_ahead()

    # public -------------------------------------------------------------------------------------
    def next_batch(self, batch_size: int) -> torch.LongTensor:
        """``[batch_size, seq_len]`` token ids; runs through the epochs forever."""
        rows = []
        for _ in range(batch_size):
            if self._served == len(self._chunk):
                self._next_chunk()
            rows.append(self._chunk[self._served])
            self._served += 1
        self.tokens_served += batch_size * self.cfg.seq_len
        return torch.stack(rows)

    def check(self) -> None:
        """Read the first chunk now (what the first ``next_batch`` would do), so data that holds no
        training block fails before a run writes anything; the batches served are the same."""
        if self._served == len(self._chunk):
            self._next_chunk()

    def fingerprint(self) -> str:
        """What the stream's order depends on, the files' content included (sha256, cached); a state
        only loads into a stream with the same one."""
        if getattr(self, "_fingerprint", None) is None:
            c = self.cfg
            parts = [c.seq_len, c.heldout_blocks, c.shuffle_buffer, c.text_field, c.txt_documents, self.eos, self.seed, len(self.tokenizer)]
            parts += [(p.name, content_sha256(p)) if isinstance(p, Path) else astuple(p) for p in self.files]
            self._fingerprint = hashlib.sha1(repr(parts).encode()).hexdigest()[:16]
        return self._fingerprint

    def mark(self) -> tuple:
        """The position as it is now, cheaply (no file access): :meth:`state_dict` turns it into a state later."""
        return (self.epoch, self._chunk_index, list(astuple(self._chunk_start)), self._served, self.tokens_served)

    def state_dict(self, mark: tuple | None = None) -> dict:
        """A few integers (JSON-serialisable): the current chunk's start, blocks served from it, counters.

        With ``mark`` (from :meth:`mark`), the state at that earlier point of the same stream.
        """
        epoch, chunk, start, served, tokens = mark if mark is not None else self.mark()
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint(),
            "epoch": epoch,
            "chunk": chunk,
            "start": list(start),
            "served": served,
            "tokens_served": tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken: the next batches equal the uninterrupted stream's."""
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != self.fingerprint():
            raise AttnEditError(
                "the saved data position belongs to different data settings or contents (files and their bytes, seq_len, "
                "shuffle, seed or tokenizer); restore the run's data files as they were, or start a new run with another --out"
            )
        chunk = int(state["chunk"])
        self._restart(int(state["epoch"]), chunk, Position(*state["start"]), int(state["served"]) if chunk >= 0 else None)
        self.tokens_served = int(state["tokens_served"])
