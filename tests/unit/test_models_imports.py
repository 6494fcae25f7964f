"""``dataeff.models`` holds what is trained, not how: importing a model module pulls in no
training shell, no process group and no file writing (STYLE.md rule 12).

The modules are imported in a fresh interpreter, so what another test imported earlier
cannot hide a dependency; the check is on ``sys.modules``, so indirect imports count too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODELS = sorted(f"dataeff.models.{p.stem}" for p in (REPO / "dataeff" / "models").glob("*.py") if p.stem != "__init__")
FORBIDDEN = (
    "dataeff.trainer",
    "dataeff.dist",
    "dataeff.files",
    "dataeff.pretrain",
    "dataeff.finetune",
    "dataeff.finetune_module",
    "dataeff.sweep",
    "dataeff.report",
    "dataeff.select",  # and every dataeff.select.* stage module
)


# One interpreter for all modules (importing torch once keeps this fast): after each
# import the newly loaded modules are attributed to that module.
_SCRIPT = """
import importlib, json, sys
seen = set(sys.modules)
for name in sys.argv[1:]:
    importlib.import_module(name)
    print(json.dumps([name, sorted(set(sys.modules) - seen)]))
    seen = set(sys.modules)
"""


def test_every_model_module_is_checked():
    assert {"dataeff.models.encoder", "dataeff.models.mae", "dataeff.models.segment"} <= set(MODELS)


def test_model_modules_import_no_shell():
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *MODELS], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = dict(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("["))
    assert set(loaded) == set(MODELS)
    bad = {
        module: [m for m in new if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
        for module, new in loaded.items()
    }
    assert not any(bad.values()), f"model modules load training-shell modules: {bad}"
