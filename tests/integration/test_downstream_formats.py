"""``dataeff finetune`` on TIFFs PIL cannot read (the CVC-style case that used to crash mid-training),
and an undecodable pair refused with the list of files before any output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataeff.constants import RESULTS_NAME
from tests.fixtures import REPO
from tests.media_files import tiff_bytes

TINY = REPO / "configs" / "finetune" / "tiny.yaml"


def _cvc_tiffs(root: Path, n: int = 10) -> Path:
    """``n`` CVC-layout pairs: RGB images as TIFFs labelled MinIsBlack (3 samples), TIFF masks."""
    (root / "Original").mkdir(parents=True)
    (root / "Ground Truth").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        rgb = rng.integers(0, 120, (48, 64, 3)).astype(np.uint8)
        mask = np.zeros((48, 64), np.uint8)
        y, x = rng.integers(4, 24), rng.integers(4, 36)
        rgb[y : y + 16, x : x + 20] += 120
        mask[y : y + 16, x : x + 20] = 255
        (root / "Original" / f"{i}.tif").write_bytes(tiff_bytes("minisblack3", rgb))
        Image.fromarray(mask).save(root / "Ground Truth" / f"{i}.tif")
    return root


def _finetune(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [
        sys.executable, "-m", "dataeff", "finetune", "--config", str(TINY), f"data.root={root}", f"out={out}",
        "encoder.allow_random_init=true", "trainer.max_steps=4", "optim.warmup_steps=1", "val_every_n_steps=2", "n_predictions=1", *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_finetune_trains_on_rgb_tiffs_labelled_minisblack(tmp_path: Path) -> None:
    root = _cvc_tiffs(tmp_path / "cvc")
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(root / "Original" / "0.tif")  # what crashed training before
    proc = _finetune(root, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / RESULTS_NAME).read_text())
    assert 0.0 <= results["miou"] <= 1.0 and results["n_test"] >= 1


def test_undecodable_pairs_exit_2_listing_them_before_any_output(tmp_path: Path) -> None:
    root = _cvc_tiffs(tmp_path / "cvc")
    image = root / "Original" / "3.tif"
    image.write_bytes(image.read_bytes()[:200])  # cut short: the header parses, the pixels are gone
    (root / "Ground Truth" / "7.tif").write_bytes(b"II*\x00" + b"\x00" * 60)
    out = tmp_path / "out"
    proc = _finetune(root, out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert "2 unusable image/mask file(s)" in message
    assert "Original/3.tif cannot be decoded" in message and "Ground Truth/7.tif cannot be decoded" in message
    assert "Traceback" not in proc.stderr and not out.exists()
