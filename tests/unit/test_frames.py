"""Frame sampling, frame keys, DICOM pixel scaling, the video config, and the audit's groups and frame names."""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest

from dataeff.config import ConfigError
from dataeff.data.dicom import to_uint8
from dataeff.data.frames import FrameOptions, Sampler, frame_key
from dataeff.data.video import VideoConfig
from dataeff.select.audit import audit_selection, group_coverage, locators


def _kept(opts: FrameOptions, n: int = 30, rate: float = 10.0, timed: bool = True) -> list[int]:
    sampler = Sampler(opts)
    return [i for i in range(n) if sampler.wants(i, i / rate if timed else math.nan)]


def test_sampler_every_n_fps_and_max_frames() -> None:
    assert _kept(FrameOptions()) == list(range(30))
    assert _kept(FrameOptions(every_n=7)) == [0, 7, 14, 21, 28]
    assert _kept(FrameOptions(fps=2.0)) == [0, 5, 10, 15, 20, 25]  # 10 fps -> one frame per 0.5 s slot
    assert _kept(FrameOptions(fps=2.0), rate=3.0) == [
        0,
        2,
        3,
        5,
        6,
        8,
        9,
        11,
        12,
        14,
        15,
        17,
        18,
        20,
        21,
        23,
        24,
        26,
        27,
        29,
    ]
    assert _kept(FrameOptions(fps=2.0), timed=False) == list(range(30))  # no times: fps does not apply
    assert _kept(FrameOptions(every_n=3, max_frames=4)) == [0, 3, 6, 9]
    sampler = Sampler(FrameOptions(max_frames=2))
    assert sampler.wants(0, 0.0) and sampler.wants(1, 0.1) and sampler.full and not sampler.wants(2, 0.2)


def test_frame_keys_never_collide_with_file_keys() -> None:
    assert frame_key("site_a_mp4-1a2b3c4d", 12) == "site_a_mp4-1a2b3c4d-f000012"


def test_video_config_refuses_bad_sampling() -> None:
    with pytest.raises(ConfigError, match="video.every_n and video.fps"):
        VideoConfig(every_n=2, fps=1.0)
    with pytest.raises(ConfigError, match="video.every_n=0"):
        VideoConfig(every_n=0)
    with pytest.raises(ConfigError, match="video.extensions"):
        VideoConfig(extensions=["mp4"])


class _Dataset(dict):
    """The few DICOM elements :func:`to_uint8` reads, as a mapping with attribute access."""

    def __getattr__(self, name: str):
        return self[name]


def test_dicom_grayscale_scaling_uses_window_bits_and_inverts_monochrome1() -> None:
    pixels = np.array([[0, 1024, 2048, 4095]], np.uint16)
    tags = {"BitsStored": 12, "PixelRepresentation": 0, "PhotometricInterpretation": "MONOCHROME2"}
    assert to_uint8(pixels, _Dataset(tags)).tolist() == [[0, 64, 128, 255]]  # the 12-bit range, not /257
    windowed = to_uint8(pixels, _Dataset({**tags, "WindowCenter": 1024, "WindowWidth": 2048}))
    assert windowed.tolist() == [[0, 128, 255, 255]]
    inverted = to_uint8(pixels, _Dataset({**tags, "PhotometricInterpretation": "MONOCHROME1"}))
    assert inverted.tolist() == [[255, 191, 127, 0]]


def _selection(keys: list[str], kept: list[bool], reasons: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"key": keys, "kept": kept, "reason": reasons, "cluster": 0, "score": 0.0, "generated": False})


def test_audit_matches_frames_by_name_and_counts_groups() -> None:
    index = pd.DataFrame(
        {
            "key": ["v-f0", "v-f1", "v-f2", "w-f0", "s"],
            "source": ["v.mp4", "v.mp4", "v.mp4", "w.mp4", "s.jpg"],
            "status": ["ok"] * 5,
            "frame": [0, 1, 2, 0, -1],
            "group": ["v.mp4", "v.mp4", "v.mp4", "w.mp4", "s.jpg"],
        }
    )
    assert locators(index).tolist() == ["v.mp4#0", "v.mp4#1", "v.mp4#2", "w.mp4#0", "s.jpg"]
    truth = pd.DataFrame(
        {
            "source": ["v.mp4#0", "v.mp4#1", "v.mp4#2", "w.mp4#0", "s.jpg"],
            "planted": ["none", "near_duplicate", "invalid", "none", "none"],
            "kind": ["original", "shift", "black", "original", "original"],
            "twin": ["", "v.mp4#0", "", "", ""],
        }
    )
    frame = _selection(
        ["v-f0", "v-f1", "v-f2", "w-f0", "s"],
        [True, False, False, False, True],
        ["kept", "redundant_of:v-f0", "dark", "redundant_of:s", "kept"],
    )
    a = audit_selection(frame, index, truth)
    assert a["truth_rows_not_in_index"] == 0
    assert a["per_category"]["near_duplicate"]["recall"] == 1.0 and a["per_category"]["invalid"]["recall"] == 1.0
    assert a["groups"] == {"pool": 3, "kept": 2, "redundant_same_group": 1, "redundant_other_group": 1}


def test_group_coverage_of_an_index_without_groups_takes_each_source() -> None:
    index = pd.DataFrame({"key": ["a", "b"], "source": ["a.jpg", "b.jpg"], "status": ["ok", "ok"]})
    frame = _selection(["a", "b"], [True, False], ["kept", "redundant_of:a"])
    assert group_coverage(frame, index) == {"pool": 2, "kept": 1, "redundant_same_group": 0, "redundant_other_group": 1}


@pytest.mark.parametrize(("module", "name", "extra"), [("av", "clip.mp4", "video"), ("pydicom", "ct.dcm", "dicom")])
def test_a_missing_reader_is_a_config_error_before_any_output(tmp_path, monkeypatch, module, name, extra) -> None:
    from dataeff.data.shard import ShardConfig, main

    monkeypatch.setitem(sys.modules, module, None)  # import fails as when the extra is not installed
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / name).write_bytes(b"\0" * 64)
    with pytest.raises(ConfigError, match=rf"pip install 'dataeff\[{extra}\]'"):
        main(ShardConfig(src=str(tmp_path / "src"), out=str(tmp_path / "out"), progress=False))
    assert not (tmp_path / "out").exists()
