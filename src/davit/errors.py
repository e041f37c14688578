"""The one base class of every user mistake davit reports: :class:`UserError`.

A user error (bad path, wrong checkpoint, unreadable image, impossible config, full disk) is printed by the CLI as one
line naming the problem and the fix, with a non-zero exit. Library code raises a subclass (``ConfigError``,
``CheckpointError``, ``ImageReadError``, ...) and callers may catch ``UserError`` (or ``ValueError``, its base, for
backward compatibility).

Errors raised inside DataLoader workers reach the main process re-created by torch as
``type(e)("Caught X in DataLoader worker process N.\\nOriginal Traceback ...")``; :class:`UserError` recovers the
original one-line message from that text, so a worker's error reads exactly as if the main process had raised it.
"""

from __future__ import annotations

import re

__all__ = ["DiskFullError", "LoaderWorkerError", "UserError", "user_message"]

# torch.utils.data._utils.ExceptionWrapper.reraise: "Caught {name} {where}.\nOriginal Traceback (most recent ...):\n"
_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.S)


def user_message(text: str) -> str:
    """The original message of an error re-raised from a DataLoader worker (``text`` itself otherwise)."""
    if not _WORKER.match(text):
        return text
    # The traceback's last line is "<module>.<Class>: <message>" (the message may itself span lines: keep them all).
    lines = text.rstrip("\n").splitlines()
    for i in range(len(lines) - 1, 0, -1):
        m = re.match(r"^[\w.]+(Error|Exception|Interrupt)\b: ?(.*)$", lines[i])
        if m and not lines[i].startswith(" "):
            return "\n".join([m.group(2), *lines[i + 1 :]]).strip()
    return text


class UserError(ValueError):
    """A user mistake; the message names the thing and the fix. The CLI prints it in one line and exits with 2."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (user_message(args[0]),)
        super().__init__(*args)


class DiskFullError(UserError):
    """No space left on the device while saving; the message says where and how much the save needed."""


class LoaderWorkerError(UserError):
    """A data loader worker died (killed, out of memory); the message says what survived and how to resume."""
