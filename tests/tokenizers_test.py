"""Tests for fixclip_jax.data.tokenizers.

CLIP ids are compared with open_clip's own tokenizer (the reference, method.md
§1) on a generated corpus; SentencePiece is checked on a model trained here.
"""
import gzip
import os
import random
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from fixclip_jax.data import tokenizers

_SOT, _EOT = 49406, 49407

_ASCII_WORDS = (
    "a the photo of dog cat man woman child sitting standing on under near "
    "red blue green yellow large small old wooden table chair window street "
    "car bus bicycle building sky cloud tree grass water beach mountain "
    "snow night light shadow left right background foreground holding "
    "wearing shirt hat glasses phone laptop cup bottle plate pizza sandwich "
    "anthropomorphic photorealistic multicolored 4k HDR iPhone McDonald's "
    "O'Neil NASA USB-C e-mail x-ray T-shirt").split()
_UNICODE_WORDS = [
    "café", "naïve", "résumé", "Ångström", "façade", "jalapeño", "Straße",
    "Ærø", "Dvořák", "Łódź", "Ελλάδα", "Москва", "東京", "北京烤鸭", "猫と犬",
    "한국어", "ภาษาไทย", "हिन्दी", "العربية", "עברית", "ﬁsh", "ﬂower",
    "Ｆｕｌｌｗｉｄｔｈ", "ǅemal", "İstanbul", "ſtrong", "e\u0301cole",
    "A\u030angstrom", "Ã©tÃ©", "â€œquotedâ€\x9d", "“curly”", "‘single’",
    "—dash–", "…", "½", "²", "٣", "Ⅻ", "№5", "€100", "£3", "¥", "°C",
    "😀", "🐶🐱", "👩‍👩‍👧", "👍🏽", "🇯🇵", "❤️", "™", "©", "\u200bzero",
    "soft\u00adhyphen", "\ufeffbom", "ᚠᛇᚻ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U0001f9ec",
]
_ENTITIES = ["&amp;", "&#39;", "&quot;", "&lt;", "&gt;", "&nbsp;", "&eacute;",
             "&#x1F600;", "&amp;amp;", "&amp;#39;", "&copy;", "&#8217;",
             "&unknown;", "&", "&#;"]
_SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000",
           "\x0b", "\x0c", "\u2028", " \t \n "]
_PUNCT = [".", ",", "!", "?", ";", ":", "...", "!!!", "?!", "(", ")", "[",
          "]", "{", "}", "\"", "'", "-", "--", "/", "\\", "@", "#", "$",
          "%", "^", "*", "_", "+", "=", "|", "~", "`", "<", ">", "<b>",
          "</w>", "<start_of_text>", "<end_of_text>", "<|endoftext|>"]
_CONTRACTIONS = ["don't", "it's", "we'll", "they're", "I'm", "you've",
                 "she'd", "can't", "IT'S", "WE'LL", "'s", "'t", "o'clock",
                 "rock'n'roll", "'ſ", "dogs'"]


def _number(rng: random.Random) -> str:
  kind = rng.randrange(5)
  if kind == 0:
    return str(rng.randrange(0, 100000))
  if kind == 1:
    return f"{rng.uniform(-1000, 1000):.{rng.randrange(0, 4)}f}"
  if kind == 2:
    return f"{rng.randrange(1, 999)},{rng.randrange(0, 999):03d}"
  if kind == 3:
    return f"{rng.randrange(1900, 2030)}-{rng.randrange(1, 13):02d}"
  return f"{rng.randrange(1, 100)}%"


def _piece(rng: random.Random, ascii_only: bool = False) -> str:
  weights = [10, 0, 0, 2, 2, 1] if ascii_only else [10, 3, 1, 2, 2, 1]
  kind = rng.choices(range(6), weights=weights)[0]
  if kind == 0:
    word = rng.choice(_ASCII_WORDS)
    case = rng.randrange(6)
    return word.upper() if case == 0 else word.title() if case == 1 else word
  if kind == 1:
    return rng.choice(_UNICODE_WORDS)
  if kind == 2:
    return rng.choice(_ENTITIES)
  if kind == 3:
    return rng.choice(_PUNCT)
  if kind == 4:
    return _number(rng)
  return rng.choice(_CONTRACTIONS)


def _text(rng: random.Random, num_pieces: int, ascii_only: bool) -> str:
  """Pieces joined by mostly single spaces, sometimes nothing or odd spaces.

  ascii_only texts (printable ASCII, tabs, newlines) take the tokenizer's
  shortcut that skips ftfy; the others go through ftfy.
  """
  spaces = [" ", "  ", "\t", "\n", " \t \n "] if ascii_only else _SPACES
  parts = []
  for _ in range(num_pieces):
    parts.append(_piece(rng, ascii_only))
    parts.append(rng.choices([" ", "", rng.choice(spaces)],
                             weights=[8, 1, 2])[0])
  return "".join(parts)


def make_corpus(num_texts: int = 1200, seed: int = 0) -> list[str]:
  """Deterministic varied strings: short captions to 300+ word paragraphs."""
  rng = random.Random(seed)
  corpus = [
      "", " ", "\t\n", "a", "A photo of a dog.", "a photo of a cat",
      "&amp;amp;amp;", "<start_of_text>hello<end_of_text>",
      "ÃƒÂ©", "\x00\x01control\x1c\x1fchars\x7f", "a\u00a0b\u2003c\u3000d",
      "!" * 300, "9" * 300, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
      "x" * 1000, "😀" * 50, "東" * 200,
  ]
  while len(corpus) < num_texts:
    length_kind = rng.randrange(10)
    if length_kind < 5:
      num_pieces = rng.randrange(1, 20)
    elif length_kind < 8:
      num_pieces = rng.randrange(20, 120)
    else:
      num_pieces = rng.randrange(300, 400)
    corpus.append(_text(rng, num_pieces, ascii_only=rng.random() < 0.3))
  return corpus


class ClipTokenizerParityTest(parameterized.TestCase):
  """Our ids against open_clip's SimpleTokenizer and tokenize()."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    import open_clip  # pylint: disable=g-import-not-at-top
    cls.open_clip = open_clip
    cls.reference = open_clip.tokenizer.SimpleTokenizer()
    cls.tok = tokenizers.ClipTokenizer()
    cls.corpus = make_corpus()
    cls.reference_ids = [cls.reference.encode(t) for t in cls.corpus]

  def test_corpus_is_varied(self):
    # Guards the parity tests against a degenerate corpus.
    lengths = np.array([len(ids) for ids in self.reference_ids])
    self.assertGreaterEqual(len(self.corpus), 1000)
    self.assertGreater((lengths > 246).sum(), 50)   # truncated at 248
    self.assertGreater(((lengths > 75) & (lengths <= 246)).sum(), 50)
    self.assertGreater((lengths <= 75).sum(), 300)
    self.assertGreater(sum(max(map(ord, t), default=0) > 0x3000
                           for t in self.corpus), 300)
    self.assertGreater(sum("&amp;" in t or "&#39;" in t for t in self.corpus),
                       100)
    self.assertGreater(sum("\u00a0" in t or "\t" in t for t in self.corpus),
                       100)
    self.assertGreater(sum(len(t.split()) >= 300 for t in self.corpus), 50)
    # Both cleaning paths (ASCII shortcut and full ftfy) are exercised.
    shortcut = [tokenizers._NEEDS_FTFY.search(t) is None for t in self.corpus]
    self.assertGreater(sum(shortcut), 200)
    self.assertGreater(len(shortcut) - sum(shortcut), 200)

  def test_clean_text_equals_open_clip_cleaning(self):
    # Printable ASCII with tabs/newlines takes the shortcut that skips ftfy;
    # "&", "<", "\r" and control characters must not change the result.
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(0x20, 0x7f)] + ["\t", "\n", "\r",
                                                      "\x0b", "\x1c", "\x1b"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(80)))
             for _ in range(2000)]
    texts += ["a &amp;amp; b", "<b>&amp;amp;</b>", "x\r\ny", "\x1b[31mred",
              "A\tB\nC"] + self.corpus
    reference_clean = self.open_clip.tokenizer
    for text in texts:
      expected = reference_clean.whitespace_clean(
          reference_clean.basic_clean(text)).lower()
      self.assertEqual(tokenizers.clean_text(text), expected, msg=repr(text))

  def test_encode_equals_simple_tokenizer(self):
    mismatches = [i for i, text in enumerate(self.corpus)
                  if self.tok.encode(text) != self.reference_ids[i]]
    self.assertEqual(mismatches, [],
                     msg=f"first mismatch: {self.corpus[mismatches[0]]!r}"
                     if mismatches else "")

  @parameterized.parameters(77, 248)
  def test_batch_equals_open_clip_tokenize(self, context_length):
    expected = self.open_clip.tokenize(
        self.corpus, context_length=context_length).numpy()
    got = self.tok(self.corpus, context_length=context_length)
    self.assertEqual(got.dtype, np.int32)
    self.assertEqual(got.shape, (len(self.corpus), context_length))
    np.testing.assert_array_equal(got, expected)

  @parameterized.parameters(77, 248)
  def test_constructor_context_length_equals_open_clip(self, context_length):
    tok = tokenizers.ClipTokenizer(context_length=context_length)
    texts = self.corpus[:200]
    np.testing.assert_array_equal(
        tok(texts),
        self.open_clip.tokenize(texts, context_length=context_length).numpy())

  def test_decode_equals_simple_tokenizer(self):
    for ids in self.reference_ids[:300]:
      self.assertEqual(self.tok.decode(ids, skip_special_tokens=False),
                       self.reference.decode(ids))

  def test_decode_of_padded_row(self):
    row = self.tok("A photo of a DOG &amp; a cat")[0]
    self.assertEqual(self.tok.decode(row), "a photo of a dog & a cat ")
    self.assertEqual(self.tok.decode(row, skip_special_tokens=False),
                     self.reference.decode(row.tolist()))

  def test_attributes(self):
    self.assertEqual(self.tok.sot_token_id, self.reference.sot_token_id)
    self.assertEqual(self.tok.eot_token_id, self.reference.eot_token_id)
    self.assertEqual(self.tok.vocab_size, self.reference.vocab_size)
    self.assertEqual(self.tok.context_length, 77)
    self.assertEqual((self.tok.sot_token_id, self.tok.eot_token_id),
                     (_SOT, _EOT))


class ClipTokenizerTruncationTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = tokenizers.ClipTokenizer(context_length=248)
    cls.long_text = " ".join(f"word{i}" for i in range(200))  # > 400 ids

  def test_truncated_row_ends_with_eot(self):
    ids = self.tok.encode(self.long_text)
    self.assertGreater(len(ids), 246)
    row = self.tok(self.long_text)[0]
    self.assertEqual(row[0], _SOT)
    self.assertEqual(row[-1], _EOT)
    np.testing.assert_array_equal(row[1:-1], ids[:246])

  def test_exact_fit_is_not_cut(self):
    ids = self.tok.encode(self.long_text)
    row = self.tok(self.long_text, context_length=len(ids) + 2)[0]
    np.testing.assert_array_equal(row, [_SOT] + ids + [_EOT])
    row = self.tok(self.long_text, context_length=len(ids) + 3)[0]
    np.testing.assert_array_equal(row, [_SOT] + ids + [_EOT, 0])

  def test_short_row_padded_with_zero(self):
    rows = self.tok(["a dog", "a"])
    np.testing.assert_array_equal(rows[0, :4], [_SOT, 320, 1929, _EOT])
    np.testing.assert_array_equal(rows[0, 4:], 0)
    np.testing.assert_array_equal(rows[1, :3], [_SOT, 320, _EOT])
    np.testing.assert_array_equal(rows[1, 3:], 0)

  def test_eot_is_argmax(self):
    rows = self.tok(["a dog", self.long_text, ""])
    np.testing.assert_array_equal(np.argmax(rows, -1),
                                  tokenizers.eot_positions(rows, _EOT))
    np.testing.assert_array_equal(np.argmax(rows, -1), [3, 247, 1])

  def test_truncate_false_raises_with_index_and_count(self):
    tok = tokenizers.ClipTokenizer(context_length=248, truncate=False)
    count = len(tok.encode(self.long_text)) + 2
    with self.assertRaisesRegex(ValueError, rf"text 1 has {count} tokens"):
      tok(["a dog", self.long_text, "a cat"])
    np.testing.assert_array_equal(tok(["a dog"]), self.tok(["a dog"]))

  def test_single_string_and_empty_batch(self):
    self.assertEqual(self.tok("a dog").shape, (1, 248))
    self.assertEqual(self.tok([]).shape, (0, 248))

  def test_bad_inputs(self):
    with self.assertRaisesRegex(TypeError, "text 1 is a int"):
      self.tok(["a", 3])
    with self.assertRaisesRegex(ValueError, "context_length"):
      self.tok("a", context_length=1)
    with self.assertRaisesRegex(ValueError, "token id 49408"):
      self.tok.decode([320, 49408])

  def test_get_tokenizer(self):
    tok = tokenizers.get_tokenizer("clip", context_length=248)
    self.assertIsInstance(tok, tokenizers.ClipTokenizer)
    np.testing.assert_array_equal(tok(self.long_text), self.tok(self.long_text))
    # Exactly two forms: "clip" or a SentencePiece .model path; the error
    # names the config knob and the value.
    for bad in ("bert", "sentencepiece", "CLIP", "vocab.txt.gz", ""):
      with self.assertRaisesRegex(
          ValueError, rf"config\.data\.tokenizer='{bad}'.*'clip'.*\.model"):
        tokenizers.get_tokenizer(bad)
    with self.assertRaisesRegex(FileNotFoundError, "nowhere.model"):
      tokenizers.get_tokenizer("/nowhere.model")


class ClipVocabFileTest(absltest.TestCase):

  def test_missing_file_names_path(self):
    path = os.path.join(tempfile.mkdtemp(), "nope.txt.gz")
    with self.assertRaisesRegex(FileNotFoundError, "nope.txt.gz"):
      tokenizers.ClipTokenizer(vocab_path=path)

  def test_wrong_sha_names_path(self):
    with gzip.open(tokenizers.DEFAULT_VOCAB_PATH, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
    path = os.path.join(tempfile.mkdtemp(), "short_vocab.txt.gz")
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write("\n".join(lines[:1000]))
    with self.assertRaisesRegex(ValueError, r"short_vocab\.txt\.gz.*sha256"):
      tokenizers.ClipTokenizer(vocab_path=path)
    # Without the check, the content check still names the file.
    with self.assertRaisesRegex(ValueError, r"short_vocab\.txt\.gz.*merges"):
      tokenizers.ClipTokenizer(vocab_path=path, vocab_sha256=None)

  def test_configured_copy_loads(self):
    path = os.path.join(tempfile.mkdtemp(), "copy.txt.gz")
    with open(tokenizers.DEFAULT_VOCAB_PATH, "rb") as src:
      data = src.read()
    with open(path, "wb") as dst:
      dst.write(data)
    tok = tokenizers.ClipTokenizer(vocab_path=path)
    self.assertEqual(tok.encode("a photo of a dog"), [320, 1125, 539, 320, 1929])


_SYLLABLES = ["ka", "to", "ri", "mon", "sel", "pa", "dre", "ux", "li", "ban",
              "qo", "fer", "zu", "tim", "ol"]


def _sp_corpus(seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
           for _ in range(300)]
  return [" ".join(rng.choice(words) for _ in range(12)) for _ in range(500)]


def _train_sentencepiece(prefix: str, **special_ids) -> str:
  import sentencepiece  # pylint: disable=g-import-not-at-top
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(_sp_corpus()), model_prefix=prefix,
      vocab_size=150, minloglevel=2, **special_ids)
  return prefix + ".model"


class SentencePieceTokenizerTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tempdir = tempfile.mkdtemp()
    # pad is deliberately not 0, to see that the model's pad id is used.
    cls.model_path = _train_sentencepiece(
        os.path.join(cls.tempdir, "with_pad"),
        unk_id=0, bos_id=1, eos_id=2, pad_id=3)
    cls.texts = _sp_corpus(seed=1)[:20]

  def test_interface_and_padding(self):
    tok = tokenizers.SentencePieceTokenizer(self.model_path, context_length=40)
    self.assertEqual(tok.vocab_size, 150)
    self.assertEqual(tok.context_length, 40)
    self.assertEqual((tok.eot_token_id, tok.pad_token_id), (2, 3))
    rows = tok(self.texts)
    self.assertEqual(rows.shape, (20, 40))
    self.assertEqual(rows.dtype, np.int32)
    for text, row in zip(self.texts, rows):
      ids = tok.encode(text)
      self.assertNotIn(2, ids)
      self.assertLessEqual(len(ids) + 1, 40)
      np.testing.assert_array_equal(row[:len(ids)], ids)
      self.assertEqual(row[len(ids)], 2)
      np.testing.assert_array_equal(row[len(ids) + 1:], 3)
    self.assertEqual(tok("a").shape, (1, 40))

  def test_round_trip(self):
    tok = tokenizers.SentencePieceTokenizer(self.model_path, context_length=40)
    rows = tok(self.texts)
    for text, row in zip(self.texts, rows):
      self.assertEqual(tok.decode(tok.encode(text)), text)
      self.assertEqual(tok.decode(row), text)

  def test_add_bos(self):
    tok = tokenizers.SentencePieceTokenizer(self.model_path, context_length=40,
                                            add_bos=True)
    row = tok(self.texts[0])[0]
    ids = tok.encode(self.texts[0])
    np.testing.assert_array_equal(row[:len(ids) + 2], [1] + ids + [2])
    self.assertEqual(tok.decode(row), self.texts[0])

  def test_truncation_ends_with_eos(self):
    tok = tokenizers.SentencePieceTokenizer(self.model_path, context_length=8)
    rows = tok(self.texts)
    np.testing.assert_array_equal(rows[:, -1], 2)
    for text, row in zip(self.texts, rows):
      np.testing.assert_array_equal(row[:-1], tok.encode(text)[:7])
    np.testing.assert_array_equal(tokenizers.eot_positions(rows, 2), 7)
    strict = tokenizers.SentencePieceTokenizer(
        self.model_path, context_length=8, truncate=False)
    count = len(tok.encode(self.texts[0])) + 1
    with self.assertRaisesRegex(ValueError, rf"text 0 has {count} tokens"):
      strict(self.texts)

  def test_no_eos(self):
    tok = tokenizers.SentencePieceTokenizer(self.model_path, context_length=8,
                                            add_eos=False)
    rows = tok(self.texts)
    for text, row in zip(self.texts, rows):
      np.testing.assert_array_equal(row, tok.encode(text)[:8])

  def test_model_without_pad_pads_with_zero(self):
    path = _train_sentencepiece(os.path.join(self.tempdir, "no_pad"))
    tok = tokenizers.get_tokenizer(path, context_length=40)
    self.assertIsInstance(tok, tokenizers.SentencePieceTokenizer)
    self.assertEqual(tok.pad_token_id, 0)
    ids = tok.encode(self.texts[0])
    row = tok(self.texts[0])[0]
    np.testing.assert_array_equal(row[:len(ids) + 1], ids + [tok.eot_token_id])
    np.testing.assert_array_equal(row[len(ids) + 1:], 0)

  def test_model_compatibility(self):
    sp = tokenizers.get_tokenizer(self.model_path, context_length=40)
    tokenizers.check_model_compatible(sp, 150, 2, "m")
    tokenizers.check_model_compatible(sp, 160, 2, "m")  # unused extra rows
    with self.assertRaisesRegex(ValueError, r"^m: .*argmax.*eot_token_id=2"):
      tokenizers.check_model_compatible(sp, 150, None, "m")
    with self.assertRaisesRegex(ValueError, r"^m: model eot_token_id=5"):
      tokenizers.check_model_compatible(sp, 150, 5, "m")
    with self.assertRaisesRegex(ValueError, r"^m: .*150 ids.*embeds 100"):
      tokenizers.check_model_compatible(sp, 100, 2, "m")
    clip_tok = tokenizers.get_tokenizer("clip")
    tokenizers.check_model_compatible(clip_tok, 49408, None, "m")
    tokenizers.check_model_compatible(clip_tok, 49408, 49407, "m")
    with self.assertRaisesRegex(ValueError, "49408 ids"):
      tokenizers.check_model_compatible(clip_tok, 500, None, "m")

  def test_bad_model_files_name_path(self):
    missing = os.path.join(self.tempdir, "missing.model")
    with self.assertRaisesRegex(FileNotFoundError, "missing.model"):
      tokenizers.SentencePieceTokenizer(missing)
    garbage = os.path.join(self.tempdir, "garbage.model")
    with open(garbage, "wb") as f:
      f.write(b"not a model")
    with self.assertRaisesRegex(ValueError, "garbage.model"):
      tokenizers.SentencePieceTokenizer(garbage)


class ImportTest(absltest.TestCase):

  def test_imports_without_torch(self):
    code = ("import sys; import fixclip_jax.data.tokenizers as t; "
            "t.ClipTokenizer()('a dog'); "
            "print(sorted(m for m in ('torch', 'open_clip') "
            "if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root,
                            capture_output=True, text=True, check=True)
    self.assertEqual(result.stdout.strip(), "[]")


if __name__ == "__main__":
  absltest.main()
