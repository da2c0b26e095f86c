"""The one exception type qig raises for bad input: its message says what was wrong and the fix."""


class QigError(Exception):
    """Bad input or an impossible request; the CLI prints its message as one line."""
