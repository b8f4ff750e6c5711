"""The exception types users see, and the warning category for input hepaseg repairs.

Every problem with user input (a file, an option, a checkpoint) raises
:class:`HepasegError` with a one-line message of the form
``"<file or option>: <problem>: expected X, got Y. <how to fix>"``.
The CLI prints it as ``error: ...`` and exits with status 1; anything else is a
bug and keeps its traceback.

:class:`Terminated` is the HepasegError of a command stopped by SIGTERM (what SLURM,
``timeout`` and ``docker stop`` send): its message says what was kept (e.g. ``last.ckpt``
for ``--resume``), and the CLI exits with ``128 + signal`` (143), as the shell would.

Input that hepaseg can use after leaving something out (an odd image inside a
DICOM series) emits a :class:`HepasegWarning` naming the file; the CLI prints it
as ``warning: ...``.
"""

import signal

__all__ = ["HepasegError", "HepasegWarning", "Terminated"]


class HepasegError(Exception):
    """A user-facing error with a one-line message (naming the file when there is one)."""

    exit_code = 1


class Terminated(HepasegError):
    """A command stopped by a termination signal; ``exit_code`` is ``128 + signum``."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)


class HepasegWarning(UserWarning):
    """Something in the input was left out or repaired; the message names the file and why."""
