"""Image transforms: decoding and CLIP's preprocessing (method.md §1).

The eval transform reproduces OpenAI/open_clip preprocessing on PIL images:
bicubic resize of the short side, center crop, [0, 1] scaling, normalisation
with CLIP's mean/std. Output is HWC float32 (JAX's layout).
"""
import io
from typing import Union

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def decode_image(data: Union[bytes, str]) -> Image.Image:
  """Decodes encoded image bytes (or opens a path) into an RGB PIL image."""
  img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
  img.load()
  return img.convert("RGB")


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
  """Bicubic resize so the short side is `size` (torchvision Resize(int) rule)."""
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  if short == size:
    return img
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  return img.resize((new_w, new_h), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
  """Center crop to size x size (torchvision CenterCrop rounding)."""
  w, h = img.size
  if w < size or h < size:  # torchvision pads; a resized image never needs it
    raise ValueError(f"Image {w}x{h} is smaller than the crop {size}")
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def normalize_pixels(img: Union[Image.Image, np.ndarray]) -> np.ndarray:
  """uint8 HWC (or PIL) -> float32 HWC normalised with CLIP's mean/std."""
  x = np.asarray(img, dtype=np.float32) / 255.0
  return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def clip_eval_transform(img: Image.Image, image_size: int) -> np.ndarray:
  """CLIP's standard preprocessing: [image_size, image_size, 3] float32."""
  img = img.convert("RGB")
  return normalize_pixels(center_crop(resize_short_side(img, image_size), image_size))
