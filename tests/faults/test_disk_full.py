"""A full disk: ``dataeff shard`` exits 1 with one line saying so, and a re-run with space ends identical.

Two ways to fill it: a real 256 KiB tmpfs mounted as the output folder (needs the right
to mount; skipped with the reason printed where it is refused), and an injected writer
whose tar appends fail with ENOSPC after a few samples (runs everywhere). Either way the
re-run after space is freed must leave the same bytes as a clean run into the same path.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataeff import cli
from dataeff.data import shard
from tests.faults.outputs import differences
from tests.fixtures import make_raw_tree

#: Enough output to overflow the small tmpfs part-way (about 24 samples of ~14 KB).
N_IMAGES, SIDE = 24, 96


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_raw_tree(tmp_path_factory.mktemp("raw") / "raw", n=N_IMAGES, size=SIDE)


def _args(raw: Path, out: Path) -> list[str]:
    return ["shard", f"src={raw}", f"out={out}", "samples_per_shard=4", "workers=1", "progress=false"]


def _assert_disk_full_message(code: int, err: str, out: Path) -> None:
    last = err.strip().splitlines()[-1]
    assert code == 1, err
    assert "Traceback" not in err, err
    assert last.startswith("dataeff shard: error: No space left on device"), last
    assert f"out={out}" in last and "re-run" in last, last


def _rerun_matches_clean(raw: Path, out: Path, aside: Path) -> None:
    """Re-run into ``out`` (now with space), then compare with a clean run into the same path."""
    assert cli.main(_args(raw, out)) == 0
    shutil.copytree(out, aside)
    shutil.rmtree(out)
    assert cli.main(_args(raw, out)) == 0
    assert differences(aside, out) == []


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True
        )
    except OSError as exc:
        proc = subprocess.CompletedProcess([], 1, "", str(exc))
    if proc.returncode != 0:
        reason = f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}); the injected ENOSPC test runs"
        print(reason)
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_tmpfs_then_rerun_with_space(
    raw: Path, small_tmpfs: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    out = small_tmpfs / "out"
    code = cli.main(_args(raw, out))
    _assert_disk_full_message(code, capfd.readouterr().err, out)
    assert not (out / "summary.json").exists()
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
    _rerun_matches_clean(raw, out, tmp_path / "after_rerun")


def test_injected_enospc_then_rerun_with_space(
    raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    appended = 0
    real_append = shard.TarSink.append

    def append(self: shard.TarSink, members: bytes) -> None:
        nonlocal appended
        appended += 1
        if appended > 6:  # the second shard, part-way
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, members)

    out = tmp_path / "out"
    with monkeypatch.context() as patched:
        patched.setattr(shard.TarSink, "append", append)
        code = cli.main(_args(raw, out))
    _assert_disk_full_message(code, capfd.readouterr().err, out)
    assert (out / "out-000000.tar").is_file() and not (out / "summary.json").exists()
    _rerun_matches_clean(raw, out, tmp_path / "after_rerun")
