import numpy as np
import pytest
from PIL import Image

from primis.errors import PrimisError
from primis.io.images import encode_image, read_image, read_pixels
from primis.io.pixels import IntensityMapping, pad_to_multiple


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_intensity_mapping_round_trips(dtype):
    rng = np.random.default_rng(0)
    pixels = (rng.uniform(-100 if dtype == np.int16 else 3, 3000, (9, 11))).astype(dtype)
    if dtype == np.uint8:
        pixels = (pixels % 250).astype(dtype)
    mapping = IntensityMapping.of(pixels)
    unit = mapping.forward(pixels)
    assert unit.min() == 0 and unit.max() == 1
    restored = mapping.inverse(unit)
    assert restored.dtype == pixels.dtype
    np.testing.assert_allclose(restored, pixels, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("invert", [False, True])
def test_intensity_mapping_of_a_large_image_equals_the_whole_image_formula(invert):
    # 3,000 rows of 700 go in bands of about a million values: every band must be mapped.
    pixels = np.random.default_rng(1).integers(0, 4096, (3000, 700), dtype=np.uint16)
    mapping = IntensityMapping("uint16", 10.0, 4000.0, invert)
    whole = (pixels.astype(np.float64) - 10.0) / 3990.0
    expected = (1.0 - whole if invert else whole).astype(np.float32)
    assert np.array_equal(mapping.forward(pixels), expected)
    back = np.clip(np.rint((1.0 - expected if invert else expected) * 3990.0 + 10.0), 10, 4000)
    assert np.array_equal(mapping.inverse(expected), back.astype(np.uint16))


def test_colour_becomes_grayscale_and_16_bit_stays_16_bit(tmp_path):
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert read_pixels(tmp_path / "c.png").shape == (5, 6)
    deep = np.arange(30, dtype=np.uint16).reshape(5, 6) * 1000
    (tmp_path / "d.png").write_bytes(encode_image(deep, ".png"))
    assert np.array_equal(read_pixels(tmp_path / "d.png"), deep)
    unit, mapping = read_image(tmp_path / "d.png")
    assert mapping.dtype == "uint16" and unit.max() == 1


def test_padding_reaches_the_multiple_and_keeps_the_image():
    image = np.random.default_rng(0).random((13, 5))
    padded = pad_to_multiple(image, 8)
    assert padded.shape == (16, 8)
    assert np.array_equal(padded[:13, :5], image)


def test_unreadable_inputs_raise_clear_errors(tmp_path):
    (tmp_path / "x.gif2").write_bytes(b"data")
    with pytest.raises(PrimisError, match="unsupported"):
        read_pixels(tmp_path / "x.gif2")
    np.save(tmp_path / "v.npy", np.zeros((2, 3, 5)))
    with pytest.raises(PrimisError, match="2-D"):
        read_pixels(tmp_path / "v.npy")
    np.save(tmp_path / "n.npy", np.array([[np.nan, 1.0]]))
    with pytest.raises(PrimisError, match="NaN"):
        read_pixels(tmp_path / "n.npy")


def test_ms_ssim_is_one_for_identical_images_and_drops_with_noise():
    from primis.metrics import ms_ssim

    rng = np.random.default_rng(0)
    image = rng.random((200, 220))
    assert ms_ssim(image, image) == pytest.approx(1.0)
    noisy = np.clip(image + 0.2 * rng.standard_normal(image.shape), 0, 1)
    assert 0 < ms_ssim(image, noisy) < 0.95
    assert ms_ssim(image[:100], image[:100]) is None


@pytest.mark.parametrize("compression", ["lzw", "packbits", "zstd", "deflate"])
def test_compressed_tiffs_read_their_values(tmp_path, compression):
    import tifffile

    pixels = (np.arange(60 * 70).reshape(60, 70) * 13 % 65536).astype(np.uint16)
    tifffile.imwrite(tmp_path / "c.tif", pixels, compression=compression)
    assert np.array_equal(read_pixels(tmp_path / "c.tif"), pixels)


def test_a_miniswhite_tiff_is_inverted_for_the_model(tmp_path):
    import tifffile

    pixels = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (8, 1))
    tifffile.imwrite(tmp_path / "w.tif", pixels, photometric="miniswhite")
    unit, mapping = read_image(tmp_path / "w.tif")
    assert mapping.invert and unit[0, 0] == 1.0 and unit[0, -1] == 0.0
    assert np.array_equal(mapping.inverse(unit), pixels)
    restored = tmp_path / "r.tif"
    restored.write_bytes(encode_image(pixels, ".tif", "MINISWHITE"))
    with tifffile.TiffFile(restored) as tiff:
        assert tiff.pages[0].photometric == tifffile.PHOTOMETRIC.MINISWHITE


def test_an_exif_orientation_is_applied_as_viewers_do(tmp_path):
    pixels = np.tile(np.arange(0, 240, 4, dtype=np.uint8), (20, 1))  # 20 x 60, dark to bright
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown turned 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = read_pixels(tmp_path / "phone.jpg")
    assert shown.shape == (60, 20)
    assert shown[0].mean() < 10 and shown[-1].mean() > 220
