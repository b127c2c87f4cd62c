"""Image preprocessing equivalent to Hugging Face's ``CLIPImageProcessor`` (shortest-side bicubic
resize, center crop, rescale, normalise), plus LLaVA/MobileVLM's "pad to square with the mean colour".

Any image from 1×1 up is accepted, from a path, bytes, PIL image or numpy array, in any PIL mode.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from edge_mllm.errors import ImageError

ImageInput = str | Path | bytes | Image.Image | np.ndarray
EXIF_ORIENTATION = 0x0112  # camera rotation tag: 1 upright, 3/6/8 rotated, 2/4/5/7 mirrored

# What a vision graph takes (an exported bundle's ``image_preprocessing.vision_input``), [N, 3, S, S]:
NORMALIZED = "normalized_float32"  # (x / 255 − mean) / std: the reference (unfused) encoder
RGB_FLOAT = "rgb_float32"  # x / 255, RGB in [0, 1]: normalisation folded into the graph
RGB_UINT8 = "rgb_uint8"  # x itself, RGB 0–255: rescale and normalisation in the graph
VISION_INPUTS = (NORMALIZED, RGB_FLOAT, RGB_UINT8)


def _from_array(array: np.ndarray) -> Image.Image:
    """HW, HWC (C = 1, 3, 4) uint8 arrays, or float arrays in [0, 1]."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape:
        raise ImageError(f"cannot use an array of shape {array.shape} as an image (expected HxW or HxWx{{1,3,4}})")
    if np.issubdtype(array.dtype, np.floating):
        array = np.rint(np.clip(array, 0.0, 1.0) * 255.0)
    return Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))


def _decode_failure(exc: BaseException) -> str:
    """Why PIL or the OS could not read an image, in one phrase (the errors ``_open`` and
    ``image_problem`` catch)."""
    if isinstance(exc, FileNotFoundError):
        return "image not found"
    if isinstance(exc, IsADirectoryError):
        return "image path is a directory"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file (unrecognised format)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"image is too large to decode safely ({exc})"
    return f"cannot decode image ({exc})"


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _rotated(image: Image.Image) -> bool:
    return image.getexif().get(EXIF_ORIENTATION, 1) != 1


def _open(source: str | Path | bytes) -> Image.Image:
    """Decode a file or bytes, upright: a camera's EXIF orientation is applied (phone photos are stored
    sideways with a rotate tag), as transformers' ``load_image`` does."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            # images past PIL's warning size (89 M pixels) but under its error size are fine: they are
            # resized; the error size still refuses decompression bombs
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            image.load()
        if _rotated(image):
            ImageOps.exif_transpose(image, in_place=True)
        return image
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{_decode_failure(exc)}: {name}") from exc


def image_problem(path: str | Path) -> str | None:
    """Why ``path`` is not an image this module can read, from its header alone (fast enough to check
    every image of a data set before a long run; a file cut short after its header still fails where
    it is decoded), or None."""
    try:
        with Image.open(path):
            return None
    except _DECODE_ERRORS as exc:
        return _decode_failure(exc)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB. Transparency is composited over white (as transformers' ``convert_rgb``)."""
    if image.mode in ("1", "L", "P", "RGB") and image.info.get("transparency") is not None:
        image = image.convert("RGBA")  # a transparent colour key (PNG tRNS) becomes an alpha channel
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte
        return Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def load_image(image: ImageInput) -> Image.Image:
    """Read an image from a path, bytes, PIL image or numpy array, as RGB, upright (EXIF orientation
    applied, as transformers' ``load_image``; a PIL image given is not modified)."""
    if isinstance(image, Image.Image):
        pil = ImageOps.exif_transpose(image) if _rotated(image) else image
    elif isinstance(image, np.ndarray):
        pil = _from_array(image)
    elif isinstance(image, (str, Path, bytes)):
        pil = _open(image)
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}")
    if pil.width < 1 or pil.height < 1:
        raise ImageError("image has no pixels")
    return to_rgb(pil)


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: pad the short side symmetrically with ``fill``."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


@dataclass(frozen=True)
class ImageProcessor:
    """Turns any image into the normalised [3, size, size] float tensor the vision encoder takes."""

    size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    aspect: str = "pad"  # "pad": LLaVA/MobileVLM square padding first; "crop": CLIP's center crop only

    @property
    def fill_color(self) -> tuple[int, int, int]:
        return tuple(int(m * 255) for m in self.image_mean)

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        """Shortest side to ``size`` (bicubic), then a centered ``size``×``size`` crop."""
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(self.size * long / short)  # HF's get_resize_output_image_size truncates too
        new_w, new_h = (self.size, new_long) if w <= h else (new_long, self.size)
        image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC, reducing_gap=None)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def rgb(self, image: ImageInput) -> torch.Tensor:
        """The image resized, cropped (and padded) but not rescaled: uint8 RGB [3, size, size], what a
        fused vision graph takes (``edge_mllm.model.fused_vision``)."""
        rgb = load_image(image)
        if self.aspect == "pad":
            rgb = expand_to_square(rgb, self.fill_color)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(self.resize_and_crop(rgb)).transpose(2, 0, 1)))

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """uint8 RGB [..., 3, H, W] → ``(x / 255 − mean) / std`` float32 (CLIPImageProcessor's rescale + normalise)."""
        pixels = rgb.to(torch.float32) * np.float32(1 / 255)
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(-1, 1, 1)
        return (pixels - mean) / torch.tensor(self.image_std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: ImageInput) -> torch.Tensor:
        return self.normalize(self.rgb(image))

    def vision_input(self, image: ImageInput, kind: str) -> torch.Tensor:
        """An image as a vision graph taking ``kind`` (one of ``VISION_INPUTS``) reads it: [3, size, size]."""
        rgb = self.rgb(image)
        if kind == RGB_UINT8:
            return rgb
        return rgb.to(torch.float32) * np.float32(1 / 255) if kind == RGB_FLOAT else self.normalize(rgb)

    def from_normalized(self, pixels: torch.Tensor, kind: str) -> torch.Tensor:
        """Normalised pixels [..., 3, H, W] (what ``__call__`` gives) → the same image as ``kind`` reads it.
        To uint8 the values are rounded: exact for pixels this processor made."""
        pixels = torch.as_tensor(pixels, dtype=torch.float32)
        if kind == NORMALIZED:
            return pixels
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(-1, 1, 1)
        rgb = pixels * torch.tensor(self.image_std, dtype=torch.float32).view(-1, 1, 1) + mean
        if kind == RGB_FLOAT:
            return rgb
        if kind == RGB_UINT8:
            return torch.round(rgb * 255).clamp(0, 255).to(torch.uint8)
        raise ValueError(f"unknown vision input {kind!r}; one of {', '.join(VISION_INPUTS)}")
