"""edge_mllm.preprocess against Hugging Face's CLIP image processor (PIL backend) and LLaVA's
``expand2square``, plus every input kind and mode a user may hand it, and the errors for bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edge_mllm.errors import ImageError
from edge_mllm.preprocess import ImageProcessor, load_image, to_rgb

transformers = pytest.importorskip("transformers")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Both sides rescale uint8 by 1/255 and normalise in float32; transformers rescales in float64 and then
# casts, edge_mllm multiplies in float32: they differ by at most 1 ulp before normalisation (measured
# 4.8e-7 after dividing by std), far inside this bound.
ATOL = 1e-5

# (width, height): landscape, portrait, very tall, a single pixel, tiny and wide, already square,
# odd sizes whose center crop has an odd margin.
SIZES = [(640, 480), (480, 640), (333, 1000), (1000, 333), (1, 1), (17, 5), (336, 336), (337, 335)]


def hf_processor(size: int):
    return transformers.CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=Image.Resampling.BICUBIC,
        do_convert_rgb=True,
    )


def hf_pixels(processor, image) -> torch.Tensor:
    out = processor(images=image, return_tensors="pt")["pixel_values"]
    assert out.shape[0] == 1
    return out[0]


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """LLaVA's ``llava.mm_utils.expand2square``, verbatim."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 7919 * width + height)
    # Smooth structure plus noise, so that resampling and cropping offsets both matter.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) % 256], axis=-1)
    noisy = base + rng.normal(0, 40, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def png_bytes(image: Image.Image, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_kwargs)
    return buffer.getvalue()


def reopen_png(image: Image.Image, **save_kwargs) -> Image.Image:
    """Round trip through PNG, so that ``info['transparency']`` is what a decoder produces."""
    reopened = Image.open(io.BytesIO(png_bytes(image, **save_kwargs)))
    reopened.load()
    return reopened


def check_tensor(pixels: torch.Tensor, size: int) -> None:
    assert isinstance(pixels, torch.Tensor)
    assert pixels.shape == (3, size, size)
    assert pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all()
    # Normalised [0, 1] pixels with the CLIP statistics stay inside [-1.8, 2.2].
    assert pixels.min() >= -1.8 and pixels.max() <= 2.2


@pytest.fixture(scope="module")
def hf336():
    return hf_processor(336)


@pytest.fixture(scope="module")
def crop336():
    return ImageProcessor(336, CLIP_MEAN, CLIP_STD, aspect="crop")


@pytest.fixture(scope="module")
def pad336():
    return ImageProcessor(336, CLIP_MEAN, CLIP_STD, aspect="pad")


# --------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("size", [336, 224])
@pytest.mark.parametrize("wh", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_crop_matches_hf_clip_processor(size, wh):
    image = random_rgb(*wh)
    expected = hf_pixels(hf_processor(size), image)
    got = ImageProcessor(size, CLIP_MEAN, CLIP_STD, aspect="crop")(image)
    check_tensor(got, size)
    assert expected.shape == got.shape
    assert (expected - got).abs().max().item() <= ATOL


def test_fill_color_is_llava_background(pad336):
    # LLaVA: tuple(int(x * 255) for x in image_processor.image_mean)
    assert pad336.fill_color == (122, 116, 104)
    assert pad336.fill_color == tuple(int(m * 255) for m in CLIP_MEAN)


@pytest.mark.parametrize("wh", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_pad_matches_llava_expand2square_then_hf(wh, hf336, pad336):
    image = random_rgb(*wh, seed=1)
    expected = hf_pixels(hf336, expand2square(image, (122, 116, 104)))
    got = pad336(image)
    check_tensor(got, 336)
    assert (expected - got).abs().max().item() <= ATOL


def test_pad_borders_are_the_mean_colour(pad336):
    # A wide black strip: top and bottom rows of the padded square are the fill colour, which
    # normalises to (int(255 m) / 255 - m) / s: almost zero.
    got = pad336(Image.new("RGB", (300, 30), (0, 0, 0)))
    fill = torch.tensor([(int(m * 255) / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)])
    assert torch.allclose(got[:, 0, :], fill[:, None].expand(3, 336), atol=1e-5)
    assert torch.allclose(got[:, -1, :], fill[:, None].expand(3, 336), atol=1e-5)
    centre = torch.tensor([(0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)])
    assert torch.allclose(got[:, 168, 168], centre, atol=1e-5)


def test_pad_and_crop_agree_on_square_images(pad336, crop336):
    image = random_rgb(500, 500, seed=2)
    assert torch.equal(pad336(image), crop336(image))


# --------------------------------------------------------------------------------------------------
# PIL modes: the RGB conversion is transformers' convert_to_rgb (transparency over white)


def _modes() -> dict[str, Image.Image]:
    rng = np.random.default_rng(3)
    rgb = random_rgb(45, 30, seed=3)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = int(np.asarray(palette)[0, 0])
    gray_key = rgb.convert("L")
    rgb_key = rgb.copy()
    return {
        "L": rgb.convert("L"),
        "LA": Image.fromarray(rng.integers(0, 256, (30, 45, 2), dtype=np.uint8), "LA"),
        "RGBA": Image.fromarray(rng.integers(0, 256, (30, 45, 4), dtype=np.uint8), "RGBA"),
        "RGBA-opaque": rgb.convert("RGBA"),
        "P": palette,
        "P-transparency": reopen_png(transparent_palette, transparency=transparent_palette.info["transparency"]),
        "PA": palette.convert("PA"),
        "CMYK": rgb.convert("CMYK"),
        "1": rgb.convert("1"),
        # PNG tRNS colour keys on grayscale and truecolour images.
        "L-transparency": reopen_png(gray_key, transparency=int(np.asarray(gray_key)[0, 0])),
        "RGB-transparency": reopen_png(rgb_key, transparency=tuple(int(v) for v in np.asarray(rgb)[0, 0])),
    }


MODES = _modes()


@pytest.mark.parametrize("name", sorted(MODES))
def test_mode_conversion_matches_hf_convert_to_rgb(name):
    from transformers.image_transforms import convert_to_rgb

    image = MODES[name]
    expected = convert_to_rgb(image, return_numpy=True)
    got = to_rgb(image)
    assert got.mode == "RGB"
    assert np.array_equal(np.asarray(got), expected), name


@pytest.mark.parametrize("name", sorted(MODES))
def test_every_mode_processes_like_hf(name, hf336, crop336, pad336):
    image = MODES[name]
    got = crop336(image)
    check_tensor(got, 336)
    assert (hf_pixels(hf336, image) - got).abs().max().item() <= ATOL
    check_tensor(pad336(image), 336)


def test_transparency_goes_to_white():
    clear = Image.new("RGBA", (8, 8), (10, 200, 30, 0))
    assert np.all(np.asarray(to_rgb(clear)) == 255)
    half = Image.new("LA", (8, 8), (0, 128))
    assert np.all(np.abs(np.asarray(to_rgb(half)).astype(int) - 127) <= 1)
    key = MODES["RGB-transparency"]
    assert np.array_equal(np.asarray(to_rgb(key))[0, 0], [255, 255, 255])


def test_16_bit_grayscale_keeps_the_high_byte(crop336):
    values = (np.arange(30 * 45, dtype=np.uint32).reshape(30, 45) * 48).astype(np.uint16)
    image = Image.open(io.BytesIO(png_bytes(Image.fromarray(values))))
    assert image.mode == "I;16"
    rgb = np.asarray(load_image(image))
    assert np.array_equal(rgb, np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=-1))
    got = crop336(image)
    check_tensor(got, 336)
    assert torch.equal(got, crop336(Image.fromarray((values >> 8).astype(np.uint8), "L")))


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_modes(mode, crop336):
    values = np.linspace(-50, 400, 30 * 45).reshape(30, 45)
    image = Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32), mode)
    check_tensor(crop336(image), 336)


# --------------------------------------------------------------------------------------------------
# numpy arrays, bytes, paths


def test_numpy_uint8_arrays(crop336):
    rgb = np.asarray(random_rgb(60, 40, seed=4))
    gray = rgb[..., 0].copy()
    rgba = np.concatenate([rgb, np.linspace(0, 255, 60 * 40).reshape(40, 60, 1).astype(np.uint8)], axis=-1)

    assert torch.equal(crop336(rgb), crop336(Image.fromarray(rgb, "RGB")))
    assert torch.equal(crop336(gray), crop336(Image.fromarray(gray, "L")))
    assert torch.equal(crop336(gray[..., None]), crop336(Image.fromarray(gray, "L")))
    assert torch.equal(crop336(rgba), crop336(Image.fromarray(rgba, "RGBA")))
    for array in (rgb, gray, gray[..., None], rgba):
        check_tensor(crop336(array), 336)


def test_numpy_rgba_matches_hf_numpy_convert_to_rgb():
    from transformers.image_transforms import convert_to_rgb

    rgba = np.random.default_rng(5).integers(0, 256, (40, 60, 4), dtype=np.uint8)
    expected = convert_to_rgb(rgba, return_numpy=True)
    got = np.asarray(load_image(rgba))
    # transformers composites in float64 with np.round, Pillow in integer arithmetic: one level apart.
    assert np.abs(expected.astype(int) - got.astype(int)).max() <= 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_float_arrays_in_unit_range(dtype, crop336):
    rgb = np.asarray(random_rgb(60, 40, seed=6))
    rgba = np.concatenate([rgb, np.full((40, 60, 1), 200, np.uint8)], axis=-1)
    for u8 in (rgb, rgb[..., 0], rgb[..., :1], rgba):
        floats = (u8 / 255.0).astype(dtype)
        got = crop336(floats)
        check_tensor(got, 336)
        assert torch.equal(got, crop336(np.ascontiguousarray(u8)))


def test_numpy_float_out_of_range_is_clipped(crop336):
    floats = np.linspace(-3, 3, 40 * 60 * 3).reshape(40, 60, 3)
    check_tensor(crop336(floats), 336)


def test_non_contiguous_array(crop336):
    rgb = np.asarray(random_rgb(60, 40, seed=7))
    view = rgb.transpose(1, 0, 2)  # 60x40, not C-contiguous
    assert not view.flags["C_CONTIGUOUS"]
    assert torch.equal(crop336(view), crop336(np.ascontiguousarray(view)))


def test_bytes_path_str_and_pil_agree(tmp_path, crop336):
    image = random_rgb(90, 70, seed=8)
    data = png_bytes(image)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    expected = crop336(image)
    for source in (data, path, str(path)):
        got = crop336(source)
        check_tensor(got, 336)
        assert torch.equal(got, expected)


def test_jpeg_bytes(crop336):
    buffer = io.BytesIO()
    random_rgb(90, 70, seed=9).save(buffer, format="JPEG", quality=90)
    check_tensor(crop336(buffer.getvalue()), 336)


def test_zero_size_pil_image_is_rejected():
    with pytest.raises(ImageError, match="no pixels"):
        load_image(Image.new("RGB", (0, 0)))


# --------------------------------------------------------------------------------------------------
# Bad input: ImageError with a message that says what is wrong and which input


def test_missing_file(tmp_path, crop336):
    path = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="not found") as info:
        crop336(path)
    assert str(path) in str(info.value)


def test_directory(tmp_path, crop336):
    with pytest.raises(ImageError, match="directory") as info:
        crop336(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_text_file_named_png(tmp_path, crop336):
    path = tmp_path / "x.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not an image") as info:
        crop336(path)
    assert "x.png" in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="not an image"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_truncated_file(tmp_path, fmt):
    buffer = io.BytesIO()
    random_rgb(96, 64, seed=10).save(buffer, format=fmt)
    data = buffer.getvalue()
    path = tmp_path / f"half.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cannot decode") as info:
        load_image(path)
    assert "half." in str(info.value)
    with pytest.raises(ImageError):
        load_image(data[: len(data) // 2])


def test_pillow_truncation_switch_is_left_alone():
    """With Pillow's global LOAD_TRUNCATED_IMAGES a half file decodes silently (grey-filled), so
    truncated-file detection depends on nothing having switched it on."""
    from PIL import ImageFile

    import edge_mllm.pipeline  # noqa: F401  (everything the CLI imports)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((0, 0, 3), np.uint8),
        np.zeros((0, 10), np.uint8),
        np.zeros((10, 0, 1), np.uint8),
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((4, 4, 5), np.uint8),
        np.zeros((4,), np.uint8),
        np.zeros((2, 4, 4, 3), np.uint8),
        np.array(3),
    ],
    ids=["empty-hwc", "empty-hw", "empty-hw1", "2-channels", "5-channels", "1d", "4d", "0d"],
)
def test_bad_arrays(array, crop336):
    with pytest.raises(ImageError, match=r"array of shape .* \(expected HxW or HxWx\{1,3,4\}\)"):
        crop336(array)


@pytest.mark.parametrize("value", [3, 2.5, None, [1, 2, 3], {"a": 1}, torch.zeros(3, 8, 8)])
def test_unsupported_types(value, crop336):
    with pytest.raises(ImageError, match="unsupported image type"):
        crop336(value)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_is_an_image_error():
    # 40000 x 40000 px claimed by the header: over Pillow's 2 x MAX_IMAGE_PIXELS limit.
    with pytest.raises(ImageError, match="too large"):
        load_image(_png_header_only(40000, 40000))


def test_images_between_pils_warning_and_error_sizes_decode_quietly(recwarn):
    # 10000 x 9000 px: past Pillow's DecompressionBombWarning size, under its error size
    buffer = io.BytesIO()
    Image.new("L", (10000, 9000), 7).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).size == (10000, 9000)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored landscape with "rotate 90° clockwise" (Orientation 6) is read upright,
    as transformers' load_image reads it, from a path, bytes or an opened PIL image (left as it is)."""
    from transformers.image_utils import load_image as hf_load_image

    stored = Image.new("RGB", (100, 50), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # a red mark at the stored image's top left
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    stored.save(path, exif=exif, quality=95)
    ours = load_image(path)
    assert ours.size == (50, 100) == hf_load_image(str(path)).size
    assert ours.getpixel((45, 5))[0] > 200  # the mark, turned to the top right
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), np.asarray(ours))
    opened = Image.open(path)
    assert load_image(opened).size == (50, 100) and opened.size == (100, 50)


def test_errors_are_edge_mllm_errors():
    from edge_mllm.errors import EdgeMLLMError

    assert issubclass(ImageError, EdgeMLLMError)


# --------------------------------------------------------------------------------------------------
# Size extremes


def test_huge_image(crop336, pad336):
    image = Image.new("RGB", (8000, 6000), (200, 100, 50))
    image.paste((0, 0, 0), (3000, 2000, 5000, 4000))  # a black block in the middle
    stats = list(zip(CLIP_MEAN, CLIP_STD, strict=True))
    expected_corner = torch.tensor([(c / 255 - m) / s for c, (m, s) in zip((200, 100, 50), stats, strict=True)])
    expected_centre = torch.tensor([(0 - m) / s for m, s in stats])
    for processor in (crop336, pad336):
        got = processor(image)
        check_tensor(got, 336)
        assert torch.allclose(got[:, 168, 168], expected_centre, atol=1e-5)
    got = crop336(image)
    assert torch.allclose(got[:, 0, 0], expected_corner, atol=1e-5)


def test_huge_image_from_jpeg_bytes(crop336):
    buffer = io.BytesIO()
    Image.new("RGB", (8000, 6000), (30, 60, 90)).save(buffer, format="JPEG", quality=75)
    check_tensor(crop336(buffer.getvalue()), 336)


# Crop mode resizes the short side up to 336 first (as transformers does), so a 1-px-wide image
# becomes 336 x 336*height: keep the long side modest.
@pytest.mark.parametrize("wh", [(1, 40), (40, 1), (2, 3)])
def test_extreme_aspect_ratios(wh, hf336, crop336, pad336):
    image = random_rgb(*wh, seed=11)
    got = crop336(image)
    check_tensor(got, 336)
    assert (hf_pixels(hf336, image) - got).abs().max().item() <= ATOL
    check_tensor(pad336(image), 336)
    assert (hf_pixels(hf336, expand2square(image, (122, 116, 104))) - pad336(image)).abs().max().item() <= ATOL


def test_processor_is_deterministic(tmp_path, pad336):
    path = Path(tmp_path) / "a.png"
    path.write_bytes(png_bytes(random_rgb(123, 77, seed=12)))
    assert torch.equal(pad336(path), pad336(path))
