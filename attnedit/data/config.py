"""The recipe's ``data:`` section: which files, how they are cut into training blocks, the held-out split.

Every field has a default and a one-line help (``metadata['help']``) that ``attnedit recipe --explain``
prints through :meth:`DataConfig.help`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import AttnEditError
from ..paths import data_root

TXT_DOCUMENTS = ("paragraph", "line", "file")


def default_files() -> list[str]:
    """The offline Wikipedia shards under :func:`attnedit.paths.data_root`."""
    return [str(data_root() / "wikipedia-en-2019" / "*.jsonl.xz")]


def _help(text: str, default=None, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class DataConfig:
    files: list[str] = _help(
        "paths or globs of .txt/.raw, .jsonl (.gz/.xz) or .parquet files; relative ones are looked up from the "
        "working directory, then the repo (default: the offline Wikipedia shards)",
        factory=default_files,
    )
    text_field: str = _help("JSONL/Parquet field that holds each document's text", "text")
    seq_len: int = _help("tokens per packed training block (documents are joined with EOS and cut)", 512)
    heldout_blocks: int = _help("blocks held out for validation; their documents never reach training", 32)
    shuffle_buffer: int = _help("blocks read ahead and shuffled together (memory stays flat; larger mixes more)", 256)
    tokenizer: str | None = _help("tokenizer folder or alias; default (null): the teacher's; must match its vocabulary")
    eos_token: str | None = _help("token put after every document (default: the tokenizer's EOS token)")
    txt_documents: str = _help("what one document is in a .txt file: 'paragraph' (blank-line separated), 'line' or 'file'", "paragraph")
    dataset: str | None = _help(
        "a Hugging Face `datasets` dataset used instead of data.files: a save_to_disk folder, or a name "
        "datasets.load_dataset finds offline (nothing downloads at run time)"
    )
    dataset_split: str = _help("split of data.dataset to train on", "train")

    def __post_init__(self):
        if isinstance(self.files, str):
            self.files = [f.strip() for f in self.files.split(",") if f.strip()]

    @classmethod
    def help(cls) -> list[tuple[str, str, object]]:
        """(name, one-line help, default) of every field, for ``--explain``."""
        return [
            (f.name, f.metadata["help"], f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default) for f in dataclasses.fields(cls)
        ]

    def validate(self) -> None:
        """Reject values no run could use, with a one-line message naming the field."""
        if not self.files and self.dataset is None:
            raise AttnEditError("data.files is empty; give at least one file or glob, e.g. data.files=corpus/*.jsonl")
        if self.seq_len < 2:
            raise AttnEditError(f"data.seq_len={self.seq_len}: needs at least 2 tokens (one input and one target); use e.g. 512")
        if self.heldout_blocks < 0:
            raise AttnEditError(f"data.heldout_blocks={self.heldout_blocks}: must be >= 0")
        if self.shuffle_buffer < 1:
            raise AttnEditError(f"data.shuffle_buffer={self.shuffle_buffer}: must be >= 1 (1 = no shuffling)")
        if self.txt_documents not in TXT_DOCUMENTS:
            raise AttnEditError(f"data.txt_documents={self.txt_documents!r}: choose one of {', '.join(TXT_DOCUMENTS)}")
        if not self.text_field:
            raise AttnEditError("data.text_field is empty; name the JSONL/Parquet field holding the text, e.g. text")
