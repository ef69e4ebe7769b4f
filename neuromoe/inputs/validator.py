"""The official BIDS validator as an option: ``bids-validator-deno`` (the schema validator the community runs).

An optional extra (``pip install -e '.[validator]'``: the validator's JavaScript bundle and the Deno runtime
as wheels, nothing fetched at run time). Turned on by ``validation.bids_validator: true`` (start-up of the
workflow and the BIDS App) or ``neuromoe validate --official``. Its JSON report is mapped to this project's
:class:`~neuromoe.errors.InputError` (subject, file, the schema's code, what to do) so its errors appear in
the same message as the project's own checks; where both report the same check (the same code for the same
subject) the project's message is kept (it names the numbers). Warnings are summarised per code.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from neuromoe.errors import InputError

PACKAGE = "bids-validator-deno==3.0.2"
INSTALL_HINT = f"pip install '{PACKAGE}'  (or from the repository: pip install -e '.[validator]')"
DOCS = "https://bids-validator.readthedocs.io"
_SUBJECT = re.compile(r"^/?(sub-[A-Za-z0-9]+)")


def validator_executable() -> str | None:
    """The ``bids-validator-deno`` next to this Python (the virtual environment), else on PATH."""
    return shutil.which("bids-validator-deno", path=str(Path(sys.executable).parent)) or \
        shutil.which("bids-validator-deno")


def _sentences(text: str) -> tuple[str, str]:
    """(first sentence, the rest) of a validator message, whitespace collapsed."""
    flat = " ".join(text.split())
    head, sep, rest = flat.partition(". ")
    return (head + ("." if sep else "")), rest


def parse_report(report: dict[str, Any]) -> tuple[list[InputError], list[str]]:
    """The validator's ``--json`` report as (errors, warnings): one InputError per error issue, with the subject
    from its location, the file, the code in the message, and the code's advice as the fix; one warning line
    per warning code with its count."""
    issues = report.get("issues", {})
    messages: dict[str, str] = issues.get("codeMessages", {})
    errors: list[InputError] = []
    warned: Counter[str] = Counter()
    for issue in issues.get("issues", []):
        code = issue.get("code", "UNKNOWN")
        if issue.get("severity") != "error":
            warned[code] += 1
            continue
        location = issue.get("location") or ""
        m = _SUBJECT.match(location)
        head, rest = _sentences(issue.get("issueMessage") or messages.get(code, ""))
        sub = f" ({issue['subCode']})" if issue.get("subCode") else ""
        err = InputError(f"{head or 'invalid'}", subject=m.group(1) if m else None,
                         path=location.lstrip("/") or None, code=f"{code}{sub}",
                         fix=(rest[:400] + ("..." if len(rest) > 400 else "")) or f"see {DOCS} ({code})")
        errors.append(err)
    warnings = [f"BIDS validator: {n} x {code}: {_sentences(messages.get(code, ''))[0]}"
                for code, n in sorted(warned.items())]
    return errors, warnings


def run_validator(bids_dir: str | Path, timeout: float = 1800) -> tuple[list[InputError], list[str]]:
    """Run the official validator on ``bids_dir``; (errors, warnings) as :func:`parse_report`. InputError with
    the install command when the extra is absent, or with the validator's own words when it cannot run."""
    exe = validator_executable()
    if exe is None:
        raise InputError("the official BIDS validator is asked for (validation.bids_validator / --official) "
                         "but is not installed", path=bids_dir, fix=INSTALL_HINT)
    proc = subprocess.run([exe, "--json", str(bids_dir)], capture_output=True, text=True, timeout=timeout)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise InputError(f"the official BIDS validator did not finish (exit {proc.returncode}): "
                         + " / ".join(tail), path=bids_dir,
                         fix=f"run `{exe} {bids_dir}` to see its output; reinstall with {INSTALL_HINT}") from None
    return parse_report(report)


def merge_problems(ours: list[InputError], theirs: list[InputError]) -> list[InputError]:
    """Ours, then the validator's that do not repeat one of ours (same code and subject)."""
    seen = {(p.code, p.subject) for p in ours if p.code}
    return ours + [p for p in theirs if (str(p.code).split(" ")[0], p.subject) not in seen]
