"""Training and evaluation with a SentencePiece vocabulary (config.data.tokenizer).

A tiny SentencePiece model is trained on the synthetic captions; the text
tower gets its vocab_size and pools at its eos (model.eot_token_id), which is
a small id, so CLIP's argmax pooling would miss it.
"""
import json
import os
import shutil
import tempfile

from absl.testing import absltest
import numpy as np
import sentencepiece

from fixclip_jax import config_base
from fixclip_jax import train
from fixclip_jax.data import pipeline
from fixclip_jax.data import synthetic
from fixclip_jax.data import tokenizers

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_VOCAB_SIZE = 500  # at most: the synthetic captions have fewer distinct pieces


def train_sentencepiece(prefix: str, num_captions: int = 256) -> str:
  """A SentencePiece .model trained on synthetic captions; returns its path."""
  captions = [ex["caption"] for ex in
              synthetic.synthetic_examples(num_captions, image_size=8)]
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(captions), model_prefix=prefix,
      vocab_size=_VOCAB_SIZE, hard_vocab_limit=False, minloglevel=2)
  return prefix + ".model"


def tiny_config(model_path: str, tokenizer):
  """configs/demo.py, a few steps, eval at the end, on the SentencePiece vocab."""
  c = config_base.load_config_file(os.path.join(_ROOT, "configs", "demo.py"))
  c.data.tokenizer = model_path
  c.model.vocab_size = tokenizer.vocab_size
  c.model.eot_token_id = tokenizer.eot_token_id
  c.data.global_batch = 8
  c.data.synthetic_num = 64
  c.data.short_context = 77
  c.num_train_steps = 4
  c.pretrain77.steps = 0
  c.optim.warmup_steps = 1
  c.log_every = 1
  c.eval_every = 0  # only at the end
  c.eval_at_start = False
  c.checkpoint_every = 1000
  c.eval.synthetic_num = 16
  c.eval.batch_size = 8
  c.data.long_buckets = c.data.short_buckets = ()  # one compiled step
  return c


class SentencePieceTrainTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.model_path = train_sentencepiece(os.path.join(cls.tmp, "spm"))
    cls.tokenizer = tokenizers.get_tokenizer(cls.model_path, context_length=248)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_eos_is_not_the_largest_id(self):
    # What makes this vocabulary need model.eot_token_id.
    self.assertLessEqual(self.tokenizer.vocab_size, _VOCAB_SIZE)
    self.assertLess(self.tokenizer.eot_token_id, self.tokenizer.vocab_size - 1)

  def test_pipeline_batches_use_the_vocabulary(self):
    config = tiny_config(self.model_path, self.tokenizer)
    it = pipeline.make_train_iterator(config.data, self.tokenizer,
                                      process_index=0, process_count=1)
    batch = next(it)
    for key in ("text_long", "text_short"):
      tokens = batch[key]
      self.assertLess(int(tokens.max()), self.tokenizer.vocab_size, key)
      # Every row ends its text with eos, where the text tower pools.
      self.assertTrue((tokens == self.tokenizer.eot_token_id).any(-1).all(), key)

  def test_trains_and_evaluates(self):
    config = tiny_config(self.model_path, self.tokenizer)
    workdir = os.path.join(self.tmp, "run")
    state = train.train_and_evaluate(config, workdir)
    self.assertEqual(int(state["step"]), 4)
    self.assertEqual(state["params"]["text"]["token_embedding"].shape[0],
                     self.tokenizer.vocab_size)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    self.assertTrue(all(np.isfinite(r["loss"]) for r in rows if "loss" in r))
    evals = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
    for protocol in ("synthetic-long", "synthetic-short"):
      for metric in ("t2i_R@1", "i2t_R@1"):
        value = evals[f"eval/{protocol}/{metric}"]
        self.assertBetween(value, 0.0, 100.0)
    with open(os.path.join(workdir, "eval_results.json")) as f:
      results = json.load(f)["results"]
    self.assertEqual({r["protocol"] for r in results},
                     {"synthetic-late", "synthetic-long", "synthetic-long77",
                      "synthetic-short"})


if __name__ == "__main__":
  absltest.main()
