"""Training checkpoints that are complete or absent: atomic writes, digests, and a resume choice that checks them.

Writing (:class:`AtomicCheckpointIO`, the Trainer's checkpoint plugin; the DeepSpeed strategy
in :mod:`dataeff.trainer` does the same for its checkpoint folders): the checkpoint goes to a
hidden temp name in its own directory, is fsynced, its size and sha256 are recorded in
``<name>.digest.json``, and only then is it renamed to its final name. A rename within one
directory is atomic, so a kill or a full disk at any moment leaves the old checkpoint and a
temp file, never a truncated ``step=*.ckpt``. (Lightning's own writer stages the file in the
system temp directory; across filesystems its "move" is a copy that can be cut short.)

Choosing (:func:`find_resume_checkpoint`): the newest checkpoint whose files match their
digest record (or, for a checkpoint written without one, that loads) wins; a damaged one is
skipped with a warning naming it and the reason, and the previous one is tried.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from dataeff import dist
from dataeff.config import first_line
from dataeff.constants import CHECKPOINT_DIGEST_FORMAT, CHECKPOINT_DIGEST_SUFFIX, CHECKPOINT_DIR
from dataeff.files import file_sha256, fsync_dir, fsync_file, temp_name, write_atomic, write_json_atomic

log = logging.getLogger("dataeff")

#: Step checkpoints kept in a run's ``checkpoints/``: the newest, and one to fall back to.
KEEP_CHECKPOINTS = 2
_STEP_PREFIX = "step="
_HPC_PREFIX = "hpc_ckpt_"


# --------------------------------------------------------------------------- digests


def digest_path(ckpt: Path) -> Path:
    """Where the size and sha256 of ``ckpt``'s file(s) are recorded: ``<name>.digest.json`` beside it."""
    return ckpt.with_name(ckpt.name + CHECKPOINT_DIGEST_SUFFIX)


def _files(ckpt: Path) -> dict[str, Path]:
    """A checkpoint's files by name: ``"."`` for a file, relative paths inside a (DeepSpeed) folder."""
    if ckpt.is_dir():
        return {p.relative_to(ckpt).as_posix(): p for p in sorted(ckpt.rglob("*")) if p.is_file()}
    return {".": ckpt}


def checkpoint_digest(ckpt: Path) -> dict[str, Any]:
    """``{"format", "files": {name: {"size", "sha256"}}}`` of a checkpoint file or folder."""
    files = {name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for name, p in _files(ckpt).items()}
    return {"format": CHECKPOINT_DIGEST_FORMAT, "files": files}


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from, in a few words; None when it can.

    With a digest record: every recorded file present with its size and sha256. Without
    one (a checkpoint from before records existed): a file must load with
    ``weights_only=True`` (a truncated zip has no central directory and fails here); a
    folder must hold DeepSpeed's ``latest`` tag file.
    """
    if not ckpt.exists():
        return "missing"
    record_path = digest_path(ckpt)
    if record_path.is_file():
        try:
            expected = json.loads(record_path.read_text())["files"]
        except (ValueError, KeyError, TypeError) as exc:
            return f"unreadable digest record {record_path.name} ({first_line(exc)})"
        files = _files(ckpt)
        for name, want in expected.items():
            where = ckpt.name if name == "." else f"{ckpt.name}/{name}"
            if name not in files:
                return f"{where} is missing"
            size = files[name].stat().st_size
            if size != want["size"]:
                return f"{where} has {size} bytes, {want['size']} recorded (truncated or overwritten)"
            if file_sha256(files[name]) != want["sha256"]:
                return f"{where} does not match its recorded sha256 (damaged)"
        return None
    if ckpt.is_dir():
        return None if (ckpt / "latest").is_file() else "a DeepSpeed checkpoint folder without its 'latest' tag file"
    try:
        # mmap: the zip directory and the pickled structure are read, not every tensor.
        torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # any reason it does not load is a reason not to resume from it
        return f"does not load ({type(exc).__name__}: {first_line(exc)})"
    return None


def publish_folder(tmp: Path, final: Path) -> None:
    """Record ``tmp``'s digest for ``final``, then rename the folder into place (replacing an older one)."""
    for path in _files(tmp).values():
        fsync_file(path)
    write_json_atomic(digest_path(final), checkpoint_digest(tmp), indent=1)
    old = None
    if final.exists():  # a re-save of the same step: the old folder is moved aside, then dropped
        old = temp_name(final)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a file object, so that the same object gives the same bytes.

    Given a path, torch names the archive's root folder after the file; every atomic write
    goes through a unique temp name (host, pid, random), so the bytes would differ from run
    to run. Through a file object the root folder is always "archive".
    """
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def safetensors_save(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' ``save_file`` creates its file mode 0600; written through an ordinary handle
    it gets the umask's permissions, readable by a lab's group like every other output."""
    Path(path).write_bytes(safetensors.torch.save(state))


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temp file beside the checkpoint, fsync, digest record, rename.

    Used for every checkpoint the Trainer writes through its strategy (periodic, last,
    on-exception, SLURM ``hpc_ckpt``, ``Trainer.save_checkpoint``); loading is Lightning's.
    Local paths only: a checkpoint directory on object storage is refused by name.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        if "://" in os.fspath(path):
            raise ValueError(f"checkpoint path {path}: dataeff writes checkpoints to a local or mounted directory")
        final = Path(path)

        def write(tmp: Path) -> None:
            torch_save(checkpoint, tmp)
            # Before the rename: a checkpoint under its final name always has its record.
            write_json_atomic(digest_path(final), checkpoint_digest(tmp), indent=1)

        write_atomic(final, write)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        digest_path(Path(path)).unlink(missing_ok=True)


# --------------------------------------------------------------------------- choosing


def _is_temp(path: Path) -> bool:
    """A half-written checkpoint: temp names start with '.'; ``.tmp.ckpt`` is a Lightning-era temp name."""
    return path.name.startswith(".") or path.name.endswith(".tmp.ckpt")


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint's name (``step=00000012.ckpt``, ``hpc_ckpt_3.ckpt``), -1 when none."""
    for prefix in (_STEP_PREFIX, _HPC_PREFIX):
        if path.name.startswith(prefix):
            digits = path.name[len(prefix) :].split(".")[0]
            if digits.isdigit():
                return int(digits)
    return -1


def _candidates(out: Path) -> list[Path]:
    """Complete-looking checkpoints of a run directory, newest first, each file once (``last.ckpt`` resolved)."""
    found = list((out / CHECKPOINT_DIR).glob("*.ckpt")) + list(out.glob(f"{_HPC_PREFIX}*.ckpt"))
    # exists() drops dangling 'last' links; temp names are checkpoints still being (or never) written.
    real = {p.resolve() for p in found if p.exists() and not _is_temp(p)}
    return sorted(real, key=lambda p: (p.stat().st_mtime, checkpoint_step(p)), reverse=True)


def remove_partial_checkpoints(out: Path) -> list[Path]:
    """Delete temp files and folders left in ``out/checkpoints`` by a run killed mid-save; returns them.

    Only call while no other process writes this run (at the resume decision of its one writer).
    """
    folder = out / CHECKPOINT_DIR
    partial = [p for p in folder.glob(".*") if ".tmp" in p.name] if folder.is_dir() else []
    for path in partial:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if partial:
        log.info("resume: removed %d partial checkpoint file(s) of an interrupted save", len(partial))
    return partial


def _choose(out: Path) -> Path | None:
    remove_partial_checkpoints(out)
    skipped = 0
    for ckpt in _candidates(out):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if skipped:
                log.warning("resume: using %s, the newest checkpoint that is intact", ckpt)
            return ckpt
        skipped += 1
        log.warning("resume: skipping checkpoint %s: %s; trying the previous one", ckpt, problem)
    if skipped:
        log.warning("resume: none of the %d checkpoint(s) in %s is intact; starting from step 0", skipped, out)
    return None


def find_resume_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint of a run directory, or None; the same path on every rank.

    Considers ``<out>/checkpoints/*.ckpt`` (periodic, last and on-exception saves; files,
    or folders when written by DeepSpeed) and SLURM requeue saves ``<out>/hpc_ckpt_<n>.ckpt``.
    Newest = latest modification time, ties broken by the step in the name. Each is
    checked with :func:`checkpoint_problem`; a damaged one is skipped with a warning and the
    previous one tried. Rank 0 decides (and removes the temp files of an interrupted save,
    :func:`remove_partial_checkpoints`) and sends its choice to the other ranks.
    """
    choice = _choose(Path(out_dir)) if dist.is_main() else None
    return dist.broadcast_object(choice)
