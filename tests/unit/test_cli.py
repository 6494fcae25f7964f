"""CLI: every stage has --help listing its config keys; bad config exits 2 naming the key."""

import subprocess
import sys

import pytest

from dataeff.cli import STAGES, main


def test_top_level_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for stage in ("shard", "embed", "select", "pretrain", "finetune", "sweep", "report"):
        assert stage in out


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_help_lists_config_keys(stage, capsys):
    with pytest.raises(SystemExit) as exc:
        main([stage, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out
    assert "config keys" in out, f"stage {stage} is not built: {out}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_unknown_key_exits_2_naming_it(stage, capsys):
    assert main([stage, "no_such_key=1"]) == 2
    assert "unknown config key 'no_such_key'" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "dataeff", "--help"], capture_output=True, text=True, check=True)
    assert "select" in out.stdout
