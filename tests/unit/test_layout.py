"""Architecture rules that code review alone would let slip."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dataeff"


def test_only_dist_touches_torch_distributed():
    pattern = re.compile(r"^\s*(import torch\.distributed|from torch\.distributed|from torch import distributed)", re.M)
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name != "dist.py" and pattern.search(p.read_text())
    ]
    assert offenders == []


def test_no_unfinished_markers():
    markers = re.compile(r"NotImplementedError|TODO|FIXME|XXX")
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if markers.search(p.read_text())]
    assert offenders == []
