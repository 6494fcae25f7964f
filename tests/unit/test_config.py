"""Config loading: YAML + key=value merge, unknown keys and wrong types name the key."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from dataeff.config import (
    ConfigError,
    DataConfig,
    EncoderConfig,
    describe_keys,
    load_config,
    option,
    section,
)
from dataeff.files import save_resolved


@dataclass
class _Stage:
    out: str = option("runs/x", help="output dir")
    seed: int = option(0, help="seed")
    ratio: float = option(0.05, help="kept fraction")
    data: DataConfig = section(DataConfig)
    encoder: EncoderConfig = section(EncoderConfig)


def test_defaults_yaml_then_overrides(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("seed: 3\ndata:\n  batch_size: 7\n  shards: shards/a\n")
    cfg = load_config(_Stage, str(yaml), ["data.batch_size=9", "ratio=0.2"])
    assert isinstance(cfg, _Stage) and isinstance(cfg.data, DataConfig)
    assert (cfg.seed, cfg.data.batch_size, cfg.data.shards, cfg.ratio) == (3, 9, "shards/a", 0.2)
    assert cfg.data.image_size == 224  # untouched default


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("data:\n  shardz: x\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown config key 'data\.shardz'"):
        load_config(_Stage, str(yaml))


def test_unknown_key_on_command_line():
    with pytest.raises(ConfigError, match="unknown config key 'sede'"):
        load_config(_Stage, None, ["sede=1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="'data.batch_size'"):
        load_config(_Stage, None, ["data.batch_size=many"])


def test_post_init_check_names_key():
    with pytest.raises(ConfigError, match="data.batch_size=0"):
        load_config(_Stage, None, ["data.batch_size=0"])


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(_Stage, "nope.yaml")
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(_Stage, None, ["seed"])


def test_shorthand_sets_encoder_weights():
    cfg = load_config(_Stage, None, ["encoder=runs/pretrain"])
    assert cfg.encoder.weights == "runs/pretrain"


def test_save_resolved_round_trips(tmp_path):
    cfg = load_config(_Stage, None, ["seed=5", "data.extra_shards=[a,b]"])
    path = save_resolved(cfg, tmp_path / "out")
    again = load_config(_Stage, str(path))
    assert again == cfg


def test_describe_keys_lists_nested_leaves_with_help():
    keys = {k: (d, h) for k, d, h in describe_keys(_Stage)}
    assert keys["out"] == ("'runs/x'", "output dir")
    assert "data.shards" in keys and "encoder.weights" in keys
    assert "data" not in keys


def test_config_by_packaged_name():
    from dataeff.config import packaged_configs
    from dataeff.data.shard import ShardConfig

    names = packaged_configs()
    assert {"shard/tiny", "pretrain/tiny", "select/meddel", "demo-data"} <= set(names)
    by_name = load_config(ShardConfig, "shard/tiny", ["src=a", "out=b"])
    # The repository's configs/ is a symlink to the packaged folder: both name one file.
    repo_file = Path(__file__).resolve().parents[2] / "configs" / "shard" / "tiny.yaml"
    by_path = load_config(ShardConfig, str(repo_file), ["src=a", "out=b"])
    assert by_name == by_path and by_name.samples_per_shard == 64


def test_unknown_config_name_lists_packaged_names():
    with pytest.raises(ConfigError, match=r"'shard/tyni' is neither a file nor a packaged config.*shard/tiny"):
        load_config(_Stage, "shard/tyni")
    # A .yaml value is a path only: its typo reports the missing file, not the name list.
    with pytest.raises(ConfigError, match="config file not found: shard/tiny.yaml"):
        load_config(_Stage, "shard/tiny.yaml")


def test_existing_file_wins_over_packaged_name(tmp_path, monkeypatch):
    (tmp_path / "shard").mkdir()
    (tmp_path / "shard" / "tiny").write_text("seed: 4\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(_Stage, "shard/tiny").seed == 4
