"""The one exception type that reaches users as a one-line message (the CLI prints it, exit code 2)."""


class AttnEditError(Exception):
    """Bad input or an impossible request. The message says what is wrong and what to do."""


def is_out_of_memory(e: BaseException) -> bool:
    """A device or host out-of-memory error: CUDA's ``OutOfMemoryError``, ``MemoryError``, or the
    ``RuntimeError`` torch's CPU allocator raises (``DefaultCPUAllocator: can't allocate memory``), raised itself or
    behind the error that reports it (a compiler's, whose compiled code ran out of memory)."""
    import torch

    seen = set()
    while e is not None and id(e) not in seen:  # also one wrapped by torch.compile (BackendCompilerFailed)
        seen.add(id(e))
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
            return True
        text = str(e)
        if isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text):
            return True
        e = getattr(e, "inner_exception", None) or e.__cause__
    return False
