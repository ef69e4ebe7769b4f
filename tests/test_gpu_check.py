"""bench/gpu_check.py, the prepared check of the GPU path (issue 25), rehearsed on the CPU at toy sizes (``--tiny``)
so that it runs the day a GPU is there: every part runs and writes its record."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--tiny", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    record = json.loads(out.read_text())
    assert record["tiny"] is True and record["device"] == "cpu"
    parts = record["parts"]
    assert list(parts) == ["tests", "throughput", "training", "projection"]
    assert all(p["ok"] for p in parts.values()), {k: p.get("error") for k, p in parts.items()}
    assert "3 passed" in parts["tests"]["summary"]
    bench = parts["throughput"]["results"][0]
    assert bench["samples_per_s"] > 0 and 0 <= bench["data_wait_fraction"] <= 1
    # two runs of the same code on the same device: the comparison itself must see no difference
    assert parts["training"]["difference"] == {"balanced_accuracy": 0.0, "loss": 0.0}
    assert parts["training"]["test_argmax_agreement"] == 1.0
    import yaml

    ev = yaml.safe_load((REPO / "presets" / "paper.yaml").read_text())["evaluation"]
    proj = parts["projection"]
    assert proj["runs"] == (len(ev["variants"]) + len(ev["lambda_sweep"])) * ev["folds"] * len(ev["seeds"])
    assert proj["projected_hours_one_gpu"] > 0


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--tiny", "--out", str(out),
                          "--cohort", str(tmp_path / "absent"), "--parts", "training", "projection"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 1
    parts = json.loads(out.read_text())["parts"]
    assert parts["training"]["ok"] is False and "absent" in parts["training"]["error"]
    assert parts["projection"]["ok"] is False and "throughput" in parts["projection"]["why"]
