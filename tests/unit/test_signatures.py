"""Image signatures (dataeff.data.signatures): pixel hash, pHash, thumbnails, index columns."""

import io

import numpy as np
import pytest
from PIL import Image

from dataeff.data import signatures as sig
from tests.fixtures import kvasir_images


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in kvasir_images(12)]


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _resized(img: Image.Image, scale: float) -> Image.Image:
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)


def test_dct2_matches_reference_matrix_form():
    # Orthonormal DCT-II written out: X[k,l] = c_k c_l sum x[i,j] cos(pi(2i+1)k/2n) cos(pi(2j+1)l/2n).
    x = np.random.default_rng(0).random((6, 6))
    n = 6
    c = np.array([np.sqrt(1 / n)] + [np.sqrt(2 / n)] * (n - 1))
    i = np.arange(n)
    basis = np.cos(np.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * c[:, None]
    np.testing.assert_allclose(sig.dct2(x), basis @ x @ basis.T, atol=1e-12)
    np.testing.assert_allclose(sig.dct_matrix(n), basis, atol=1e-12)


def test_pixel_sha256_is_of_decoded_pixels(images):
    img = images[0]
    png = io.BytesIO()
    img.save(png, format="PNG")
    resaved = Image.open(io.BytesIO(png.getvalue()))  # lossless: other bytes, same pixels
    assert sig.pixel_sha256(resaved) == sig.pixel_sha256(img)
    assert sig.pixel_sha256(_jpeg(img, 95)) != sig.pixel_sha256(img)
    # Same bytes in another shape must not collide.
    flat = Image.fromarray(np.asarray(img).reshape(1, -1, 3))
    assert sig.pixel_sha256(flat) != sig.pixel_sha256(img)


def test_phash_close_for_copies_far_for_other_images(images):
    hashes = sig.pack_phash(np.stack([sig.phash_bits(im) for im in images]))
    assert hashes.dtype == np.uint64 and hashes.shape == (12,)
    for k in range(4):
        copies = [_resized(images[k], 0.7), _resized(images[k], 0.5), _jpeg(images[k], 60)]
        dist = sig.hamming(hashes[k : k + 1], sig.pack_phash(np.stack([sig.phash_bits(c) for c in copies])))
        assert dist.max() <= 4, dist
    d = sig.hamming(hashes, hashes).astype(int)
    off = d[~np.eye(12, dtype=bool)]
    assert off.min() > 4 and np.median(off) > 16  # different images: far apart
    assert (np.diag(d) == 0).all()


def test_phash_bits_are_balanced_around_the_median(images):
    bits = sig.phash_bits(images[3])
    assert bits.shape == (64,) and bits.dtype == bool
    assert 28 <= bits[1:].sum() <= 32  # > median of the 63 AC terms: about half


def test_popcount_and_pack_agree_with_python_bit_counting():
    rng = np.random.default_rng(1)
    bits = rng.random((5, 64)) < 0.5
    packed = sig.pack_phash(bits)
    assert [int(v) for v in packed] == [int("".join("1" if b else "0" for b in row), 2) for row in bits]
    assert sig.popcount64(packed).tolist() == bits.sum(axis=1).tolist()
    with pytest.raises(ValueError, match="64 bits"):
        sig.pack_phash(bits[:, :32])


def test_thumb_corr_invariant_to_brightness_and_zero_for_blank(images):
    a = sig.thumbnail(images[0])[None]
    brighter = sig.thumbnail(Image.fromarray(np.clip(np.asarray(images[0], int) + 20, 0, 255).astype(np.uint8)))
    assert sig.thumb_corr(a, brighter[None])[0] > 0.99
    assert sig.thumb_corr(a, sig.thumbnail(images[5])[None])[0] < 0.9
    blank = np.full((1, 16, 16), 7, np.uint8)
    assert sig.thumb_corr(blank, blank)[0] == 0.0


def test_image_signature_is_the_index_form_of_the_single_signatures(images):
    img = images[2]
    row = sig.image_signature(img)
    assert row["pixel_sha256"] == sig.pixel_sha256(img)
    assert np.int64(row["phash"]).view(np.uint64) == sig.pack_phash(sig.phash_bits(img))[0]
    assert row["thumb"] == sig.thumbnail(img).tobytes()
    # The 128-px base is idempotent: signatures of the base equal those of the image.
    base = sig.gray_base(img)
    assert max(base.size) == sig.GRAY_SIDE and sig.gray_base(base) is base
    assert sig.image_signature(img, base) == row
    assert sig.image_signature(img, pixel_hash=False)["pixel_sha256"] is None


def test_index_signatures_round_trip_and_rows_without_one():
    rng = np.random.default_rng(5)
    bits = rng.random((3, 64)) < 0.5
    bits[0, 0] = True  # top bit set: negative as int64, same 64 bits
    packed = sig.pack_phash(bits)
    thumbs = rng.integers(0, 255, size=(3, 16, 16)).astype(np.uint8)
    sha, phash, th, has = sig.index_signatures(
        ["a", None, "c"],
        [int(v) for v in packed.view(np.int64)],
        [thumbs[0].tobytes(), None, thumbs[2].tobytes()],
    )
    assert packed.view(np.int64)[0] < 0 and (phash[[0, 2]] == packed[[0, 2]]).all()
    assert has.tolist() == [True, False, True] and sha.tolist() == ["a", "", "c"]
    np.testing.assert_array_equal(th[[0, 2]], thumbs[[0, 2]])
    assert phash[1] == 0 and (th[1] == 0).all() and sig.thumb_corr(th[1:2], thumbs[:1])[0] == 0.0
    with pytest.raises(ValueError, match="256"):
        sig.index_signatures(["a"], [1], [b"short"])
