"""bench/study.py: `make study` in sittings. A part must stop at its limit even when started from a shell that
ignores SIGINT (nohup ... &), and the progress line it records is Snakemake's last one."""

from __future__ import annotations

import importlib.util
import signal
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("study_bench", REPO / "bench" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_part_stops_at_its_limit_even_with_sigint_ignored(study, tmp_path: Path) -> None:
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a background shell hands its children
    try:
        t0 = time.perf_counter()
        wall, finished = study.run_part([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path,
                                        tmp_path / "part.log", limit_s=1.0)
    finally:
        signal.signal(signal.SIGINT, old)
    assert not finished and wall < 10 and time.perf_counter() - t0 < 10  # stopped by SIGINT, not the 300 s kill
    wall, finished = study.run_part([sys.executable, "-c", "print('done')"], tmp_path, tmp_path / "part.log", 30)
    assert finished and "done" in (tmp_path / "part.log").read_text()


def test_progress_is_snakemakes_last_line(study) -> None:
    log = "1 of 848 steps (0%) done\nrule anat:\n398 of 848 steps (47%) done\nSelect jobs to execute...\n"
    assert study.last_progress(log) == "398 of 848 steps (47%) done"
    assert study.last_progress("Building DAG of jobs...\n") is None
