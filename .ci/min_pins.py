"""Print ``name==floor`` pins for every dependency ``make test-min`` installs.

Reads ``[project].dependencies`` and the ``cpu`` and ``dev`` extras of pyproject.toml and
turns each ``>=`` floor into an exact pin, so the unit tests run against the oldest
releases the package claims to support. Exits non-zero when a dependency has no floor:
an unbounded requirement makes no claim that this check could test.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

#: Extras the unit tests need (faiss for k-means, pytest and its plugins).
EXTRAS = ("cpu", "dev")
#: Lint tools: not imported by any test, and pinned exactly already in the dev extra.
LINT_ONLY = {"ruff", "mypy", "types-pyyaml"}
#: The only torch pair that imports together on this project's machines (a local wheel);
#: torch's own floor is checked by its users' installs, not here.
OVERRIDES = {"torch": "2.14.1", "torchvision": "0.29.1"}
_REQ = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(>=|==)\s*([^,;\s]+)\s*$")


def pins(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    out: dict[str, str] = {}
    for req in reqs:
        name = re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0]
        key = name.lower().replace("_", "-")
        if key in LINT_ONLY:
            continue
        if key in OVERRIDES:
            out[key] = f"{name}=={OVERRIDES[key]}"
            continue
        match = _REQ.match(req)
        if match is None:
            raise SystemExit(f"pyproject.toml: {req!r} has no '>=' floor (or '==' pin); give it one")
        out.setdefault(key, f"{match.group(1)}=={match.group(3)}")
    return sorted(out.values(), key=str.lower)


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    print("\n".join(pins(root / "pyproject.toml")))
