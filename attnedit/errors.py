"""The one exception type that reaches users as a one-line message (the CLI prints it, exit code 2)."""


class AttnEditError(Exception):
    """Bad input or an impossible request. The message says what is wrong and what to do."""


def is_out_of_memory(e: BaseException) -> bool:
    """A device or host out-of-memory error: CUDA's ``OutOfMemoryError``, ``MemoryError``, or the
    ``RuntimeError`` torch's CPU allocator raises (``DefaultCPUAllocator: can't allocate memory``)."""
    import torch

    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)
