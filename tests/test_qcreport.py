"""QC pages, contact sheets and the report check (neuromoe.results.qcreport): small images, no workflow."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neuromoe.errors import InputError
from neuromoe.results.qcreport import check_figure, check_report, contact_sheet, subject_page


def _png(path: Path, shade: int, size=(600, 300)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), shade, np.uint8)).save(path)
    return path


def test_contact_sheet_holds_a_thumbnail_per_subject(tmp_path) -> None:
    items = [(f"sub-{i:02d}", _png(tmp_path / f"{i}.png", 20 * i)) for i in range(1, 8)]
    out = contact_sheet(items, tmp_path / "sheet.png", "T1w brain mask", thumb_width=200)
    with Image.open(out) as im:
        cols = im.width // 200
        assert cols * 200 == im.width and 2 <= cols <= 6
        rows = -(-7 // cols)
        assert im.height == 30 + rows * (100 + 18)
        arr = np.asarray(im.convert("RGB"))
    # the third subject's thumbnail sits in its cell, with its own grey
    r, c = divmod(2, cols)
    y, x = 30 + r * 118 + 18 + 50, c * 200 + 100
    assert abs(int(arr[y, x, 0]) - 60) <= 4


def test_contact_sheet_names_an_unreadable_figure(tmp_path) -> None:
    good = _png(tmp_path / "a.png", 100)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"sub-02") as err:
        contact_sheet([("sub-01", good), ("sub-02", bad)], tmp_path / "s.png", "x")
    assert str(bad) in str(err.value)


def test_subject_page_links_resolve_from_its_folder(tmp_path) -> None:
    root = tmp_path / "derivatives" / "neuromoe"
    figs = {"qc_anat_mask": _png(root / "sub-01" / "figures" / "m.png", 9),
            "qc_func_motion": _png(root / "sub-01" / "figures" / "f.png", 9)}
    page = subject_page("01", figs, root / "sub-01.html").read_text()
    assert "sub-01/figures/m.png" in page and "sub-01/figures/f.png" in page
    assert "DWI" not in page  # a kind the subject lacks has no heading
    assert page.index("brain mask") < page.index("BOLD head motion")


def test_check_figure_and_report(tmp_path) -> None:
    fig = _png(tmp_path / "roc_full.png", 50)
    empty = tmp_path / "gates_full.png"
    empty.write_bytes(b"")
    assert check_figure(fig) is None and check_figure(empty) == "empty"
    assert check_figure(tmp_path / "nope.png") == "missing"
    report = tmp_path / "report.zip"
    with zipfile.ZipFile(report, "w") as zf:
        zf.write(fig, "report/data/raw/abc/roc_full.png")
        zf.writestr("report/data/raw/def/ablation.md", "| a |")
    assert check_report(report, ["roc_full.png", "ablation.md"]) == []
    assert check_report(report, ["roc_full.png", "confusion_full.png"]) == ["confusion_full.png: not in the report"]
    assert check_report(tmp_path / "none.zip", ["x"])[0].endswith("the report itself is missing")


def test_qc_kinds_are_the_workflows_qc_figures() -> None:
    """The pages' and sheets' headings name exactly the QC figures the stages write (neuromoe.paths), in the
    order the workflow's report rules take them."""
    from neuromoe import paths
    from neuromoe.results.qcreport import QC_KINDS

    assert list(QC_KINDS) == [k for k in paths.OUTPUTS if k.startswith("qc_")]
