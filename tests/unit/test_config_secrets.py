"""Values from the environment are written as their ``${oc.env:...}`` expression, never resolved."""

from __future__ import annotations

from omegaconf import OmegaConf

from dataeff.config import WandbConfig, load_config, redact_env
from dataeff.files import save_resolved
from dataeff.pretrain import PretrainConfig
from tests.fixtures import REPO

SECRET = "wandb-key-0123456789abcdef"
SITE = "/scratch/site-dir"


def test_saved_config_keeps_env_interpolations_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAEFF_TEST_KEY", SECRET)
    monkeypatch.setenv("DATAEFF_TEST_SITE", SITE)
    yaml = tmp_path / "run.yaml"
    yaml.write_text(
        "wandb:\n  config:\n    api_key: ${oc.env:DATAEFF_TEST_KEY}\nout: ${oc.env:DATAEFF_TEST_SITE}/run\n"
    )
    cfg = load_config(PretrainConfig, str(yaml), [f"data.shards={SITE}/shards"])
    assert cfg.wandb.config["api_key"] == SECRET and cfg.out == f"{SITE}/run"  # resolved for the run

    text = save_resolved(cfg, tmp_path).read_text()
    assert SECRET not in text and SITE not in text
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.wandb.config._get_node("api_key")._value() == "${oc.env:DATAEFF_TEST_KEY}"
    assert saved._get_node("out")._value() == "${oc.env:DATAEFF_TEST_SITE}/run"
    # A path built on an environment value is written on the expression too.
    assert saved.data._get_node("shards")._value() == "${oc.env:DATAEFF_TEST_SITE}/shards"
    # Loading the saved file again gives the same run.
    again = load_config(PretrainConfig, str(tmp_path / "config.yaml"))
    assert again.wandb.config["api_key"] == SECRET and again.out == cfg.out


def test_run_configs_sent_elsewhere_are_redacted(monkeypatch):
    monkeypatch.setenv("DATAEFF_TEST_KEY", SECRET)
    load_config(
        PretrainConfig, str(REPO / "configs" / "pretrain" / "tiny.yaml"), ["wandb.config.k=${oc.env:DATAEFF_TEST_KEY}"]
    )
    values = {"wandb": {"config": {"k": SECRET}}, "tags": [f"key={SECRET}"], "steps": 8}
    assert redact_env(values) == {
        "wandb": {"config": {"k": "${oc.env:DATAEFF_TEST_KEY}"}},
        "tags": ["key=${oc.env:DATAEFF_TEST_KEY}"],
        "steps": 8,
    }
    assert redact_env(WandbConfig().project) == "dataeff"  # other values pass unchanged
