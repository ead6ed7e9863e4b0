"""Tests for the train transforms in fixclip_jax.data.transforms."""
import io

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from fixclip_jax import pixels
from fixclip_jax.data import transforms


def _noise_image(w, h, seed=0):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


class RandomResizedCropTest(parameterized.TestCase):

  @parameterized.parameters((100, 60), (60, 100), (50, 50))
  def test_box_inside_image_and_area_in_range(self, w, h):
    rng = np.random.default_rng(0)
    for _ in range(200):
      left, top, bw, bh = transforms.random_resized_crop_box(
          w, h, rng, scale=(0.3, 0.9), ratio=(3 / 4, 4 / 3))
      self.assertGreaterEqual(left, 0)
      self.assertGreaterEqual(top, 0)
      self.assertLessEqual(left + bw, w)
      self.assertLessEqual(top + bh, h)
      # Rounding of w and h moves the area by at most ~ (w + h) pixels.
      self.assertBetween(bw * bh / (w * h), 0.3 - 0.05, 0.9 + 0.05)

  def test_fallback_matches_torchvision(self):
    # scale=(1, 1) cannot fit a 3/4..4/3 box in a 100x60 image: both fall back
    # to the centred, widest allowed box (deterministic, so comparable).
    from torchvision.transforms import RandomResizedCrop  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    for w, h in ((100, 60), (60, 100)):
      top, left, th, tw = RandomResizedCrop.get_params(
          torch.zeros(3, h, w), scale=(1.0, 1.0), ratio=(3 / 4, 4 / 3))
      ours = transforms.random_resized_crop_box(
          w, h, np.random.default_rng(0), scale=(1.0, 1.0),
          ratio=(3 / 4, 4 / 3))
      self.assertEqual(ours, (left, top, tw, th))

  def test_same_seed_same_crop(self):
    img = _noise_image(80, 64)
    a = transforms.clip_train_transform(
        img, 32, np.random.default_rng([3, 1]), kind="random_resized_crop",
        scale=(0.2, 1.0))
    b = transforms.clip_train_transform(
        img, 32, np.random.default_rng([3, 1]), kind="random_resized_crop",
        scale=(0.2, 1.0))
    c = transforms.clip_train_transform(
        img, 32, np.random.default_rng([3, 2]), kind="random_resized_crop",
        scale=(0.2, 1.0))
    self.assertEqual(a.shape, (32, 32, 3))
    self.assertEqual(a.dtype, np.float32)
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(a, c))

  def test_full_square_crop_is_bicubic_resize(self):
    img = _noise_image(48, 48)
    out = transforms.clip_train_transform(
        img, 24, np.random.default_rng(0), kind="random_resized_crop",
        scale=(1.0, 1.0), ratio=(1.0, 1.0))
    ref = np.asarray(img.resize((24, 24), Image.BICUBIC), np.float32) / 255.0
    ref = (ref - np.array(transforms.CLIP_MEAN)) / np.array(transforms.CLIP_STD)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def _encoded(img, fmt, **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _smooth_image(size, seed=0):
  """A smooth photo-like gradient with mild noise (JPEG-friendly)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:size, 0:size] / size
  rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], -1) * 220 + 20
  rgb += rng.normal(0, 4, rgb.shape)
  return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


class DecodeRandomResizedCropTest(parameterized.TestCase):

  def test_draft_factor(self):
    self.assertEqual(transforms.jpeg_draft_factor(500, 480, 224), 2)
    self.assertEqual(transforms.jpeg_draft_factor(447, 900, 224), 1)
    self.assertEqual(transforms.jpeg_draft_factor(1800, 1792, 224), 8)
    self.assertEqual(transforms.jpeg_draft_factor(900, 1000, 224), 4)

  @parameterized.parameters(("PNG", True), ("JPEG", False))
  def test_exactly_random_resized_crop_without_draft(self, fmt, draft):
    data = _encoded(_smooth_image(160), fmt)
    got = transforms.decode_random_resized_crop(
        data, 32, np.random.default_rng(7), (0.5, 1.0), draft=draft)
    want = transforms.random_resized_crop(
        transforms.decode_image(data), 32, np.random.default_rng(7),
        (0.5, 1.0))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  def test_jpeg_draft_is_close_and_used(self):
    data = _encoded(_smooth_image(512), "JPEG", quality=90)
    for seed in range(4):
      rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
      got = np.asarray(transforms.decode_random_resized_crop(
          data, 96, rng_a, (0.9, 1.0)), np.float32)
      want = np.asarray(transforms.random_resized_crop(
          transforms.decode_image(data), 96, rng_b, (0.9, 1.0)), np.float32)
      # Same box (the rngs were used alike), decoded at 1/4 scale: a little
      # different (so the draft path ran), close on average.
      self.assertEqual(rng_a.integers(1 << 30), rng_b.integers(1 << 30))
      self.assertGreater(np.abs(got - want).max(), 0)
      self.assertLess(np.abs(got - want).mean(), 2.0)

  def test_grayscale_jpeg_comes_out_rgb(self):
    data = _encoded(_smooth_image(256).convert("L"), "JPEG")
    out = transforms.decode_random_resized_crop(
        data, 32, np.random.default_rng(0), (0.9, 1.0))
    self.assertEqual((out.mode, out.size), ("RGB", (32, 32)))

  def test_truncated_jpeg_raises(self):
    data = _encoded(_smooth_image(256), "JPEG")
    with self.assertRaises(OSError):
      transforms.decode_random_resized_crop(
          data[:len(data) // 2], 32, np.random.default_rng(0))


class NormalizeAndEvalTransformTest(absltest.TestCase):

  def test_normalize_is_the_broadcast_formula_bit_for_bit(self):
    rng = np.random.default_rng(0)
    mean = np.asarray(transforms.CLIP_MEAN, np.float32)
    std = np.asarray(transforms.CLIP_STD, np.float32)
    for shape in ((224, 224, 3), (7, 5, 3), (1, 1, 3)):
      pixels = rng.integers(0, 256, shape, dtype=np.uint8)
      want = (pixels.astype(np.float32) / np.float32(255) - mean) / std
      for given in (pixels, Image.fromarray(pixels)):
        got = transforms.normalize_pixels(given)
        self.assertEqual(got.dtype, np.float32)
        np.testing.assert_array_equal(got, want)
    floats = rng.random((4, 4, 3)).astype(np.float32)
    copy = floats.copy()
    transforms.normalize_pixels(floats)
    np.testing.assert_array_equal(floats, copy)  # input left alone

  def test_eval_transform_equals_open_clip_preprocess(self):
    from open_clip.transform import image_transform  # pylint: disable=g-import-not-at-top
    preprocess = image_transform(32, is_train=False)  # PyTorch/torchvision
    for w, h in ((90, 70), (48, 120), (32, 32)):
      img = _noise_image(w, h, seed=w)
      want = preprocess(img).permute(1, 2, 0).numpy()
      np.testing.assert_allclose(transforms.clip_eval_transform(img, 32), want,
                                 rtol=0, atol=1e-6)


class DeviceNormalisationTest(absltest.TestCase):
  """uint8 pixels normalised in the step (jnp) = the eval transform, bit for bit."""

  def test_table_is_the_formula_at_every_value(self):
    every = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)  # [256, 3]
    np.testing.assert_array_equal(pixels.NORMALIZE_TABLE,
                                  pixels.normalize_formula(every))
    # The host's in-place normalize_pixels is the same formula, every value.
    np.testing.assert_array_equal(transforms.normalize_pixels(every[None]),
                                  pixels.NORMALIZE_TABLE[None])

  def test_jitted_jnp_equals_eval_transform(self):
    device = jax.jit(lambda x: pixels.normalize_uint8(x, jnp))
    every = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    np.testing.assert_array_equal(np.asarray(device(every[None])),
                                  transforms.normalize_pixels(every[None]))
    for w, h in ((90, 70), (48, 120)):
      img = _noise_image(w, h, seed=w)
      crop = transforms.clip_eval_crop(img, 32)
      self.assertEqual((crop.dtype, crop.shape), (np.uint8, (32, 32, 3)))
      batch = np.stack([crop, crop[::-1]])                           # [2, 32, 32, 3]
      got = np.asarray(jax.jit(lambda x: pixels.model_input(x, jnp))(batch))
      self.assertEqual(got.dtype, np.float32)
      np.testing.assert_array_equal(got[0], transforms.clip_eval_transform(img, 32))
      np.testing.assert_array_equal(got[1], transforms.normalize_pixels(crop[::-1]))

  def test_float_input_is_taken_as_normalised(self):
    x = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    self.assertIs(pixels.model_input(x), x)
    with self.assertRaisesRegex(TypeError, "uint8"):
      pixels.normalize_uint8(x)
    with self.assertRaisesRegex(ValueError, "RGB"):
      pixels.normalize_uint8(np.zeros((4, 4, 1), np.uint8))


class TrainTransformTest(absltest.TestCase):

  def test_resize_center_crop_is_eval_transform(self):
    img = _noise_image(90, 70)
    np.testing.assert_array_equal(
        transforms.clip_train_transform(img, 32),
        transforms.clip_eval_transform(img, 32))

  def test_errors(self):
    img = _noise_image(40, 40)
    with self.assertRaisesRegex(ValueError, "rng"):
      transforms.clip_train_transform(img, 32, kind="random_resized_crop")
    with self.assertRaisesRegex(ValueError, "Unknown train transform"):
      transforms.clip_train_transform(img, 32, kind="flip")


if __name__ == "__main__":
  absltest.main()
