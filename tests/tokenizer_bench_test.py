"""tools/tokenizer_bench.py: caption generator, rates, table and CLI."""
import os
import subprocess
import sys

from absl import flags
from absl.testing import absltest

from fixclip_jax.data import tokenizers
from fixclip_jax.tools import tokenizer_bench

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


class SyntheticCaptionsTest(absltest.TestCase):

  def test_deterministic_lengths_and_unicode(self):
    a = tokenizer_bench.synthetic_captions(5, 30, seed=1)
    self.assertEqual(a, tokenizer_bench.synthetic_captions(5, 30, seed=1))
    self.assertNotEqual(a, tokenizer_bench.synthetic_captions(5, 30, seed=2))
    self.assertEqual([len(c.split()) for c in a], [30] * 5)
    self.assertTrue(all(c.isascii() and c.endswith(".") for c in a))
    unicode = tokenizer_bench.synthetic_captions(5, 30, seed=1, unicode=True)
    self.assertTrue(all(not c.isascii() for c in unicode))


class MeasureTest(absltest.TestCase):

  def test_rates_of_every_pass_and_the_table(self):
    captions = tokenizer_bench.synthetic_captions(20, 15, seed=0)
    rates = tokenizer_bench.measure(tokenizers.ClipTokenizer, captions[:10],
                                    captions[10:], context_length=77)
    self.assertEqual(set(rates), {"cold", "warm", "warm_new"})
    self.assertTrue(all(r > 0 for r in rates.values()), rates)
    ours = {"cold": 100.0, "warm": 400.0, "warm_new": 200.0}
    theirs = {"cold": 50.0, "warm": 100.0, "warm_new": 100.0}
    table = tokenizer_bench.format_table({
        "fixclip_jax ClipTokenizer": ours, "open_clip SimpleTokenizer": theirs})
    self.assertIn("cold x2.00  warm x4.00  warm_new x2.00", table)
    alone = tokenizer_bench.format_table({"fixclip_jax ClipTokenizer": ours})
    self.assertNotIn("speed-up", alone)


class MainTest(absltest.TestCase):

  def test_importing_defines_no_flags(self):
    self.assertNotIn("num_captions", flags.FLAGS)
    self.assertNotIn("words_per_caption", flags.FLAGS)

  def test_cli(self):
    proc = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.tools.tokenizer_bench",
         "--num_captions=20", "--words_per_caption=10", "--repeats=1",
         "--open_clip=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("20 captions x 10 words", proc.stdout)
    self.assertIn("fixclip_jax ClipTokenizer", proc.stdout)
    self.assertNotIn("open_clip SimpleTokenizer", proc.stdout)


if __name__ == "__main__":
  absltest.main()
