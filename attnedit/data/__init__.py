"""Training data: files -> documents -> tokens (EOS between documents) -> shuffled fixed-length blocks.

``BlockStream`` serves endless training batches and resumes exactly from its ``state_dict``;
``heldout_blocks`` gives the validation blocks, whose documents training never sees.
"""

from .batches import DeviceBatches
from .config import DataConfig, default_files
from .sources import DatasetSource, check_files, iter_pieces
from .stream import BlockStream, Position, eos_id, heldout_blocks, resolve_tokenizer

__all__ = [
    "BlockStream",
    "DeviceBatches",
    "DataConfig",
    "DatasetSource",
    "Position",
    "check_files",
    "default_files",
    "eos_id",
    "heldout_blocks",
    "iter_pieces",
    "resolve_tokenizer",
]
