"""Preprocessing QC for people: one HTML page per subject next to its derivatives (fMRIPrep's
``sub-<label>.html``), one contact sheet per QC figure kind for the whole cohort (what the Snakemake report
shows: a thumbnail per subject, where a failed registration or a motion outlier stands out at a glance), and
the check that a report holds every figure it promises.

Why not every subject's figures in the report: at six figures per subject a 180-subject report was 177 MB,
too heavy to open or share. The full-size figures stay in ``derivatives/neuromoe/sub-*/figures`` and each
subject's page shows them. Pillow only (matplotlib's own dependency): no plotting here, cheap to import.
"""

from __future__ import annotations

import html
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from neuromoe.errors import InputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# QC figure kinds (neuromoe.paths keys) in page order, with the heading a reader sees.
QC_KINDS = {
    "qc_anat_mask": "T1w brain mask",
    "qc_anat_reg": "T1w in MNI space (template edges)",
    "qc_dwi_fa": "DTI maps (FA, MD)",
    "qc_dwi_motion": "DWI head motion",
    "qc_func_maps": "Resting-state maps (fALFF, ReHo)",
    "qc_func_motion": "BOLD head motion (FD)",
}


def subject_page(subject: str, figures: Mapping[str, str | Path], out: str | Path) -> Path:
    """Write ``out`` (an HTML page in the derivatives root): the subject's QC figures at full size, linked by
    relative paths (the page works wherever the derivatives folder is copied). ``figures``: QC kind (a
    ``QC_KINDS`` key) -> PNG path; kinds a subject lacks (a missing modality) are left out."""
    out = Path(out)
    sub = subject if subject.startswith("sub-") else f"sub-{subject}"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(sub)}: NeuroMoE QC</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1700px}img{max-width:100%;"
             "border:1px solid #ccc}h2{margin-top:1.5em}</style></head><body>",
             f"<h1>{html.escape(sub)}: preprocessing QC</h1>"]
    for kind, title in QC_KINDS.items():
        if kind not in figures:
            continue
        rel = html.escape(Path(os.path.relpath(Path(figures[kind]).resolve(), out.resolve().parent)).as_posix())
        parts.append(f"<h2>{html.escape(title)}</h2><a href='{rel}'><img src='{rel}' alt='{html.escape(title)}'></a>")
    parts.append("</body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    return out


def contact_sheet(items: Sequence[tuple[str, str | Path]], out: str | Path, title: str, thumb_width: int = 400,
                  max_columns: int = 6) -> Path:
    """One PNG of every ``(label, png)`` in ``items`` as a labelled thumbnail ``thumb_width`` pixels wide, in
    rows of at most ``max_columns`` (fewer for a small cohort, so the sheet stays about square), with
    ``title`` on top. 256-colour PNG: a 180-subject sheet stays a few MB. Raises ``InputError`` naming a
    figure that is missing or not a PNG."""
    if not items:
        raise ValueError("contact_sheet needs at least one figure")
    thumbs = []
    for label, path in items:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((thumb_width, 10 * thumb_width))
                thumbs.append((label, im))
        except (OSError, ValueError) as exc:
            raise InputError(f"QC figure of {label} cannot be read as an image ({exc})", path=path,
                             fix="rerun that subject's stage, e.g. snakemake --forcerun <stage> with the figure "
                                 "as target") from exc
    cell_w = max(t.width for _, t in thumbs)
    cell_h = max(t.height for _, t in thumbs) + 18
    cols = max(1, min(max_columns, math.ceil(math.sqrt(len(thumbs) * cell_h / cell_w))))
    rows = math.ceil(len(thumbs) / cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h + 30), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 8), f"{title} ({len(thumbs)} subjects)", fill="black")
    for i, (label, im) in enumerate(thumbs):
        x, y = (i % cols) * cell_w, 30 + (i // cols) * cell_h
        draw.text((x + 6, y + 2), label, fill="black")
        sheet.paste(im, (x, y + 18))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out)
    return out


def check_figure(path: str | Path) -> str | None:
    """Why ``path`` is not a usable figure (missing, empty, not a PNG, cannot be decoded), or None."""
    p = Path(path)
    if not p.is_file():
        return "missing"
    if p.stat().st_size == 0:
        return "empty"
    if p.suffix.lower() == ".png":
        with p.open("rb") as fh:
            if fh.read(8) != PNG_MAGIC:
                return "not a PNG"
        try:
            with Image.open(p) as im:
                im.verify()
        except (OSError, ValueError, SyntaxError) as exc:
            return f"cannot be decoded ({exc})"
    return None


def check_report(report: str | Path, promised: Sequence[str]) -> list[str]:
    """File names of ``promised`` (base names, e.g. ``roc_full.png``) that the Snakemake report ``report``
    (``.zip`` or self-contained ``.html``) does not hold, each with why; empty when all are there. A zip
    entry must also be a non-empty file (a PNG: with the PNG signature)."""
    report = Path(report)
    if not report.is_file():
        return [f"{report}: the report itself is missing"]
    problems = []
    if report.suffix == ".zip":
        with zipfile.ZipFile(report) as zf:
            entries = {Path(i.filename).name: i for i in zf.infolist() if not i.is_dir()}
            for name in promised:
                info = entries.get(name)
                if info is None:
                    problems.append(f"{name}: not in the report")
                elif info.file_size == 0:
                    problems.append(f"{name}: empty in the report")
                elif name.lower().endswith(".png") and zf.read(info)[:8] != PNG_MAGIC:
                    problems.append(f"{name}: not a PNG in the report")
    else:
        text = report.read_text(errors="replace")
        problems = [f"{name}: not in the report" for name in promised if name not in text]
    return problems
