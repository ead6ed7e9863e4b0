"""Tests for fixclip_jax.data.captions."""
from absl.testing import absltest
from absl.testing import parameterized

from fixclip_jax.data import captions

GOOD = ("The photograph shows a wooden table in a sunny kitchen, with a bowl "
        "of green apples, two white mugs and a folded newspaper beside a "
        "window that looks out onto a small garden.")


class ShortCaptionTest(absltest.TestCase):

  def test_first_sentence_turns_newlines_into_spaces_first(self):
    # ShareGPT4V-style captions: a one-sentence first paragraph ends in ".\n".
    # Official rule (Long-CLIP train/sharegpt4v.py), written out here:
    official = lambda c: c.replace("\n", " ").split(". ")[0]
    captions_ = ["The image shows a red bus.\nIt is parked. A man waits.",
                 "A kitchen.\n\nThe counter is white. Plates are stacked.",
                 "Two dogs play.\nOne is brown.",
                 "No period here\nat all",
                 "A cat sleeps. On a mat.\nIt is grey."]
    for c in captions_:
      self.assertEqual(captions.first_sentence(c), official(c), c)
    self.assertEqual(captions.first_sentence(captions_[0]), "The image shows a red bus")

  def test_first_sentence_is_longclip_split(self):
    self.assertEqual(captions.first_sentence("A dog. It runs. Fast."), "A dog")
    self.assertEqual(captions.first_sentence("No period here"), "No period here")

  def test_provided_short_caption_wins(self):
    self.assertEqual(captions.short_caption("A. B.", "given"), "given")
    self.assertEqual(captions.short_caption("A. B.", "  "), "A")


class FilterTest(parameterized.TestCase):

  def test_good_caption_passes(self):
    self.assertIsNone(captions.filter_reason(GOOD))

  @parameterized.named_parameters(
      ("empty", "   ", "empty"),
      ("sorry", "I'm sorry, but I can not describe this image for you today.",
       "refusal"),
      ("curly_sorry", "I’m sorry, there is nothing I could say about it here.",
       "refusal"),
      ("cannot", "Unfortunately I cannot see any details in the picture at all.",
       "refusal"),
      ("as_an_ai", "As an AI language model I do not have eyes to see with.",
       "refusal"),
      ("too_short", "A red bus on a street.", "too_short"),
      ("non_alpha", "#### 1234 5678 ---- ++++ //// 9999 0000 |||| <<<<",
       "non_alpha"),
      ("long_word", "The image shows aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa "
       "written in large letters on a wall.", "long_word"),
      ("repetitive", "A tree, a tree, a tree, a tree, a tree, a tree, a tree, "
       "a tree and a tree.", "repetitive"),
  )
  def test_each_filter_rejects(self, caption, reason):
    self.assertEqual(captions.filter_reason(caption), reason)

  def test_repeated_ngram_ratio(self):
    self.assertEqual(captions.repeated_ngram_ratio("a b c a b c", 3), 0.25)
    self.assertEqual(captions.repeated_ngram_ratio("one two", 3), 0.0)
    self.assertEqual(captions.repeated_ngram_ratio(GOOD, 3), 0.0)

  def test_thresholds_are_configurable(self):
    short = "A red bus on a street."
    self.assertIsNone(captions.filter_reason(
        short, captions.CaptionFilterConfig(min_words=3)))
    loose = captions.CaptionFilterConfig(max_repeated_ngram_ratio=0.99)
    self.assertIsNone(captions.filter_reason(
        "A tree, a tree, a tree, a tree, a tree, a tree.", loose))
    no_refusals = captions.CaptionFilterConfig(refusal_patterns=())
    self.assertIsNone(captions.filter_reason(
        "I cannot believe how tall the old lighthouse on the cliff is.",
        no_refusals))

  def test_from_mapping(self):
    cfg = captions.CaptionFilterConfig.from_mapping({"min_words": 2})
    self.assertEqual(cfg.min_words, 2)
    with self.assertRaisesRegex(ValueError, "min_wrods"):
      captions.CaptionFilterConfig.from_mapping({"min_wrods": 2})

  def test_caption_filter_counts_rejections(self):
    f = captions.CaptionFilter()
    results = [f(c) for c in (GOOD, "", "Too short.", "Too short again.")]
    self.assertEqual(results, [None, "empty", "too_short", "too_short"])
    self.assertEqual(f.num_seen, 4)
    self.assertEqual(dict(f.rejections), {"empty": 1, "too_short": 2})
    self.assertTrue(f.accepts(GOOD))


if __name__ == "__main__":
  absltest.main()
