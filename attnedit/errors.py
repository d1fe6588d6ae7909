"""The one exception type that reaches users as a one-line message (the CLI prints it, exit code 2)."""


class AttnEditError(Exception):
    """Bad input or an impossible request. The message says what is wrong and what to do."""
