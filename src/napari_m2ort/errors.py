"""One exception type for problems the user can fix.

Widgets show its message as a napari notification and the CLI prints it as one line and
exits with code 2, so the message must say which file, what is wrong and what to do.
"""


class M2ORTError(Exception):
    """A problem with the user's input that they can act on."""


class Cancelled(Exception):
    """Raised inside a long job when the user asked it to stop."""
