"""Shard sets, embeddings and selections on object storage: a loopback S3 server and http.server.

Every stage reading from ``s3://`` or ``http://`` must give what it gives from local disk,
read tars by ranges (one request per run of samples, never one per sample), retry
transient failures and name the URL of a permanent one; ``shard out=s3://`` must write
the same set as a local run and resume after a kill.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dataeff.cli import main as cli_main
from dataeff.config import DataConfig
from dataeff.data import remote, remote_shard, stream
from dataeff.data.datamodules import PretrainDataModule
from dataeff.select.embed import load_embeddings
from dataeff.select.manifest import read_selection
from tests.fixtures import make_shards, shard_tree
from tests.object_store import free_port, http_server, s3_server

REPO = Path(__file__).resolve().parents[2]
EMBED = ["embed", "--config", str(REPO / "configs/embed/tiny.yaml")]


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def pool(tmp_path_factory, s3):
    """24 samples in 3 local tars, their embeddings and a selection; the same uploaded to S3."""
    tmp = tmp_path_factory.mktemp("remote")
    shards = make_shards(tmp, n=24, size=48, samples_per_shard=8)
    emb = tmp / "emb"
    assert cli_main([*EMBED, f"data.shards={shards}", f"out={emb}", "data.num_workers=0"]) == 0
    sel = tmp / "sel"
    select = ["select", "--config", str(REPO / "configs/select/tiny.yaml"), "method=random", "ratio=0.5"]
    assert cli_main([*select, f"embeddings={emb}", f"out={sel}", "report.gallery=false"]) == 0
    return {
        "tmp": tmp,
        "shards": shards,
        "emb": emb,
        "sel": sel,
        "select": select,
        "url": s3.put_dir(shards, "pool/demo"),
        "emb_url": s3.put_dir(emb, "emb"),
        "sel_url": s3.put_dir(sel, "sel"),
    }


def _epoch(shards: str, selection: str = "", workers: int = 0) -> list[tuple[list[str], torch.Tensor]]:
    cfg = DataConfig(
        shards=shards, selection=selection, image_size=32, batch_size=4, num_workers=workers, shuffle_buffer=8
    )
    data = PretrainDataModule(cfg, seed=3, rank=0, world_size=1)
    data.setup("fit")
    return [(b["key"], b["image"]) for b in data.train_dataloader()]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(ka == kb and torch.equal(xa, xb) for (ka, xa), (kb, xb) in zip(a, b, strict=True))


def test_shard_spec_on_s3_lists_like_local(pool, s3):
    local = stream.list_shards(str(pool["shards"]))
    tars = stream.list_shards(pool["url"])
    assert [remote.basename(t) for t in tars] == [Path(t).name for t in local]
    assert tars == stream.list_shards(pool["url"] + "/demo-{000000..000002}.tar")
    for a, b in zip(stream.shard_samples(local), stream.shard_samples(tars), strict=True):
        pd.testing.assert_frame_equal(a, b)


def test_pretrain_stream_from_s3_equals_local_with_one_request_per_run(pool, s3):
    reference = _epoch(str(pool["shards"]), str(pool["sel"]))
    s3.log.clear()
    streamed = _epoch(pool["url"], pool["sel_url"], workers=2)
    assert _same(reference, streamed)
    # 12 kept samples in 3 tars read by 2 workers: at most one ranged request per (tar, worker).
    requests = s3.log.gets(".tar")
    assert 0 < len(requests) <= 3 * 2 and all('" 206 ' in r for r in requests)
    assert sum(len(k) for k, _ in streamed) == 12


def test_embed_from_s3_equals_local_with_one_request_per_batch(pool, s3, tmp_path):
    s3.log.clear()
    out = tmp_path / "emb"
    assert cli_main([*EMBED, f"data.shards={pool['url']}", f"out={out}", "data.num_workers=2"]) == 0
    assert len(s3.log.gets(".tar")) == 3  # batch 16 > 8 samples per tar: one batch, one request per tar
    k0, x0 = load_embeddings(pool["emb"], dtype=np.float16)
    k1, x1 = load_embeddings(out, dtype=np.float16)
    assert np.array_equal(k0, k1) and x0.tobytes() == x1.tobytes()
    header = json.loads((out / "header.json").read_text())
    assert header["shard_set_hash"] == json.loads((pool["emb"] / "header.json").read_text())["shard_set_hash"]


def test_select_reads_embeddings_and_shards_from_s3(pool, tmp_path):
    out = tmp_path / "sel"
    args = [*pool["select"], f"embeddings={pool['emb_url']}", f"data.shards={pool['url']}", f"out={out}"]
    assert cli_main([*args, "report.gallery=false"]) == 0
    a, _ = read_selection(pool["sel"])
    b, _ = read_selection(out)
    pd.testing.assert_frame_equal(a, b)
    # Partitioned: keys streamed from each rank file, rows read in blocks, keys read again for the manifest.
    args[-1] = f"out={tmp_path / 'part'}"
    assert cli_main([*args, "report.gallery=false", "gather=partitioned"]) == 0
    pd.testing.assert_frame_equal(a, read_selection(tmp_path / "part")[0])


def test_permanent_errors_name_the_url_and_exit_2(pool, s3, tmp_path):
    missing = s3.url("nothing", "here")
    run = subprocess.run(
        [sys.executable, "-m", "dataeff", *EMBED, f"data.shards={missing}", f"out={tmp_path / 'e'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert run.returncode == 2 and missing in run.stderr, run.stderr
    s3.log.clear()
    with pytest.raises(remote.RemoteInputError, match="nothing/here.tar"):
        remote.read_range(missing + ".tar", 0, 10)
    assert len(s3.log.gets(".tar")) == 1  # not retried


class _Flaky(http.server.SimpleHTTPRequestHandler):
    """Serves ranges of one file; answers 503 to the first ``fail`` requests, 404 for other paths."""

    data = b""
    fail = 0
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).seen.append(self.path)
        if self.path != "/blob.tar":
            self.send_error(404)
            return
        if type(self).fail > 0:
            type(self).fail -= 1
            self.send_error(503)
            return
        start, end = (int(v) for v in self.headers["Range"].removeprefix("bytes=").split("-"))
        body = self.data[start : end + 1]
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(self.data)}")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_transient_errors_are_retried_with_backoff_permanent_ones_are_not(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    _Flaky.data, _Flaky.fail, _Flaky.seen = bytes(range(256)) * 8, 2, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert remote.read_range(base + "/blob.tar", 100, 300) == _Flaky.data[100:300]
        assert _Flaky.seen == ["/blob.tar"] * 3  # two 503s, then the data
        _Flaky.seen = []
        with pytest.raises(remote.RemoteInputError, match=f"{base}/gone.tar"):
            remote.read_range(base + "/gone.tar", 0, 10)
        assert _Flaky.seen == ["/gone.tar"]
        _Flaky.fail, _Flaky.seen = 99, []
        with pytest.raises(remote.RemoteUnavailable, match=f"{base}/blob.tar: failed .* after {remote.ATTEMPTS}"):
            remote.read_range(base + "/blob.tar", 0, 10)
        assert len(_Flaky.seen) == remote.ATTEMPTS
    finally:
        server.shutdown()


def test_http_server_shards_embed_like_local(pool, tmp_path):
    out = tmp_path / "emb"
    with http_server(pool["shards"].parent) as base:
        url = f"{base}/{pool['shards'].name}"
        assert [remote.basename(t) for t in stream.list_shards(url)] == [
            Path(t).name for t in stream.list_shards(str(pool["shards"]))
        ]
        assert cli_main([*EMBED, f"data.shards={url}", f"out={out}", "data.num_workers=0"]) == 0
    k0, x0 = load_embeddings(pool["emb"], dtype=np.float16)
    k1, x1 = load_embeddings(out, dtype=np.float16)
    assert np.array_equal(k0, k1) and x0.tobytes() == x1.tobytes()


def test_shard_out_s3_equals_local_and_resumes_after_a_kill(pool, s3, tmp_path, monkeypatch):
    monkeypatch.setenv("DATAEFF_STAGING_DIR", str(tmp_path / "staging"))
    raw = pool["tmp"] / "raw"
    local = tmp_path / "local" / "sharded"
    shard_tree(raw, local, name="sharded")
    url = s3.url("out", "sharded")
    args = ["shard", f"src={raw}", f"out={url}", "workers=1", "progress=false", "min_side=16", "samples_per_shard=8"]
    uploads: list[str] = []
    real = remote.upload
    killed = []

    def dies_on_second_tar(path, target):
        if target.endswith(".tar"):
            uploads.append(target)
            if len(uploads) == 2 and not killed:
                killed.append(target)
                raise RuntimeError("killed")
        real(path, target)

    monkeypatch.setattr(remote, "upload", dies_on_second_tar)
    with pytest.raises(RuntimeError, match="killed"):
        cli_main(args)
    assert not remote.is_file(url + "/summary.json") and remote.is_file(url + "/sharded-000000.tar")
    uploads.clear()
    assert cli_main(args) == 0
    assert [remote.basename(u) for u in uploads] == ["sharded-000001.tar", "sharded-000002.tar"]  # 000000 kept
    for tar in sorted(local.glob("*.tar")):
        assert remote.read_bytes(f"{url}/{tar.name}") == tar.read_bytes()
    pd.testing.assert_frame_equal(stream.read_index(url), stream.read_index(local))
    summary = json.loads(remote.read_text(url + "/summary.json"))
    assert summary["num_samples"] == 24 and summary["config"]["out"] == url
    assert remote.list_names(url + "/.parts") == []
    assert not remote_shard.staging_dir(url).exists()
    uploads.clear()
    assert cli_main(args) == 0 and uploads == []  # complete: skipped
