"""Image transforms: decoding and CLIP's preprocessing (docs/method.md §1).

The eval transform reproduces OpenAI/open_clip preprocessing on PIL images:
bicubic resize of the short side, center crop, [0, 1] scaling, normalisation
with CLIP's mean/std. Output is HWC float32 (JAX's layout). The train pipeline
stops before the normalisation (HWC uint8: `clip_eval_crop`, or the random
resized crop as an image) and the train step normalises on the device with the
same bits (fixclip_jax/pixels.py).
"""
import io
import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from fixclip_jax import pixels

CLIP_MEAN = pixels.CLIP_MEAN
CLIP_STD = pixels.CLIP_STD

# What PIL raises for bytes it cannot decode (truncated, corrupt, unknown
# format, too many pixels): callers that skip bad images catch these.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# PIL's modes of one 16-bit (or 32-bit integer) channel: PNG 16-bit grayscale
# opens as "I;16". PIL's convert("RGB") clips them at 255 (a 16-bit image
# turns almost all white), so to_rgb keeps their high byte instead.
WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
  """An RGB image; 16-bit grayscale scaled to 8 bits by its high byte.

  v >> 8 is libpng's png_set_strip_16 and what PIL itself does with 16-bit
  RGB(A) PNGs (they open as 8-bit RGB(A)), so both kinds of 16-bit image
  get the same 8-bit values. Mode "I" (32-bit) is taken as 16-bit data (what
  older PIL opened 16-bit PNGs as), clipped to [0, 65535] first.
  """
  if img.mode in WIDE_GRAY_MODES:
    wide = np.asarray(img).astype(np.int64)  # [H, W]
    img = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L")
  return img.convert("RGB")


def decode_image(data: Union[bytes, str]) -> Image.Image:
  """Decodes encoded image bytes (or opens a path) into an RGB PIL image."""
  img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
  img.load()
  return to_rgb(img)


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
  """uint8 HWC (or PIL) -> float32 HWC normalised with CLIP's mean/std.

  (x / 255 - mean) / std in float32: pixels.normalize_formula, bit for bit,
  and so the device-side pixels.normalize_uint8 too. For HxWx3 input the ops
  run in place on an [H, W*3] view against mean/std tiled W times: the same
  operations on the same values (bit-identical), ~10x faster than numpy
  broadcasting a 3-long channel axis, whose inner loops are 3 elements long
  (and than the table lookup).
  """
  x = np.array(img, dtype=np.float32)  # a fresh C-contiguous copy
  mean = np.asarray(CLIP_MEAN, np.float32)
  std = np.asarray(CLIP_STD, np.float32)
  if x.ndim != 3 or x.shape[-1] != 3:
    return (x / 255.0 - mean) / std
  height, width, _ = x.shape
  rows = x.reshape(height, width * 3)  # a view: the ops below fill x
  rows /= np.float32(255.0)
  rows -= np.tile(mean, width)
  rows /= np.tile(std, width)
  return x


def clip_eval_crop(img: Image.Image, image_size: int) -> np.ndarray:
  """CLIP's resize + centre crop, not normalised: [S, S, 3] uint8."""
  img = to_rgb(img)
  return np.asarray(center_crop(resize_short_side(img, image_size), image_size),
                    np.uint8)


def clip_eval_transform(img: Image.Image, image_size: int) -> np.ndarray:
  """CLIP's standard preprocessing: [image_size, image_size, 3] float32."""
  return normalize_pixels(clip_eval_crop(img, image_size))


# ---------------------------------------------------------------------------
# Train transforms. Long-CLIP trains without augmentation (docs/method.md §2), so
# the default is the eval transform; random-resized-crop is an option. The
# randomness comes from a numpy Generator the caller seeds per example, so a
# restored data iterator reproduces the same crops.
# ---------------------------------------------------------------------------
TRAIN_TRANSFORMS = ("resize_center_crop", "random_resized_crop")


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3)
                            ) -> Tuple[int, int, int, int]:
  """A (left, top, w, h) box: torchvision RandomResizedCrop.get_params' rule.

  Up to 10 tries of an area share in `scale` and a log-uniform aspect ratio in
  `ratio`; if none fits, the largest centred box with a ratio inside `ratio`.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)
                        ) -> Image.Image:
  """Random box (see random_resized_crop_box), bicubic-resized to size x size."""
  left, top, w, h = random_resized_crop_box(*img.size, rng, scale, ratio)
  return img.resize((size, size), Image.BICUBIC,
                    box=(left, top, left + w, top + h))


def jpeg_draft_factor(box_w: int, box_h: int, size: int) -> int:
  """The largest DCT reduction (8, 4, 2 or 1) keeping a box_w x box_h crop at
  least `size` pixels on its short side, so the crop is still downscaled."""
  for factor in (8, 4, 2):
    if min(box_w, box_h) >= factor * size:
      return factor
  return 1


def decode_random_resized_crop(data: bytes, size: int,
                               rng: np.random.Generator,
                               scale: Sequence[float] = (0.08, 1.0),
                               ratio: Sequence[float] = (3 / 4, 4 / 3),
                               draft: bool = True) -> Image.Image:
  """Encoded bytes -> random_resized_crop(decode_image(data), ...), faster.

  The box is drawn from the full image size, exactly as random_resized_crop
  draws it (same rng use). With `draft`, a JPEG is decoded at 1/2, 1/4 or 1/8
  scale (libjpeg's DCT scaling, PIL's Image.draft) when the box still has at
  least `size` pixels on its short side at that scale, and the box is mapped
  into the smaller image. Most of both the decode and the bicubic resize
  (whose cost grows with the box) is saved; pixels differ slightly from the
  full-size path (a DCT-domain downscale before the bicubic one), which is
  fine for an augmentation. Other formats, and draft=False, give exactly
  random_resized_crop(decode_image(data), ...). Train only: the eval
  transform always decodes at full size (CLIP's exact preprocessing).
  """
  img = Image.open(io.BytesIO(data))
  width, height = img.size
  left, top, w, h = random_resized_crop_box(width, height, rng, scale, ratio)
  reduction = 1.0
  factor = jpeg_draft_factor(w, h, size) if draft else 1
  if factor > 1 and img.format == "JPEG":
    # Asking for size // factor makes PIL pick exactly `factor`; the box it
    # returns is the full image's extent in reduced pixels.
    drafted = img.draft("RGB", (width // factor, height // factor))
    if drafted is not None:
      reduction = width / drafted[1][2]
  img.load()
  img = to_rgb(img)
  box = (left / reduction, top / reduction, (left + w) / reduction,
         (top + h) / reduction)
  return img.resize((size, size), Image.BICUBIC, box=box)


def clip_train_transform(img: Image.Image, image_size: int,
                         rng: Optional[np.random.Generator] = None, *,
                         kind: str = "resize_center_crop",
                         scale: Sequence[float] = (0.9, 1.0),
                         ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Train preprocessing: [image_size, image_size, 3] float32, CLIP-normalised.

  kind="resize_center_crop": exactly clip_eval_transform (Long-CLIP's recipe,
  no randomness); kind="random_resized_crop": needs `rng`.
  """
  if kind == "resize_center_crop":
    return clip_eval_transform(img, image_size)
  if kind == "random_resized_crop":
    if rng is None:
      raise ValueError("random_resized_crop needs a numpy Generator `rng`")
    img = to_rgb(img)
    return normalize_pixels(random_resized_crop(img, image_size, rng, scale, ratio))
  raise ValueError(f"Unknown train transform {kind!r}; known: {TRAIN_TRANSFORMS}")
