"""Test inputs in the formats archives export, built on the fly: videos (PyAV), DICOM (pydicom), TIFFs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

#: Patient and site identifiers written into every test DICOM; none may reach any output.
PHI = {
    "PatientName": "Doe^Jane^Quincy",
    "PatientID": "PID-99173-XQ",
    "PatientBirthDate": "19530417",
    "AccessionNumber": "ACC-55120-ZZ",
    "InstitutionName": "Saint Elsewhere Hospital",
    "ReferringPhysicianName": "House^Gregory",
    "OtherPatientIDs": "OPID-31337",
    "PatientAddress": "42 Wallaby Way Sydney",
}
VL_ENDOSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.1"  # VL Endoscopic Image Storage


def frames_of(n: int, h: int = 72, w: int = 96, seed: int = 0) -> np.ndarray:
    """``n`` smooth, lightly textured RGB frames with a moving bright square (each passes the quality checks;
    a video codec keeps them close).

    Shape:
        (n, h, w, 3) uint8.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    tint = rng.integers(0, 60, 3)
    smooth = np.stack([x * 120 // w, y * 120 // h, (x + y) * 60 // (w + h)], axis=-1) + 50 + tint
    base = np.clip(smooth + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)  # texture: not blurred
    out = np.repeat(base[None], n, axis=0)
    for i in range(n):
        x = (5 + 4 * i) % max(1, w - 20)
        out[i, 10:30, x : x + 20] = 250
    return out


def write_video(
    path: Path, frames: np.ndarray, fmt: str | None = None, rate: int = 10, faststart: bool = False
) -> Path:
    """Encode ``frames`` (N, H, W, 3) with MPEG-4 Part 2 into ``path`` (container from the extension)."""
    import av

    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format=fmt, options=options) as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.bit_rate = 4_000_000
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _dataset(sop_class: str, syntax: str, frames: np.ndarray, uid_seed: int):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"instance{uid_seed}"])
    meta.TransferSyntaxUID = syntax
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series"])
    ds.Modality = "ES"
    for tag, value in PHI.items():
        setattr(ds, tag, value)
    ds.Rows, ds.Columns = frames.shape[1], frames.shape[2]
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
        ds.FrameTime = "40"
    ds.BitsAllocated = 8 * frames.dtype.itemsize
    ds.PixelRepresentation = 0
    return ds


def write_dicom(
    path: Path, frames: np.ndarray, sop_class: str = VL_ENDOSCOPIC, compressed: bool = False, uid_seed: int = 0
) -> Path:
    """A DICOM file holding ``frames`` (N, H, W, 3) uint8 RGB or (N, H, W) uint16 grayscale.

    ``compressed`` stores RGB frames as JPEG Baseline (one fragment per frame).
    """
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

    ds = _dataset(sop_class, JPEGBaseline8Bit if compressed else ExplicitVRLittleEndian, frames, uid_seed)
    if frames.ndim == 4:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.PhotometricInterpretation = "YBR_FULL_422" if compressed else "RGB"
        ds.BitsStored, ds.HighBit = 8, 7
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsStored, ds.HighBit = 12, 11
    if compressed:
        parts = []
        for arr in frames:
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=95)
            parts.append(buf.getvalue())
        ds.PixelData = encapsulate(parts)
        ds["PixelData"].is_undefined_length = True
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = frames.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_with_syntax(path: Path, syntax: str, uid_seed: int = 0) -> Path:
    """A DICOM whose pixel data claims ``syntax`` (e.g. an MPEG-4 video syntax no decoder reads)."""
    from pydicom.encaps import encapsulate

    frames = frames_of(1)
    ds = _dataset(VL_ENDOSCOPIC, syntax, frames, uid_seed)
    ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, "YBR_PARTIAL_420"
    ds.BitsStored, ds.HighBit = 8, 7
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 64])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def tiff_bytes(kind: str, rgb: np.ndarray) -> bytes:
    """A TIFF variant of ``rgb`` (H, W, 3) uint8 that PIL cannot decode faithfully.

    kind: ``minisblack3`` (RGB samples labelled MinIsBlack), ``rgb16``, ``gray16``, ``multipage``
    (two pages: ``rgb`` then its upside-down copy), ``planar`` (RGB, separate planes).
    """
    import tifffile

    buf = io.BytesIO()
    if kind == "minisblack3":
        tifffile.imwrite(buf, rgb, photometric="minisblack", planarconfig="contig")
    elif kind == "rgb16":
        tifffile.imwrite(buf, rgb.astype(np.uint16) * 257, photometric="rgb")
    elif kind == "gray16":
        tifffile.imwrite(buf, rgb[:, :, 0].astype(np.uint16) * 257, photometric="minisblack")
    elif kind == "multipage":
        tifffile.imwrite(buf, np.stack([rgb, rgb[::-1]]), photometric="rgb")
    elif kind == "planar":
        tifffile.imwrite(buf, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    else:
        raise ValueError(kind)
    return buf.getvalue()


def exif_rotated_jpeg(rgb: np.ndarray, orientation: int) -> bytes:
    """``rgb`` stored as a JPEG whose EXIF says it must be turned by ``orientation`` to show upright."""
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()
