"""`to_eight_bit`: 16-bit images to 8 bits by scaling, before anything converts them to RGB.

PIL's `convert("RGB")` (and so the CLIP image processor's `do_convert_rgb`) clips a 16-bit grey image (`I;16`,
which is how Pillow opens a 16-bit grey PNG, or `I`) to 0..255: a picture spread over 0..65535 keeps only its
darkest levels and becomes nearly white. The image processors also take uint16 arrays for 8-bit ones. Scaling by
`255 / 65535 = 1 / 257` keeps every grey level the 8-bit range can hold.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Pillow's 16-bit grey modes; `I` (32-bit integers) is what some readers give for 16-bit files, read as 16-bit here
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SCALE = 257  # 65535 / 255


def _scaled(values: np.ndarray) -> np.ndarray:
    """16-bit values (any integer dtype) -> uint8, value / 257 rounded; clipped to 0..65535 first."""
    return np.rint(np.clip(values.astype(np.float64), 0, 65535) / _SCALE).astype(np.uint8)


def to_eight_bit(image):
    """A 16-bit image as an 8-bit one (PIL `L` image, or a uint8 array of the same shape); anything else (8-bit
    and colour PIL images, uint8 and float arrays, tensors) is returned as it is."""
    if isinstance(image, Image.Image):
        if image.mode not in SIXTEEN_BIT_MODES:
            return image
        return Image.fromarray(_scaled(np.asarray(image)))  # (height, width) uint8 -> mode L
    if isinstance(image, np.ndarray) and image.dtype == np.uint16:
        return _scaled(image)
    return image


def images_to_eight_bit(images):
    """`to_eight_bit` on an image or on every image of a (nested) list or tuple of them."""
    if isinstance(images, (list, tuple)):
        return type(images)(images_to_eight_bit(item) for item in images)
    return to_eight_bit(images)


def to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image as RGB, 16-bit grey images scaled to 8 bits first (instead of clipped)."""
    return to_eight_bit(image).convert("RGB")


__all__ = ["SIXTEEN_BIT_MODES", "images_to_eight_bit", "to_eight_bit", "to_rgb"]
