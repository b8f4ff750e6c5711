"""The one exception type users see, and the warning category for input hepaseg repairs.

Every problem with user input (a file, an option, a checkpoint) raises
:class:`HepasegError` with a one-line message of the form
``"<file or option>: <problem>: expected X, got Y. <how to fix>"``.
The CLI prints it as ``error: ...`` and exits with status 1; anything else is a
bug and keeps its traceback.

Input that hepaseg can use after leaving something out (an odd image inside a
DICOM series) emits a :class:`HepasegWarning` naming the file; the CLI prints it
as ``warning: ...``.
"""

__all__ = ["HepasegError", "HepasegWarning"]


class HepasegError(Exception):
    """A user-facing error with a one-line message (naming the file when there is one)."""


class HepasegWarning(UserWarning):
    """Something in the input was left out or repaired; the message names the file and why."""
