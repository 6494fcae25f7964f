"""``dataeff pretrain`` on tiny shards in one process: resume after SIGTERM / a hard kill, export, skip."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from dataeff import pretrain
from dataeff.config import ConfigError
from dataeff.constants import ENCODER_META, ENCODER_WEIGHTS, IMAGENET_MEAN, IMAGENET_STD
from dataeff.models.encoder import pooled_features
from dataeff.models.mae import MAE
from dataeff.trainer import find_resume_checkpoint
from tests.fixtures import REPO, write_selection
from tests.pretrain_helpers import STEPS, SigtermAt, add_callback, config, load_exported, tiny_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("pool"))


def _metrics(out: Path) -> pd.DataFrame:
    table = pd.read_csv(out / "metrics.csv")
    return table.dropna(subset=["loss"]).drop_duplicates("step", keep="last").set_index("step")


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps."""
    out = tmp_path_factory.mktemp("ref") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    try:
        summary = pretrain.main(config(shards, out))
    finally:
        mp.undo()
    assert summary["steps"] == STEPS and summary["images_seen"] == STEPS * 6
    # 24 samples in batches of 6: 4 full steps per epoch, so 8 steps are exactly 2 passes
    assert (summary["budget"], summary["subset_size"], summary["global_batch"]) == ("steps", 24, 6)
    assert (summary["steps_per_epoch"], summary["epochs_seen"], summary["epochs"]) == (4, 2.0, None)
    return out


def _assert_same_result(resumed: Path, reference: Path) -> None:
    a, b = load_file(resumed / ENCODER_WEIGHTS), load_file(reference / ENCODER_WEIGHTS)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=f"encoder weight {key} differs")
    ma, mb = _metrics(resumed), _metrics(reference)
    assert list(ma.index) == list(range(STEPS))
    # same learning rate and loss at every step, and the same images counted
    torch.testing.assert_close(torch.tensor(ma["lr"].values), torch.tensor(mb["lr"].values), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(ma["loss"].values), torch.tensor(mb["loss"].values), atol=1e-5, rtol=1e-4)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (resumed, reference))
    assert sa["steps"] == sb["steps"] == STEPS and sa["images_seen"] == sb["images_seen"]


def test_reference_run_outputs(reference):
    for name in ("config.yaml", ENCODER_WEIGHTS, ENCODER_META, "mae.ckpt", "summary.json", "metrics.csv"):
        assert (reference / name).is_file(), name
    assert (reference / "panels" / "step=00000004.png").is_file()
    # torch names the archive's root after the file it is given; the temp name (pid, random) must not reach the bytes
    assert all(n.startswith("archive/") for n in zipfile.ZipFile(reference / "mae.ckpt").namelist())
    # every output gets the umask's permissions (safetensors alone would make its file 0600)
    assert (reference / ENCODER_WEIGHTS).stat().st_mode == (reference / ENCODER_META).stat().st_mode
    assert find_resume_checkpoint(reference).name in ("step=00000008.ckpt", "last.ckpt")
    losses = _metrics(reference)["loss"]
    assert losses.iloc[-3:].mean() < losses.iloc[:3].mean(), "loss did not go down"


def test_sigterm_saves_checkpoint_and_resume_matches_uninterrupted(shards, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    add_callback(monkeypatch, SigtermAt(5))
    with pytest.raises(SystemExit):
        pretrain.main(config(shards, out))
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "offline")
    ckpt = find_resume_checkpoint(out)
    assert ckpt is not None and "step=00000005" in os.path.realpath(ckpt), ckpt
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 5
    assert all(int(s["step"]) == 5 for s in state["optimizer_states"][0]["state"].values())
    assert not (out / "summary.json").exists()

    summary = pretrain.main(config(shards, out))
    assert summary["resumed_from"].endswith(".ckpt")
    _assert_same_result(out, reference)


def test_hard_kill_resumes_from_periodic_checkpoint(shards, reference, tmp_path):
    """A process killed without warning (os._exit) after step 4 resumes from the step-3 checkpoint."""
    out = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        import pytorch_lightning as pl
        from tests.pretrain_helpers import config
        from dataeff import pretrain
        from pathlib import Path

        class Die(pl.Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step == 4:
                    os._exit(17)

        original = pretrain.build_trainer
        pretrain.build_trainer = lambda *a, extra_callbacks=(), **k: original(*a, extra_callbacks=[*extra_callbacks, Die()], **k)
        pretrain.main(config(Path({str(shards)!r}), Path({str(out)!r})))
        """
    )
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 17, proc.stderr[-3000:]
    ckpt = find_resume_checkpoint(out)
    assert ckpt is not None and "step=00000003" in os.path.realpath(ckpt)
    summary = pretrain.main(config(shards, out))
    assert summary["steps"] == STEPS
    _assert_same_result(out, reference)


def test_exported_encoder_loads_in_timm_with_same_features(reference):
    model = load_exported(reference)
    mae = MAE.load_for_scoring(reference / "mae.ckpt")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(model, images, "cls"), pooled_features(mae.encoder, images, "cls"))
        torch.testing.assert_close(model.forward_features(images), mae.encoder.forward_features(images))
    assert mae.reconstruction_loss(images, 0).shape == (3,)


def _doc_snippet(doc: Path, marker: str) -> str:
    """The fenced Python block of ``doc`` that contains ``marker``, as written."""
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"{doc}: expected one python block with {marker!r}, found {len(found)}"
    return found[0]


def test_documented_timm_call_loads_the_export(reference, tmp_path, monkeypatch):
    # The docs' lines run verbatim, from a directory where their path is this run.
    code = _doc_snippet(REPO / "docs" / "pretrain.md", "local-dir:")
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "pretrain").symlink_to(reference)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/pretrain.md", "exec"), namespace)
    encoder, data_cfg = namespace["encoder"], namespace["data_cfg"]

    trained = MAE.load_for_scoring(reference).encoder
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_features(images), trained.forward_features(images))
    assert encoder.num_classes == 0
    assert tuple(data_cfg["mean"]) == IMAGENET_MEAN and tuple(data_cfg["std"]) == IMAGENET_STD
    assert tuple(data_cfg["input_size"]) == (3, 32, 32)  # configs/pretrain/tiny.yaml trains at 32 px


def test_run_checkpoint_loads_alone_as_the_trained_mae(reference):
    # The stage's own checkpoint, weights-only, with no config: the hyperparameters rebuild the MAE.
    ckpt = reference / "checkpoints" / "last.ckpt"
    loaded = MAE.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    scorer = MAE.load_for_scoring(reference)
    images = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(loaded.reconstruction_loss(images, 3), scorer.reconstruction_loss(images, 3))
    assert (loaded.max_steps, loaded.mae_cfg.decoder_dim) == (STEPS, 32)


def test_complete_run_is_skipped(shards, reference):
    before = (reference / ENCODER_WEIGHTS).stat().st_mtime_ns
    summary = pretrain.main(config(shards, reference))
    assert summary["steps"] == STEPS
    assert (reference / ENCODER_WEIGHTS).stat().st_mtime_ns == before


def test_selection_recorded_in_summary_and_tags(shards, tmp_path):
    index = pd.read_parquet(shards / "index.parquet")
    keys = sorted(index.loc[index["status"] == "ok", "key"])
    sel = write_selection(tmp_path / "sel", keys, set(keys[:8]))
    (sel / "summary.json").write_text(json.dumps({"method": "random", "ratio": 0.4, "kept": 8, "kept_fraction": 0.4}))
    out = tmp_path / "run"
    summary = pretrain.main(config(shards, out, f"data.selection={sel}", "trainer.max_steps=3", "data.batch_size=4"))
    assert summary["selection"]["method"] == "random" and summary["selection"]["ratio"] == 0.4
    # only selected samples are streamed: 3 steps x 4 = 12 images over 8 kept samples
    assert summary["images_seen"] == 12 and summary["subset_size"] == 8 and summary["epochs_seen"] == 1.5


def test_epoch_budget_gives_every_subset_the_same_passes(shards, tmp_path):
    """10 kept samples, batch 4: 2 full batches per epoch (2 samples left out each epoch), 3 epochs = 6 steps."""
    index = pd.read_parquet(shards / "index.parquet")
    keys = sorted(index.loc[index["status"] == "ok", "key"])
    sel = write_selection(tmp_path / "sel", keys, set(keys[:10]))
    (sel / "summary.json").write_text(json.dumps({"method": "random", "ratio": 0.5, "kept": 10}))
    run = ["budget=epochs", "epochs=3", "trainer.max_steps=1000", "data.batch_size=4", "panel_every_n_steps=0"]
    summary = pretrain.main(config(shards, tmp_path / "run", f"data.selection={sel}", *run))
    assert (summary["budget"], summary["epochs"], summary["steps_per_epoch"]) == ("epochs", 3, 2)
    assert summary["steps"] == 6 and summary["images_seen"] == 24  # trainer.max_steps is not the budget
    assert (summary["subset_size"], summary["epochs_seen"]) == (10, 2.4)  # full batches only: 8 of 10 per epoch
    losses = _metrics(tmp_path / "run")
    assert list(losses.index) == list(range(6))
    with pytest.raises(ConfigError, match=r"10 samples .* global batch of 12"):
        pretrain.main(config(shards, tmp_path / "big", f"data.selection={sel}", "data.batch_size=12"))


def test_config_errors(shards, tmp_path):
    with pytest.raises(ConfigError, match="image_size"):
        config(shards, tmp_path, "data.image_size=64")
    with pytest.raises(ConfigError, match="resume"):
        config(shards, tmp_path, "resume=/nonexistent.ckpt")
    with pytest.raises(ConfigError, match="budget"):
        config(shards, tmp_path, "budget=images")
    with pytest.raises(ConfigError, match="epochs"):
        config(shards, tmp_path, "budget=epochs", "epochs=0")
