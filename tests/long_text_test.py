"""Texts longer than the context (issue 25 item 3): cut and counted, or
embedded whole in context windows, in the API, embed and the train pipeline.

References are computed apart from the code under test: the tokenizer's own
rows (`tok(texts, C)`), windows sliced by hand from `tok.encode`, and the
window features averaged with plain numpy.
"""
import json
import os
import tempfile

from absl import logging
from absl.testing import absltest
import jax
import numpy as np

from fixclip_jax import api
from fixclip_jax import checkpoint
from fixclip_jax import config_base
from fixclip_jax import embed
from fixclip_jax.data import pipeline
from fixclip_jax.data import sources
from fixclip_jax.data import synthetic
from fixclip_jax.data import tokenizers
from fixclip_jax.models import clip
from fixclip_jax.models.sizes import get_config

_CONTEXT = 77
_SHORT = "a red square above a blue circle"
_LONG = " ".join(["a red square above a blue circle next to a green star"] * 20)


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


class TokenizeCountingCutsTest(absltest.TestCase):

  def test_rows_are_the_tokenizers_and_cuts_are_the_overlong_texts(self):
    tok = tokenizers.ClipTokenizer(context_length=16)
    # 10..19 words of one token each: 12..21 tokens with start and end, so
    # 14 words (16 tokens) is the longest that fits.
    texts = [" ".join(["cat"] * n) for n in range(10, 20)] + ["", "dog"]
    rows, cut = tokenizers.tokenize_counting_cuts(tok, texts, 16)
    np.testing.assert_array_equal(rows, tok(texts, 16))
    self.assertEqual(rows.dtype, np.int32)
    needed = np.array([len(tok.encode(t)) + 2 for t in texts])
    np.testing.assert_array_equal(cut, needed > 16)
    self.assertEqual(int(cut.sum()), 5)

  def test_windows_cover_the_text_in_order(self):
    tok = tokenizers.ClipTokenizer()
    self.assertLen(tokenizers.context_windows(tok, _SHORT, 16), 1)
    np.testing.assert_array_equal(tokenizers.context_windows(tok, _SHORT, 16)[0],
                                  tok(_SHORT, 16)[0])
    windows = tokenizers.context_windows(tok, _LONG, 16)
    ids = tok.encode(_LONG)
    self.assertLen(windows, -(-len(ids) // 14))
    for i, row in enumerate(windows):
      content = ids[14 * i:14 * (i + 1)]
      expected = [tok.sot_token_id] + content + [tok.eot_token_id]
      expected += [0] * (16 - len(expected))
      self.assertEqual(row.tolist(), expected)


class ApiLongTextTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cfg = get_config("tiny", context_length=_CONTEXT)
    params = jax.device_get(clip.init_params(cfg, jax.random.PRNGKey(1)))
    cls.model = api.Model(params=params, cfg=cfg,
                          tokenizer=tokenizers.ClipTokenizer(context_length=_CONTEXT),
                          batch_size=4)
    cls.tmp = tempfile.mkdtemp()
    cls.ckpt = os.path.join(cls.tmp, "model")
    checkpoint.save_model(cls.ckpt, params, cfg)

  def test_chunks_average_the_context_windows(self):
    tok = self.model.tokenizer
    ids = tok.encode(_LONG)
    room = _CONTEXT - 2
    self.assertGreater(len(ids), 2 * room)      # three windows or more
    by_hand = []
    for i in range(0, len(ids), room):
      row = [tok.sot_token_id] + ids[i:i + room] + [tok.eot_token_id]
      by_hand.append(row + [0] * (_CONTEXT - len(row)))
    by_hand = np.asarray(by_hand, np.int32)                         # [W, C]
    windows = self.model.encode_tokens(by_hand)                     # [W, d]
    expected = _normalize(_normalize(windows).mean(0))
    got = self.model.encode_text([_SHORT, _LONG], long_text="chunks")
    np.testing.assert_allclose(got[1], expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    # A text that fits: one window, the same features as cutting.
    np.testing.assert_allclose(
        got[0], self.model.encode_text(_SHORT, long_text="truncate")[0], atol=1e-6)
    # The tail counts: chunks differ from the cut text's features.
    cut = self.model.encode_text(_LONG)[0]
    self.assertGreater(float(np.abs(got[1] - cut).max()), 1e-3)

  def test_truncate_warns_once_with_the_count(self):
    with self.assertLogs(level="WARNING") as logs:
      cut = self.model.encode_text([_SHORT, _LONG, _LONG])
    self.assertLen(logs.output, 1)
    self.assertIn("2 of 3 texts are longer than the model's 77-token context",
                  logs.output[0])
    self.assertIn('long_text="chunks"', logs.output[0])
    np.testing.assert_allclose(
        cut, self.model.encode_tokens(self.model.tokenize([_SHORT, _LONG, _LONG])),
        atol=1e-6)
    with self.assertRaisesRegex(ValueError, "long_text='whole'"):
      self.model.encode_text(_LONG, long_text="whole")

  def test_embed_long_text_modes(self):
    texts = [_SHORT, _LONG, _SHORT]
    for mode in api.LONG_TEXT_MODES:
      result = embed.embed(self.ckpt, texts, batch_size=2, long_text=mode)
      self.assertEqual(result["texts_cut"].tolist(), [False, True, False])
      np.testing.assert_allclose(
          result["text_features"], self.model.encode_text(texts, long_text=mode),
          atol=1e-5)


def _data_config(**overrides):
  c = config_base.base_config().data
  c.type = "synthetic"
  c.image_size = 24
  c.global_batch = 4
  c.read_threads = 1
  c.prefetch_buffer = 4
  c.update(overrides)
  return c


class PipelineTruncationTest(absltest.TestCase):

  def test_cut_captions_are_flagged_counted_kept_in_state_warned_once(self):
    records = synthetic.synthetic_examples(8, image_size=32, seed=0)
    for i, r in enumerate(records):
      r["caption"] = _LONG if i % 2 else _SHORT    # every other one > 77 tokens
    tok = tokenizers.get_tokenizer("clip", context_length=_CONTEXT)
    config = _data_config(text_context=_CONTEXT, short_context=_CONTEXT)
    src = sources.InMemorySource(records)
    make = lambda: pipeline.BackgroundBatches(pipeline.make_train_iterator(
        config, tok, source=src, process_index=0, process_count=1))
    batches = make()
    with self.assertLogs(level="WARNING") as logs:
      first = batches.next()
      second = batches.next()
      logging.warning("end")  # assertLogs needs one line if there were none
    cut_lines = [l for l in logs.output if "Captions longer" in l]
    self.assertLen(cut_lines, 1)
    self.assertIn("at 77 tokens (data.text_context)", cut_lines[0])
    for batch in (first, second):
      self.assertEqual(batch["truncated"].shape, (4, 2))
      captions = [records[int(i)]["caption"] for i in batch["index"]]
      needed = [len(tok.encode(c)) + 2 > _CONTEXT for c in captions]
      self.assertEqual(batch["truncated"][:, 0].astype(bool).tolist(), needed)
      # The rows are the tokenizer's own.
      np.testing.assert_array_equal(batch["text_long"], tok(captions, _CONTEXT))
    self.assertEqual(batches.truncated, {"text_long": 4, "text_short": 0,
                                         "examples": 8})
    state = batches.get_state()
    batches.close()
    self.assertEqual(json.loads(state)["truncated"]["text_long"], 4)
    resumed = make()
    resumed.set_state(state)
    self.assertEqual(resumed.truncated["examples"], 8)
    resumed.close()
    # A state saved before the counts existed resumes from zero.
    old = make()
    old.set_state(json.dumps({"pipeline": json.loads(state)["pipeline"]}).encode())
    self.assertEqual(old.truncated, {"text_long": 0, "text_short": 0,
                                     "examples": 0})
    old.close()


if __name__ == "__main__":
  absltest.main()
