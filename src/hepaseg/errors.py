"""The one exception type users see.

Every problem with user input (a file, an option, a checkpoint) raises
:class:`HepasegError` with a one-line message of the form
``"<file or option>: <problem>: expected X, got Y. <how to fix>"``.
The CLI prints it as ``error: ...`` and exits with status 1; anything else is a
bug and keeps its traceback.
"""

__all__ = ["HepasegError"]


class HepasegError(Exception):
    """A user-facing error with a one-line message (naming the file when there is one)."""
