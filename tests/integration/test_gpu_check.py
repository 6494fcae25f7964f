"""``make gpu-check``'s script, dry run: every step runs at tiny sizes on the CPU, so the GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=280
    )


def test_dry_run_runs_every_step_and_writes_one_json_and_a_table(tmp_path):
    out = tmp_path / "check.json"
    proc = _run("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["machine"]["dry_run"] is True and report["budget_s"] == 480
    steps = report["steps"]
    assert list(steps) == ["tests", "mae", "embed", "kmeans", "sam"]
    assert all(s["status"] == "passed" for s in steps.values()), steps
    assert steps["tests"]["skipped"] >= 1  # the GPU tests are collected and skip themselves on a CPU
    mae = steps["mae"]
    assert "stand-in for DeepSpeed" in mae["runner"] and mae["precision"] == "32-true"
    assert mae["tflop_per_step"] > 0 and mae["images_per_s"] > 0 and mae["loss_finite"]
    assert steps["embed"]["images_per_s"] > 0 and steps["kmeans"]["faiss"] == "cpu"
    runs = steps["sam"]["runs"]
    assert [r["setting"] for r in runs] == ["OptiDEL's thresholds", "every mask kept"]
    assert all(r["baseline_img_s"] > 0 and r["batched_img_s"] > 0 for r in runs)
    assert runs[1]["patches_baseline"] >= 1 and runs[1]["match_rate"] == 1.0
    # The table names every step, labels the run, and gives SAM's speed-up against its baseline.
    assert "DRY RUN" in proc.stdout and "x baseline" in proc.stdout
    for title in ("make test-gpu", "MAE pre-training", "embedding", "faiss k-means", "SAM passes"):
        assert f"| {title} | passed" in proc.stdout
    assert (tmp_path / "check" / "mae.log").is_file()  # each step's log beside the JSON


def test_without_a_gpu_it_says_so_and_runs_the_dry_run(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = _run("--only", "kmeans", "--out", str(tmp_path / "check.json"), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA GPU visible" in proc.stdout and "DRY RUN" in proc.stdout
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["machine"]["dry_run"] is True and report["steps"]["kmeans"]["rows"] == 2000
