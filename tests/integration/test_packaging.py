"""The wheel is the product: built, installed apart from the checkout, it runs a stage by config name.

Also checks that the optional imports stay optional: without faiss, deepspeed and
segment-anything, the CLI's help and the import of every stage still work, and a method
that needs faiss says which extra brings it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib

from dataeff.config import ConfigError
from tests.fixtures import REPO, make_raw_tree

#: Modules the extras bring; blocked (``sys.modules[name] = None``) to play an install without them.
OPTIONAL = ("faiss", "deepspeed", "segment_anything")


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _source_copy(dst: Path) -> Path:
    """The files a wheel is built from, copied so the build leaves nothing in the checkout."""
    shutil.copy2(REPO / "pyproject.toml", dst / "pyproject.toml")
    shutil.copy2(REPO / "README.md", dst / "README.md")
    shutil.copytree(REPO / "dataeff", dst / "dataeff", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, installed with ``pip --target`` into a folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(_mkdir(tmp / "src"))
    # --no-build-isolation: build with this venv's setuptools instead of downloading one.
    build = _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), "."],
        cwd=src,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp / "dist").glob("dataeff-*.whl")
    target = tmp / "site"
    install = _run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], tmp
    )
    assert install.returncode == 0, install.stderr
    return target


def _wheel_env(site: Path) -> dict[str, str]:
    # The wheel's dataeff first on the path; its dependencies still come from this venv.
    return {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline"}


def test_installed_wheel_shards_by_packaged_config_name(site, tmp_path):
    raw = make_raw_tree(tmp_path / "raw", n=12, size=32)
    elsewhere = _mkdir(tmp_path / "elsewhere")  # no configs/ here: the name must resolve inside the wheel
    env = _wheel_env(site)
    where = _run([sys.executable, "-c", "import dataeff; print(dataeff.__file__)"], elsewhere, env)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve().is_relative_to(site.resolve())
    out = tmp_path / "shards"
    run = _run(
        [sys.executable, "-m", "dataeff", "shard", "--config", "shard/tiny", f"src={raw}", f"out={out}", "workers=1"],
        elsewhere,
        env,
    )
    assert run.returncode == 0, run.stderr
    assert (out / "index.parquet").is_file() and list(out.glob("*.tar"))


def test_installed_wheel_reports_its_version(site, tmp_path):
    env = _wheel_env(site)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    got = _run([sys.executable, "-c", "import dataeff; print(dataeff.__version__)"], tmp_path, env)
    assert got.stdout.strip() == version, got.stderr
    flag = _run([sys.executable, "-m", "dataeff", "--version"], tmp_path, env)
    assert flag.returncode == 0 and version in flag.stdout, flag.stderr


def test_unknown_config_name_lists_the_packaged_ones(site, tmp_path):
    run = _run([sys.executable, "-m", "dataeff", "shard", "--config", "shard/nope"], tmp_path, _wheel_env(site))
    assert run.returncode == 2
    assert "shard/nope" in run.stderr and "shard/tiny" in run.stderr and "pretrain/tiny" in run.stderr


def test_help_and_stage_imports_work_without_the_optional_packages(tmp_path):
    code = (
        "import sys\n"
        f"for name in {OPTIONAL!r}: sys.modules[name] = None\n"
        "import dataeff.select.stage, dataeff.select.methods, dataeff.sweep, dataeff.pretrain, dataeff.finetune\n"
        "from dataeff.cli import main\n"
        "main(['select', '--help'])\n"
    )
    run = _run([sys.executable, "-c", code], REPO)
    assert run.returncode == 0, run.stderr
    assert "cluster.k" in run.stdout


def test_clustering_without_faiss_names_the_extras(monkeypatch):
    from dataeff.select import cluster as C
    from dataeff.select import near_copies as NC

    monkeypatch.setitem(sys.modules, "faiss", None)  # None in sys.modules: import raises ImportError
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ConfigError, match=r"k-means.*install dataeff\[cpu\] or dataeff\[gpu\]"):
        C.train_kmeans(x, k=2, niter=1, seed=0)
    with pytest.raises(ConfigError, match=r"dataeff\[cpu\] or dataeff\[gpu\]"):
        C.gpu_available()
    thumbs = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    with pytest.raises(ConfigError, match=r"near-copy.*dataeff\[cpu\]"):
        NC.candidate_pairs(thumbs, np.arange(3), (), k=2)


def test_every_dependency_has_a_floor_that_test_min_pins():
    run = _run([sys.executable, str(REPO / ".ci" / "min_pins.py")], REPO)
    assert run.returncode == 0, run.stderr
    pins = dict(line.split("==") for line in run.stdout.split())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"]:
        name = req.split(">=")[0].split("==")[0].strip()
        assert name.lower() in {k.lower() for k in pins}, f"{req} is not pinned by make test-min"
    assert pins["torch"] == "2.14.1" and "faiss-cpu" in pins and "ruff" not in pins
