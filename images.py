"""Reading image files: any file PIL opens -> an RGB PIL image, or an ImageError naming the file.

EXIF rotation is applied, transparency composited on white, and 16-bit, 32-bit and float grey levels scaled to 8
bits by their real range. vision.py's `preprocess` turns the image into an encoder's input.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be used; the message names the file."""


def to_8_bits(image):
    """A grey image of 16- or 32-bit integers or floats -> 8 bits ("L") by its real range, where PIL's convert would
    clip it (a 16-bit PNG turns white, a float TIFF black): integers from the smallest of the 8-, 16- and 32-bit
    ranges that holds them, floats from [0, 1] when they lie in it, else from their own minimum and maximum."""
    x = np.asarray(image, dtype=np.float64)
    low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if image.mode == "F":
        low, top = (0.0, 1.0) if 0.0 <= low and high <= 1.0 else (low, high)
    else:
        low, top = 0.0, next((2.0 ** b - 1 for b in (8, 16, 32) if high <= 2.0 ** b - 1), high)
    scaled = (x - low) / max(top - low, 1e-12) * 255.0
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8))  # mode "L"


def load_image(image):
    """A file path or a PIL image -> an RGB PIL image, EXIF rotation applied, transparency composited on white."""
    name = "<PIL image>"
    if not isinstance(image, Image.Image):
        name = str(image)
        if Path(image).is_dir():
            raise ImageError(f"{name} is a folder, not an image file")
        if not Path(image).is_file():
            raise ImageError(f"image not found: {name}")
        try:
            with Image.open(image) as f:
                f.load()  # decode now, so that a truncated file fails here, naming the file
                image = f.copy()  # keeps .info (EXIF, transparency)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"cannot read image {name}: {e}") from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not lose the image
        pass
    if image.mode.startswith(("I", "F")):  # 16- and 32-bit integer, and float, grey levels
        image = to_8_bits(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")
