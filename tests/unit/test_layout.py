"""Architecture rules that code review alone would let slip (the import rules: test_imports.py)."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dataeff"


def test_no_unfinished_markers():
    markers = re.compile(r"NotImplementedError|TODO|FIXME|XXX")
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if markers.search(p.read_text())]
    assert offenders == []
