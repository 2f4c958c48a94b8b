"""Decoding what satellite archives hold into uint8 RGB, and refusing what they should not hold."""

import io
import warnings

import numpy as np
import pytest
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile

from bimors.config import DecodeConfig
from bimors.data.decode import DecodeError, bands_to_rgb, decode_image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def geotiff(bands: np.ndarray, **profile) -> bytes:
    count, height, width = bands.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile() as memfile:
            profile.update(driver="GTiff", count=count, height=height, width=width, dtype=bands.dtype)
            with memfile.open(**profile) as ds:
                ds.write(bands)
            return memfile.read()


RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_rgb_round_trips_exactly(fmt):
    options = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode(Image.fromarray(RGB8), fmt, **options))
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    assert np.array_equal(out, RGB8)


def test_jpeg_decodes_close_to_the_original():
    out = decode_image(encode(Image.fromarray(RGB8), "JPEG", quality=95))
    assert out.shape == (24, 32, 3)
    smooth = np.full((16, 16, 3), (40, 120, 200), np.uint8)
    assert np.abs(decode_image(encode(Image.fromarray(smooth), "JPEG")).astype(int) - smooth).max() <= 3


def test_grayscale_is_replicated_to_rgb():
    gray = RNG.integers(0, 256, (10, 12), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(gray), "PNG"))
    assert out.shape == (10, 12, 3)
    for channel in range(3):
        assert np.array_equal(out[..., channel], gray)


def test_rgba_drops_alpha_keeping_stored_colours():
    rgba = RNG.integers(0, 256, (8, 9, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: colours are still the stored ones, not black
    out = decode_image(encode(Image.fromarray(rgba), "PNG"))
    assert np.array_equal(out, rgba[..., :3])


def test_palette_is_expanded():
    palette_image = Image.fromarray(RGB8).convert("P", palette=Image.Palette.ADAPTIVE, colors=6)
    out = decode_image(encode(palette_image, "PNG"))
    assert np.array_equal(out, np.asarray(palette_image.convert("RGB")))
    assert len(np.unique(out.reshape(-1, 3), axis=0)) <= 6


def test_16bit_single_band_is_percentile_stretched():
    ramp = (np.arange(100 * 100, dtype=np.uint32).reshape(100, 100) * 6).astype(np.uint16)  # 0..59994
    for data in (encode(Image.fromarray(ramp), "PNG"), geotiff(ramp[None])):
        out = decode_image(data)
        assert out.shape == (100, 100, 3)
        assert np.array_equal(out[..., 0], out[..., 2])
        # the lowest and highest 2% saturate, the middle is linear
        assert (out[..., 0] == 0).mean() == pytest.approx(0.02, abs=0.005)
        assert (out[..., 0] == 255).mean() == pytest.approx(0.02, abs=0.005)
        assert int(out[50, 0, 0]) == pytest.approx(127.5, abs=2)
    minmax = decode_image(geotiff(ramp[None]), DecodeConfig(stretch="minmax"))
    assert (minmax[0, 0, 0], minmax[-1, -1, 0]) == (0, 255)
    clipped = decode_image(geotiff(ramp[None]), DecodeConfig(stretch="none"))
    assert clipped[0, 0, 0] == 0 and clipped[-1, -1, 0] == 255 and clipped[0, 10, 0] == 60


def test_16bit_four_band_geotiff_band_selection():
    height, width = 6, 8
    bands = np.zeros((4, height, width), np.uint16)
    for band in range(4):  # band b is bright only in column block b, so its position is visible
        bands[band, :, band * 2 : band * 2 + 2] = 10000 + 1000 * band
    data = geotiff(bands)
    out = decode_image(data, DecodeConfig(bands=[3, 2, 1]))
    assert out.shape == (height, width, 3)
    bright = [set(np.nonzero(out[0, :, channel] == 255)[0]) for channel in range(3)]
    assert bright == [{4, 5}, {2, 3}, {0, 1}]  # R <- band 3, G <- band 2, B <- band 1
    default = decode_image(data)
    assert [set(np.nonzero(default[0, :, c] == 255)[0]) for c in range(3)] == [{0, 1}, {2, 3}, {4, 5}]
    gray = decode_image(data, DecodeConfig(bands=[4]))
    assert set(np.nonzero(gray[0, :, 1] == 255)[0]) == {6, 7}
    with pytest.raises(DecodeError, match="band 5 but the image has 4 band"):
        decode_image(data, DecodeConfig(bands=[5, 3, 2]))
    with pytest.raises(DecodeError, match="1 \\(gray\\) or 3"):
        decode_image(data, DecodeConfig(bands=[1, 2]))


def test_float32_tiff_with_nan_and_nodata():
    values = np.linspace(-1, 1, 16 * 16, dtype=np.float32).reshape(1, 16, 16)  # e.g. an index like NDVI
    values[0, 0, 0] = np.nan
    out = decode_image(geotiff(values))
    assert out.shape == (16, 16, 3)
    assert out[0, 0, 0] == 0  # NaN written as 0, and left out of the statistics
    assert out[-1, -1, 0] == 255 and int(out[8, 0, 0]) == pytest.approx(128, abs=4)
    with_nodata = np.full((1, 10, 10), 5000, np.uint16)
    with_nodata[0, 5:] = 6000
    with_nodata[0, :2] = 0
    out = decode_image(geotiff(with_nodata, nodata=0), DecodeConfig(stretch="minmax"))
    # nodata stays 0 and does not stretch the range: 5000 -> 0, 6000 -> 255
    assert (out[0, 0, 0], out[3, 0, 0], out[7, 0, 0]) == (0, 0, 255)
    out = decode_image(encode(Image.fromarray(values[0]), "TIFF"))  # Pillow mode F
    assert out.shape == (16, 16, 3)


def test_constant_images_do_not_divide_by_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no division by zero, no NaN casts
        flat16 = decode_image(geotiff(np.full((3, 5, 5), 1234, np.uint16)))
        assert flat16.shape == (5, 5, 3) and not flat16.any()
        flat8 = np.full((5, 5, 3), 77, np.uint8)
        assert np.array_equal(decode_image(encode(Image.fromarray(flat8), "PNG")), flat8)
        assert not decode_image(encode(Image.fromarray(flat8), "PNG"), DecodeConfig(stretch="minmax")).any()
        assert not decode_image(geotiff(np.full((1, 4, 4), np.nan, np.float32))).any()


def test_oversized_images_are_refused_before_decoding():
    big = encode(Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(DecodeError, match=r"300x200 = 60,000 pixels, over decode.max_pixels=59,999"):
        decode_image(big, DecodeConfig(max_pixels=59_999))
    assert decode_image(big, DecodeConfig(max_pixels=60_000)).shape == (200, 300, 3)
    with pytest.raises(DecodeError, match="over decode.max_pixels"):
        decode_image(geotiff(np.zeros((1, 100, 100), np.uint16)), DecodeConfig(max_pixels=9_999))


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "empty"),
        (b"just some text, certainly not pixels", "not an image"),
        (b"{\"json\": true}", "not an image"),
        (encode(Image.fromarray(RGB8), "JPEG")[:300], "corrupt"),
        (encode(Image.fromarray(RGB8), "PNG")[:120], "truncated or corrupt PNG"),
        (geotiff(np.ones((4, 64, 64), np.uint16))[:400], "unreadable TIFF"),
        (b"II*\x00" + bytes(range(200)), "unreadable TIFF"),
    ],
    ids=["empty", "text", "json", "jpeg-cut", "png-cut", "tiff-cut", "tiff-garbage"],
)
def test_bad_bytes_raise_decode_error(data, words):
    with pytest.raises(DecodeError, match=words) as info:
        decode_image(data)
    assert isinstance(info.value, ValueError)
    assert len(str(info.value)) < 400  # short enough for an errors table


def test_bands_to_rgb_applies_the_same_rules_to_arrays():
    window = np.stack([np.full((4, 4), v, np.uint16) for v in (1, 2, 3)])
    window[:, 0, 0] = 0
    valid = window[0] != 0
    out = bands_to_rgb(window.astype(np.float32) * np.arange(16).reshape(4, 4), DecodeConfig(stretch="minmax"), valid)
    assert out.shape == (4, 4, 3) and out[0, 0].tolist() == [0, 0, 0] and out[-1, -1].tolist() == [255, 255, 255]
    with pytest.raises(DecodeError, match="bands, height, width"):
        bands_to_rgb(np.zeros((4, 4)))
