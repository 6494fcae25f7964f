"""dataeff's DataModule and MAE in a user's own Lightning script, on 2 real CPU ranks.

The script is written as a user would write it: the ``PretrainDataModule`` is built at
the top, before any process group exists, then handed to ``pl.Trainer(devices=2,
strategy="ddp")``. Launched by Lightning itself (``python script.py``: Lightning starts
rank 1) and by ``torchrun``, each rank must stream its own share: the ranks' keys are
disjoint and together cover the epoch (24 samples = 3 full global batches of 2 x 4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.multiproc import free_port
from tests.unit.test_stream import write_shards

LAUNCH_TIMEOUT_S = 240

SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import pytorch_lightning as pl

    from dataeff.config import DataConfig, EncoderConfig
    from dataeff.data.datamodules import PretrainDataModule
    from dataeff.models.mae import MAE, MAEConfig


    class RecordKeys(pl.Callback):
        def __init__(self):
            self.keys = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.keys += list(batch["key"])


    shards, out = sys.argv[1], Path(sys.argv[2])
    data = PretrainDataModule(DataConfig(shards=shards, image_size=32, batch_size=4, num_workers=0))
    encoder = EncoderConfig(
        name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
        allow_random_init=True,
    )
    model = MAE(encoder, MAEConfig(decoder_depth=1, decoder_dim=32, decoder_heads=2), max_steps=3)
    record = RecordKeys()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, callbacks=[record], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    seen = {"keys": record.keys, "place": [data.rank, data.world_size], "steps": trainer.global_step}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))
    """
)


@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_ranks_stream_disjoint_shares_in_a_user_lightning_script(tmp_path, launcher):
    shards = write_shards(tmp_path / "shards", [10, 3, 11])  # 24 samples, uneven shards
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    # No rank variables from the test's own environment: the launcher sets what it sets.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    if launcher == "lightning":
        command = [sys.executable, str(script)]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            env["MASTER_PORT"],
            str(script),
        ]
    result = subprocess.run(
        [*command, str(shards), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [s["place"] for s in seen] == [[0, 2], [1, 2]], "the DataModule did not take the Trainer's place"
    assert [s["steps"] for s in seen] == [3, 3]
    keys = [s["keys"] for s in seen]
    assert [len(k) for k in keys] == [12, 12]
    assert not set(keys[0]) & set(keys[1]), "both ranks streamed the same samples"
    assert set(keys[0]) | set(keys[1]) == {f"set_{i:04d}" for i in range(24)}, "the epoch is not covered"
