"""dataeff: data-effective pre-training of medical vision foundation models."""

from importlib.metadata import PackageNotFoundError, version

try:
    # Read from the installed distribution, so the version is written once (pyproject.toml).
    __version__ = version("dataeff")
except PackageNotFoundError:  # imported from a source tree that was never pip-installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
