"""The one error family a user can cause. Every script catches ZedaError (and OSError for the filesystem) and
prints it as one line naming the file, flag, line or key, with exit code 2; anything else is a bug and keeps
its traceback.

ZedaError subclasses ValueError, so `except ValueError` in a caller's code still catches it.
"""

from __future__ import annotations

import sys


class ZedaError(ValueError):
    """A bad input (file, flag, value) the user can fix; the message says which and why."""


class ConfigError(ZedaError):
    """A config.json we cannot use; the message names the file and the field."""


class CheckpointError(ZedaError):
    """A checkpoint we cannot read; the message names the file and the key."""


class DataError(ZedaError):
    """A prompts / rollouts / benchmark file we cannot use; the message names the file and line."""


class MeshError(ZedaError):
    """A --dp/--tp/--ep combination that cannot work for this world size or model."""


class EvaluationError(ZedaError):
    """Bad input to an evaluation or a serving session; the message names the file, line or item."""


class UsageError(ZedaError):
    """Flags that cannot work together, or a value outside its range; the message names the flag."""


def exit_status(prog: str, main, interrupted: str = "interrupted; nothing half-written") -> int:
    """A script's exit status: main()'s, or 130 and one line on Ctrl-C (during a model load too) instead of a
    traceback. Every output is written atomically or appended record by record, so an interrupt loses at most
    the work in flight."""
    try:
        return main()
    except KeyboardInterrupt:
        print(f"\n{prog}: {interrupted}", file=sys.stderr)
        return 130
