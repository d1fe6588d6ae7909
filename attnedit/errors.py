"""The one exception type that reaches users as a one-line message (the CLI prints it, exit code 2)."""


class AttnEditError(Exception):
    """Bad input or an impossible request. The message says what is wrong and what to do."""


def is_out_of_memory(e: BaseException) -> bool:
    """A device or host out-of-memory error, raised itself or behind the error that reports it (the one check,
    :func:`attnedit.targets.common.is_out_of_memory`, which the remote code's own fallbacks use too)."""
    from .targets.common import is_out_of_memory as check

    return check(e)
