"""CLI: every stage has --help listing its config keys; bad config exits 2 naming the key; quiet runs, -v."""

import logging
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dataeff import quiet
from dataeff.cli import STAGES, Stage, main
from tests.fixtures import REPO, make_shards


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


# --------------------------------------------------------------------------- quiet runs and -v

#: Third-party lines a normal run must not print (none of them is something a user can act on).
NOISE = (
    "💡 Tip",
    "LeafSpec",
    "`IterableDataset` has `__len__` defined",
    "is smaller than the logging interval",
    "anonymous setting has no effect",
    "GPU available:",
    "TPU available:",
    "`weights_only` was not set",
    "`Trainer.fit` stopped",
)


def _noisy_pretrain_args(tmp_path: Path) -> list[str]:
    """A 2-step tiny pre-training that triggers every line of NOISE without the filters."""
    shards = make_shards(tmp_path, n=8, size=32, samples_per_shard=4)
    return [
        "pretrain",
        "--config",
        str(REPO / "configs" / "pretrain" / "tiny.yaml"),
        f"data.shards={shards}",
        f"out={tmp_path / 'run'}",
        "data.batch_size=4",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=5",  # more than the 2 batches of an epoch: Lightning's logging-interval warning
        "trainer.progress_bar=false",
        "panel_every_n_steps=0",
        "wandb.enabled=true",  # offline (tests/conftest.py); Lightning's W&B logger is what set 'anonymous'
    ]


def _run_collecting(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[str]]:
    """Run the CLI; return its code and every warning and Lightning log line it emitted.

    Warnings are recorded whatever the test session's filters, and Lightning's records are
    caught by a handler on its package logger, so nothing depends on which stream its own
    handler was bound to when Lightning was first imported.
    """
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect()
    lightning = logging.getLogger("pytorch_lightning")
    lightning.addHandler(handler)
    monkeypatch.setenv("WANDB_SILENT", "false")  # wandb's own warnings must reach the terminal to be checked
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            code = main(argv)
    finally:
        lightning.removeHandler(handler)
    return code, records + [str(w.message) for w in seen]


def test_normal_run_prints_no_third_party_noise(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    # A fresh dataeff handler, bound to this test's captured stderr (the old one may hold another test's).
    monkeypatch.setattr(logging.getLogger("dataeff"), "handlers", [])
    code, emitted = _run_collecting(_noisy_pretrain_args(tmp_path), monkeypatch)
    captured = capfd.readouterr()
    assert code == 0, captured.err
    text = captured.out + captured.err + "\n".join(emitted)
    assert [n for n in NOISE if n in text] == [], text
    assert "[dataeff] pretrain: 2 steps" in captured.err  # dataeff's own lines remain


def test_verbose_run_shows_what_the_filters_mute(tmp_path, monkeypatch):
    """The same run with -v: the muted lines come back (so the test above is not vacuous)."""
    monkeypatch.chdir(tmp_path)
    code, emitted = _run_collecting(["-v", *_noisy_pretrain_args(tmp_path)], monkeypatch)
    assert code == 0
    text = "\n".join(emitted)
    # Lightning's "💡 Tip" is left out: some supported Lightning releases never print it.
    muted = ("LeafSpec", "`IterableDataset` has `__len__` defined", "is smaller than the logging interval")
    assert [n for n in muted if n not in text] == [], text


@dataclass
class _NoKeys:
    """A stage config without keys, for the fake stage below."""


def _fake_stage(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[Any], list[logging.Filter]]]:
    """Register stage 'fake', whose run records the warnings filters and Lightning's logger filters."""
    seen: list[tuple[list[Any], list[logging.Filter]]] = []

    def run(cfg: Any) -> None:
        seen.append((list(warnings.filters), list(logging.getLogger("pytorch_lightning.utilities.rank_zero").filters)))

    monkeypatch.setitem(STAGES, "fake", Stage(lambda: (run, _NoKeys), "records the filters"))
    return seen


def test_verbose_leaves_warning_filters_and_loggers_unchanged(monkeypatch):
    seen = _fake_stage(monkeypatch)
    before = list(warnings.filters)
    assert main(["-v", "fake"]) == 0
    filters, logger_filters = seen[0]
    assert filters == before and logger_filters == []


def test_quiet_filters_apply_during_the_run_only(monkeypatch):
    seen = _fake_stage(monkeypatch)
    before = list(warnings.filters)
    assert main(["fake"]) == 0
    filters, logger_filters = seen[0]
    assert len(filters) == len(before) + len(quiet.WARNING_MESSAGES)
    assert {f[1].pattern for f in filters[: len(quiet.WARNING_MESSAGES)]} == set(quiet.WARNING_MESSAGES)
    assert len(logger_filters) == 1
    assert not logger_filters[0].filter(
        logging.makeLogRecord({"msg": "GPU available: False, used: False", "levelno": logging.INFO})
    )
    assert logger_filters[0].filter(
        logging.makeLogRecord({"msg": "Restoring states from the checkpoint path", "levelno": logging.INFO})
    )
    assert list(warnings.filters) == before  # restored when the stage returns
    assert logging.getLogger("pytorch_lightning.utilities.rank_zero").filters == []


def test_wandb_logger_leaves_anonymous_unset(tmp_path):
    """Lightning passes anonymous=None, which wandb answers with a warning on every run."""
    from dataeff.trainer import _WandbLogger

    logger = _WandbLogger(project="p", save_dir=str(tmp_path), mode="offline")
    assert "anonymous" not in logger._wandb_init


def test_srun_hint_is_muted_where_slurm_tools_are_installed():
    """Lightning's SLURM environment warns on every stage of a host that has srun, however it was launched."""
    hint = "The `srun` command is available on your system but is not used. HINT: If your intention is to run"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with quiet.quiet_third_party():
            warnings.warn(hint, UserWarning, stacklevel=1)
        warnings.warn(hint, UserWarning, stacklevel=1)  # outside a stage run it shows
    assert len(shown) == 1
