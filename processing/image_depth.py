"""`to_eight_bit`: 16-bit images to 8 bits by scaling, before anything converts them to RGB.

PIL's `convert("RGB")` (and so the CLIP image processor's `do_convert_rgb`) clips a 16-bit grey image (`I;16`,
which is how Pillow opens a 16-bit grey PNG, or `I`) to 0..255: a picture spread over 0..65535 keeps only its
darkest levels and becomes nearly white. The image processors also take uint16 arrays for 8-bit ones. Scaling by
`255 / 65535 = 1 / 257` keeps every grey level the 8-bit range can hold.

Two inputs say nothing of their range, so it is read from the values:
- PIL mode `I` (32-bit integers: some readers give it for 16-bit files, others for 8-bit ones): values all in
  0..255 are an 8-bit picture and kept as they are; otherwise 16-bit, scaled as above (values outside 0..65535
  are clipped, with a warning).
- A float array or tensor whose values all lie in [0, 1] is a picture already scaled to [0, 1]: it is multiplied
  by 255, so that the image processor's own rescaling (1 / 255) reads it as its 8-bit twin, not as nearly
  black. Float values above 1 are taken as 0..255, as the image processors do.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# Pillow's 16-bit grey modes; `I` (32-bit integers) is what some readers give for 16-bit files, read as 16-bit here
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SCALE = 257  # 65535 / 255


def _scaled(values: np.ndarray) -> np.ndarray:
    """16-bit values (any integer dtype) -> uint8, value / 257 rounded; clipped to 0..65535 first."""
    return np.rint(np.clip(values.astype(np.float64), 0, 65535) / _SCALE).astype(np.uint8)


def _unit_range(values) -> bool:
    """True for a floating array/tensor with every value in [0, 1] (and at least one value)."""
    if isinstance(values, np.ndarray):
        return (
            values.dtype.kind == "f"
            and values.size > 0
            and float(values.min()) >= 0
            and float(values.max()) <= 1
        )
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    if isinstance(values, torch.Tensor):
        return (
            values.is_floating_point()
            and values.numel() > 0
            and bool((values >= 0).all() & (values <= 1).all())
        )
    return False


def to_eight_bit(image):
    """A 16-bit image as an 8-bit one (PIL `L` image, or a uint8 array of the same shape), a float image in [0, 1]
    as one in [0, 255] (same type), a mode-`I` image read from its values (see the module docstring); anything
    else (8-bit and colour PIL images, uint8 arrays, float images in 0..255) is returned as it is."""
    if isinstance(image, Image.Image):
        if image.mode not in SIXTEEN_BIT_MODES:
            return image
        values = np.asarray(image)
        if image.mode == "I":
            if values.size and values.min() >= 0 and values.max() <= 255:
                return Image.fromarray(values.astype(np.uint8))  # an 8-bit picture stored as 32-bit integers
            if values.size and (values.min() < 0 or values.max() > 65535):
                logger.warning(
                    "a mode-I image holds values in %d..%d, outside 16 bits: clipped to 0..65535 and scaled to 8 bits",
                    int(values.min()),
                    int(values.max()),
                )
        return Image.fromarray(_scaled(values))  # (height, width) uint8 -> mode L
    if isinstance(image, np.ndarray) and image.dtype == np.uint16:
        return _scaled(image)
    if _unit_range(image):
        return image * 255  # the processor's rescaling (1 / 255) then gives back [0, 1]
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
