"""DICOM instances (single- and multi-frame, e.g. VL Endoscopic Image Storage) as frame samples.

Read with pydicom; compressed transfer syntaxes decode through pydicom's plugins (pylibjpeg,
Pillow); a syntax no installed plugin decodes (MPEG-2/4 and HEVC video syntaxes, or JPEG-LS
without its plugin) is rejected with ``dicom_unsupported_transfer_syntax``.

Patient data never leaves this module: no tag value is logged, raised or returned except
pixels and timing. A frame's key is ``dicom-<h>-f<frame>`` with ``<h>`` the first 16 hex
digits of the sha256 of the SOP Instance UID and the file's path (the path keeps two copies
of one instance apart); its group is ``dicom-study-<h>`` from the Study Instance UID, so
frames of one exam stay on one side of a group-aware split. pydicom's own warnings, which
can quote tag values, are silenced while a file is read.

Pixels become 8 bits: colour data as decoded (YBR converted to RGB); grayscale through the
Modality LUT (rescale slope/intercept), then the first VOI window (Window Center/Width) when
the file has one, else the full stored range; MONOCHROME1 is inverted so that bright means
bright. Frame times come from Frame Time (ms per frame) when present.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dataeff.config import ConfigError, option
from dataeff.constants import DICOM_NO_PIXELS, DICOM_UNREADABLE, DICOM_UNSUPPORTED_SYNTAX
from dataeff.data.frames import Frame, FrameOptions, MediaRejected, Sampler

__all__ = ["DicomConfig", "DicomInstance", "is_dicom", "require_pydicom", "to_uint8"]

DICOM_EXTENSIONS = (".dcm", ".dicom")
_PREAMBLE = 128


@dataclass
class DicomConfig:
    """Which files are read as DICOM (``dicom.*``); files starting with the DICOM preamble always are."""

    extensions: list = option(list(DICOM_EXTENSIONS), help="file extensions read as DICOM even without a preamble")

    def __post_init__(self) -> None:
        if any(not str(e).startswith(".") for e in self.extensions):
            raise ConfigError(f"dicom.extensions={self.extensions}: give a list like ['.dcm']")


def require_pydicom() -> Any:
    """The ``pydicom`` module, or a ConfigError saying how to install it."""
    try:
        import pydicom
    except ImportError:
        raise ConfigError(
            "reading DICOM needs pydicom: pip install 'dataeff[dicom]' (or set dicom.extensions=[] and keep "
            "DICOM files out of src)"
        ) from None
    return pydicom


def is_dicom(data: bytes) -> bool:
    """Whether ``data`` starts with the DICOM file preamble (128 bytes, then ``DICM``)."""
    return data[_PREAMBLE : _PREAMBLE + 4] == b"DICM"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _first(value: Any) -> float:
    """A number from a DS/IS element that may hold several values (the first one)."""
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, MultiValue) else value)


def to_uint8(pixels: np.ndarray, ds: Any) -> np.ndarray:
    """One decoded frame as 8 bits (rules in the module docstring).

    Shape:
        pixels: (H, W) grayscale or (H, W, 3) colour -> same shape, uint8.
    """
    if pixels.ndim == 3:
        if pixels.dtype == np.uint8:
            return pixels
        top = float(2 ** int(ds.get("BitsStored", 8 * pixels.dtype.itemsize)) - 1)
        return np.clip(np.rint(pixels.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    from pydicom.pixels import apply_modality_lut

    bits = int(ds.get("BitsStored", 8 * pixels.dtype.itemsize))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo_raw, hi_raw = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    lo, hi = sorted((lo_raw * slope + intercept, hi_raw * slope + intercept))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        lo, hi = center - width / 2, center + width / 2
    scaled = np.clip((values - lo) / max(hi - lo, 1e-12), 0.0, 1.0) * 255.0
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 255.0 - scaled
    return np.rint(scaled).astype(np.uint8)


class DicomInstance:
    """One DICOM file: its key base and group (hashed UIDs), and its sampled frames.

    After iteration, :attr:`decoded` and :attr:`lost` count the frames read and those that
    failed to decode (kept out; the file is rejected when none decodes).

    Raises:
        MediaRejected: ``dicom_unreadable`` (not parsable), ``dicom_no_pixels`` (no image),
            ``dicom_unsupported_transfer_syntax`` (no installed decoder).
    """

    def __init__(self, data: bytes, rel: str, opts: FrameOptions):
        pydicom = require_pydicom()
        from pydicom.pixels import get_decoder

        self.opts, self.decoded, self.lost = opts, 0, 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.ds = pydicom.dcmread(io.BytesIO(data), force=not is_dicom(data))
                syntax = self.ds.file_meta.TransferSyntaxUID
            except Exception:  # never quote pydicom's message: it may hold tag values
                raise MediaRejected(DICOM_UNREADABLE) from None
        if "PixelData" not in self.ds:
            raise MediaRejected(DICOM_NO_PIXELS)
        try:
            available = get_decoder(syntax).is_available
        except Exception:  # pydicom knows no decoder for this syntax at all (video syntaxes)
            available = False
        if not available:
            raise MediaRejected(DICOM_UNSUPPORTED_SYNTAX)
        instance = str(self.ds.get("SOPInstanceUID", "")) or hashlib.sha256(data).hexdigest()
        self.key_base = f"dicom-{_digest(instance, rel)}"
        study = str(self.ds.get("StudyInstanceUID", "")) or str(self.ds.get("SeriesInstanceUID", "")) or instance
        self.group = f"dicom-study-{_digest(study)}"
        self.count = int(self.ds.get("NumberOfFrames", 1) or 1)
        frame_ms = self.ds.get("FrameTime")
        self.frame_seconds = float(frame_ms) / 1000.0 if frame_ms else math.nan

    def __iter__(self) -> Iterator[Frame]:
        from pydicom.pixels import pixel_array

        sampler = Sampler(self.opts)
        for index in range(self.count):
            time = index * self.frame_seconds
            if sampler.full:
                break
            if not sampler.wants(index, time):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    pixels = pixel_array(self.ds, index=index if self.count > 1 else None)
                except Exception:  # a damaged frame: counted, the others still read
                    self.lost += 1
                    continue
            self.decoded += 1
            yield Frame(index, time, to_uint8(pixels, self.ds))
        if self.decoded == 0:
            raise MediaRejected(DICOM_UNREADABLE)
