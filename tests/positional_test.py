"""Tests for Long-CLIP's knowledge-preserved stretching (method.md §2)."""
from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np

from fixclip_jax.models import positional


def _stretch_by_rule(old, keep, factor):
  """method.md §2 read literally, one row at a time."""
  length = old.shape[0]
  rows = [old[i] for i in range(keep)]
  for i in range(length - keep - 1):
    for k in range(factor):
      rows.append((1 - k / factor) * old[keep + i] + (k / factor) * old[keep + i + 1])
  for j in range(factor):
    rows.append(old[length - 1] + j * (old[length - 1] - old[length - 2]) / factor)
  return np.stack(rows)


class StretchTest(parameterized.TestCase):

  def test_clip_to_longclip_length(self):
    self.assertEqual(positional.stretched_length(77), 248)
    pe = np.random.default_rng(0).normal(size=(77, 16)).astype(np.float32)
    out = positional.stretch_positional_embedding(pe)
    self.assertEqual(out.shape, (248, 16))
    np.testing.assert_array_equal(out[:20], pe[:20])
    # Row 20 + 4i is the original row 20 + i.
    np.testing.assert_allclose(out[20:244:4], pe[20:76], rtol=1e-6)
    # The last four rows extrapolate beyond row 76.
    np.testing.assert_allclose(out[244], pe[76], rtol=1e-6)
    np.testing.assert_allclose(out[247], pe[76] + 0.75 * (pe[76] - pe[75]),
                               rtol=1e-5, atol=1e-6)

  @parameterized.parameters((77, 20, 4), (77, 0, 2), (10, 3, 3), (5, 3, 1), (30, 8, 5))
  def test_matches_rule(self, length, keep, factor):
    pe = np.random.default_rng(length).normal(size=(length, 8)).astype(np.float32)
    out = positional.stretch_positional_embedding(pe, keep, factor)
    np.testing.assert_allclose(out, _stretch_by_rule(pe, keep, factor),
                               rtol=1e-5, atol=1e-6)
    self.assertEqual(out.shape[0], positional.stretched_length(length, keep, factor))

  def test_linear_table_stays_linear(self):
    # Rows linear in the position index stay linear with slope / factor.
    slope = np.linspace(-1, 1, 6, dtype=np.float32)
    pe = np.arange(77, dtype=np.float32)[:, None] * slope
    out = positional.stretch_positional_embedding(pe, 20, 4)
    np.testing.assert_allclose(np.diff(out[20:], axis=0), np.tile(slope / 4, (227, 1)),
                               rtol=1e-4, atol=1e-5)

  def test_jax_input(self):
    pe = np.random.default_rng(1).normal(size=(77, 4)).astype(np.float32)
    out = positional.stretch_positional_embedding(jnp.asarray(pe))
    np.testing.assert_allclose(np.asarray(out),
                               positional.stretch_positional_embedding(pe), rtol=1e-6)

  def test_bad_arguments(self):
    pe = np.zeros((77, 4), np.float32)
    with self.assertRaisesRegex(ValueError, "keep=76"):
      positional.stretch_positional_embedding(pe, keep=76)
    with self.assertRaisesRegex(ValueError, "factor=0"):
      positional.stretch_positional_embedding(pe, factor=0)

  def test_fit_stretches_into_two_tables(self):
    pe = np.random.RandomState(0).normal(size=(77, 4)).astype(np.float32)
    params = {"text": {"positional_embedding": pe}, "visual": {}}
    out = positional.fit_text_positions(params, src_length=77, src_keep=None,
                                        length=248, keep=20)
    self.assertEqual(out["text"]["positional_embedding"].shape, (248, 4))
    np.testing.assert_array_equal(out["text"]["positional_embedding"],
                                  out["text"]["positional_embedding_res"])
    np.testing.assert_array_equal(out["text"]["positional_embedding"][:20], pe[:20])
    self.assertIs(out["visual"], params["visual"])
    with self.assertRaisesRegex(ValueError, "lack positional_embedding_res"):
      positional.fit_text_positions(params, src_length=77, src_keep=20,
                                    length=248, keep=20)
    with self.assertRaisesRegex(ValueError, "cannot stretch a 77-row .* to 250"):
      positional.fit_text_positions(params, src_length=77, src_keep=None,
                                    length=250, keep=20)

  def test_fit_folds_and_resplits_two_tables(self):
    rng = np.random.RandomState(1)
    pe, res = rng.normal(size=(2, 248, 4)).astype(np.float32)
    params = {"text": {"positional_embedding": pe, "positional_embedding_res": res}}
    added = np.concatenate([pe[:20], res[20:]])  # what the model adds
    one = positional.fit_text_positions(params, src_length=248, src_keep=20,
                                        length=248, keep=None)
    self.assertNotIn("positional_embedding_res", one["text"])
    np.testing.assert_array_equal(one["text"]["positional_embedding"], added)
    same = positional.fit_text_positions(params, src_length=248, src_keep=20,
                                         length=248, keep=20)
    np.testing.assert_array_equal(same["text"]["positional_embedding"], pe)
    np.testing.assert_array_equal(same["text"]["positional_embedding_res"], res)
    resplit = positional.fit_text_positions(params, src_length=248, src_keep=20,
                                            length=248, keep=10)
    np.testing.assert_array_equal(positional.combined_positional_embedding(
        resplit["text"]["positional_embedding"],
        resplit["text"]["positional_embedding_res"], 10), added)

  def test_combined_table(self):
    pe = np.zeros((248, 2), np.float32)
    res = np.ones((248, 2), np.float32)
    comb = positional.combined_positional_embedding(pe, res, 20)
    np.testing.assert_array_equal(comb[:20], 0)
    np.testing.assert_array_equal(comb[20:], 1)


if __name__ == "__main__":
  absltest.main()
