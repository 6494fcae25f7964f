"""A secret given through ``${oc.env:...}`` reaches the run but no file the run writes (config, logs, W&B)."""

from __future__ import annotations

from omegaconf import OmegaConf

from dataeff import cli
from tests.pretrain_helpers import TINY, tiny_shards

SECRET = "wandb-key-5f1e9c0a77d24b1e"


def test_env_secret_is_in_no_output_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAEFF_TEST_KEY", SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")
    shards = tiny_shards(tmp_path / "pool")
    config = OmegaConf.load(TINY)
    config.wandb.enabled = True
    config.wandb.config = {"api_key": "${oc.env:DATAEFF_TEST_KEY}"}
    OmegaConf.save(config, tmp_path / "run.yaml")  # written as is, not resolved
    out = tmp_path / "run"
    args = [f"data.shards={shards}", f"out={out}", "trainer.max_steps=2", "trainer.progress_bar=false"]
    assert cli.main(["pretrain", "--config", str(tmp_path / "run.yaml"), *args]) == 0

    written = [p for p in out.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in written), "no W&B files were written"
    assert [p for p in written if SECRET.encode() in p.read_bytes()] == []
    assert "${oc.env:DATAEFF_TEST_KEY}" in (out / "config.yaml").read_text()
