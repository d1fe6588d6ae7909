"""Training batches on the training device, one batch prepared ahead.

:class:`DeviceBatches` wraps a :class:`~attnedit.data.BlockStream`: while the device works on batch k,
a background thread draws batch k+1 from the stream, pins it (CUDA) and starts its host-to-device copy
(``non_blocking``). Resume stays exact: :meth:`DeviceBatches.state_dict` is the stream's position
*before* the batch drawn ahead, i.e. the position of the next batch to train on.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch


class DeviceBatches:
    """``next_batch(n)`` as a :class:`BlockStream` has it, but on ``device`` and drawn one batch ahead;
    ``transform`` (a pure function of the CPU batch) is applied in the background too."""

    def __init__(self, stream, device: torch.device | str, ahead: bool = True, transform=None):
        self.stream, self.device, self.transform = stream, torch.device(device), transform
        self.pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="attnedit-batches") if ahead else None
        self._pending: tuple[int, tuple, Future] | None = None  # (batch size, stream mark before it, batch)

    def _draw(self, batch_size: int) -> torch.Tensor:
        ids = self.stream.next_batch(batch_size)
        if self.transform is not None:  # a pure function of the batch (e.g. recall spans): resume stays exact
            ids = self.transform(ids)
        if self.device.type == "cpu":
            return ids
        if self.pin:
            ids = ids.pin_memory()
            with torch.cuda.device(self.device):
                return ids.to(self.device, non_blocking=True)  # the caching host allocator keeps the pinned copy alive
        return ids.to(self.device)

    def _drop_pending(self) -> tuple | None:
        """Forget the batch drawn ahead (after its draw finished); returns the stream mark before it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        pending[2].exception()  # wait: the stream must not move under a running draw
        return pending[1]

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """``[batch_size, seq_len]`` token ids on the device; the next batch is drawn meanwhile."""
        if self._pending is not None and self._pending[0] != batch_size:
            self.stream.load_state_dict(self.stream.state_dict(self._drop_pending()))  # another size: rewind
        if self._pending is not None:
            ids = self._pending[2].result()
            self._pending = None
        else:
            ids = self._draw(batch_size)
        if self._pool is not None:
            mark = self.stream.mark()  # taken here, while no draw runs
            self._pending = (batch_size, mark, self._pool.submit(self._draw, batch_size))
        return ids

    def state_dict(self) -> dict:
        """The position of the next batch ``next_batch`` returns (not of the one drawn ahead)."""
        if self._pending is not None:
            self._pending[2].exception()
            return self.stream.state_dict(self._pending[1])
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._drop_pending()
        self.stream.load_state_dict(state)

    def close(self) -> None:
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __getattr__(self, name):  # fingerprint, tokens_served, ... of the stream
        if name == "stream":
            raise AttributeError(name)
        return getattr(self.stream, name)
