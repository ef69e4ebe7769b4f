"""Typed errors that name the subject, the file and the fix.

Every error a user can cause by their input is one of these, raised early, before work starts
(validation) or at the start of the stage that finds it. The message format is fixed so users
(and tests) can rely on it::

    [sub-03] sub-03/dwi/sub-03_dwi.bval: 64 b-values but the image has 65 volumes.
      fix: regenerate the .bval so it has one value per volume.
"""

from __future__ import annotations

from pathlib import Path


class NeuroMoEError(Exception):
    """Base class of all errors this package raises on purpose."""


class InputError(NeuroMoEError):
    """Bad input data: names the subject, the file, what is wrong and how to fix it."""

    def __init__(self, cause: str, *, subject: str | None = None, path: str | Path | None = None,
                 fix: str | None = None, code: str | None = None) -> None:
        self.subject = subject
        self.path = str(path) if path is not None else None
        self.cause = cause
        self.fix = fix
        self.code = code  # the BIDS validator's code for the same check (VOLUME_COUNT_MISMATCH, ...), if any
        super().__init__(self.format())

    def format(self) -> str:
        head = f"[{self.subject}] " if self.subject else ""
        where = f"{self.path}: " if self.path else ""
        msg = f"{head}{where}{self.cause}" + (f" [{self.code}]" if self.code else "")
        if self.fix:
            msg += f"\n  fix: {self.fix}"
        return msg


class ValidationReport(NeuroMoEError):
    """Several input problems found at once; the message lists every one."""

    def __init__(self, problems: list[InputError]) -> None:
        self.problems = problems
        lines = [f"{len(problems)} problem(s) in the input; nothing was run:"]
        lines += ["- " + p.format().replace("\n", "\n  ") for p in problems]
        super().__init__("\n".join(lines))


class StageError(NeuroMoEError):
    """A processing stage cannot go on for one subject (e.g. a DWI without a b=0 volume)."""

    def __init__(self, cause: str, *, subject: str | None = None, stage: str | None = None,
                 path: str | Path | None = None, fix: str | None = None) -> None:
        self.subject, self.stage, self.cause, self.fix = subject, stage, cause, fix
        self.path = str(path) if path is not None else None
        head = f"[{subject}] " if subject else ""
        st = f"{stage}: " if stage else ""
        where = f"{self.path}: " if self.path else ""
        msg = f"{head}{st}{where}{cause}"
        if fix:
            msg += f"\n  fix: {fix}"
        super().__init__(msg)


class CacheError(NeuroMoEError):
    """A cache that does not match the current config or fails its checksum; never read silently."""
