"""fixclip-eval (eval_cli.py) and protocol-named reports (issue 25 item 4):
any checkpoint (our model directory, a Hugging Face CLIPModel directory) is
scored by evaluation/run.py; every row names its protocol, image size and text
context; the CLI refuses bad --data in one line."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax

from fixclip_jax import api
from fixclip_jax import checkpoint
from fixclip_jax import convert
from fixclip_jax import eval_cli
from fixclip_jax.data import synthetic
from fixclip_jax.data import tokenizers
from fixclip_jax.evaluation import datasets
from fixclip_jax.evaluation import report
from fixclip_jax.evaluation import retrieval
from fixclip_jax.models import clip
from fixclip_jax.models.sizes import get_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  return dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))


class EvalCliTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.cfg = get_config("tiny", context_length=248, positional_keep=20)
    cls.params = jax.device_get(clip.init_params(cls.cfg, jax.random.PRNGKey(2)))
    cls.model_dir = os.path.join(cls.tmp, "tiny248")
    checkpoint.save_model(cls.model_dir, cls.params, cls.cfg)
    cls.hf_dir = os.path.join(cls.tmp, "tiny248_hf")
    convert.save_hf(cls.hf_dir, cls.params, cls.cfg)
    cls.data = os.path.join(cls.tmp, "scenes")
    synthetic.make_synthetic_dataset(cls.data, 16, image_size=32)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_any_checkpoint_rows_name_their_protocol(self):
    out = os.path.join(self.tmp, "report")
    data = [("synthetic_long", self.data), ("synthetic_long77", self.data)]
    ours = eval_cli.evaluate_checkpoint(self.model_dir, data, out, batch_size=8)
    hf = eval_cli.evaluate_checkpoint(self.hf_dir, data, out, batch_size=8)
    self.assertEqual([(r["model"], r["protocol"], r["image_size"], r["text_context"])
                      for r in ours + hf],
                     [("tiny248", "synthetic-long", 32, 248),
                      ("tiny248", "synthetic-long77", 32, 77),
                      ("tiny248_hf", "synthetic-long", 32, 248),
                      ("tiny248_hf", "synthetic-long77", 32, 77)])
    # One set of weights in two formats: the same scores.
    for a, b in zip(ours, hf):
      for k in ("i2t_R@1", "t2i_R@1", "i2t_R@5"):
        self.assertAlmostEqual(a[k], b[k], places=4)
    # The scores are those of the features, computed here apart.
    ds = datasets.load_synthetic(self.data, which="long")
    direct = api.Model(self.params, self.cfg, tokenizers.get_tokenizer(
        "clip", context_length=248), batch_size=8)
    metrics = retrieval.retrieval_metrics(direct.encode_image(ds.image_paths),
                                          direct.encode_text(ds.texts),
                                          ds.text_to_image)
    self.assertAlmostEqual(ours[0]["t2i_R@1"], metrics["t2i_R@1"], places=4)
    # The report holds the rows with their protocol fields, the console its line.
    with open(os.path.join(out, report.JSON_NAME)) as f:
      rows = json.load(f)["results"]
    self.assertLen(rows, 4)
    self.assertTrue(all(r["image_size"] == 32 for r in rows))
    with open(os.path.join(out, report.MARKDOWN_NAME)) as f:
      self.assertIn("| model | step | dataset | protocol | image_size | "
                    "text_context |", f.read())
    self.assertIn("Protocol: images at 32 px; text cut at 248 tokens "
                  "(synthetic-long77: 77)", report.console_table(ours))

  def test_dci_protocol_names_the_subset(self):
    base = os.path.join(self.tmp, "dci", "densely_captioned_images")
    os.makedirs(os.path.join(base, "annotations"))
    os.makedirs(os.path.join(base, "photos"))
    with open(os.path.join(base, "splits.json"), "w") as f:
      json.dump({"train": ["a.json"], "test": ["b.json"]}, f)
    for name in "ab":
      shutil.copy(os.path.join(self.data, "images", os.listdir(
          os.path.join(self.data, "images"))[0]), os.path.join(base, "photos", f"{name}.png"))
      with open(os.path.join(base, "annotations", f"{name}.json"), "w") as f:
        json.dump({"image": f"{name}.png", "short_caption": "s",
                   "extra_caption": "e"}, f)
    self.assertEqual(datasets.load_dci(base).protocol, "dci-full-2")
    self.assertEqual(datasets.load_dci(base, splits=["test"]).protocol, "dci-test-1")

  def test_cli_table_protocol_line_and_one_line_errors(self):
    out = os.path.join(self.tmp, "cli_report")
    proc = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.eval_cli", f"--checkpoint={self.model_dir}",
         f"--data=synthetic={self.data}", f"--out={out}", "--batch_size=8"],
        cwd=self.tmp, env=_env(), capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    lines = proc.stdout.strip().splitlines()
    print("fixclip-eval stdout:\n" + proc.stdout)
    self.assertTrue(lines[0].startswith(f"Evaluating {self.model_dir} as 'tiny248'"))
    table = [l for l in lines if l.startswith("|")]
    self.assertEqual([row.split(" | ")[1] for row in table[2:]],
                     ["synthetic-long", "synthetic-short"])
    self.assertIn("Protocol: images at 32 px; text cut at 248 tokens", lines)
    self.assertEqual(lines[-1], f"Report: {out}/eval_results.md")
    self.assertEqual(proc.stderr.strip(), "")
    for bad, says in ((f"--data=nosuch={self.data}", "unknown benchmark 'nosuch'"),
                      ("--data=urban1k=/no/such/dir", "urban1k=/no/such/dir: no such"),
                      ("--data=urban1k", "'urban1k' is not NAME=ROOT")):
      proc = subprocess.run(
          [sys.executable, "-m", "fixclip_jax.eval_cli",
           f"--checkpoint={self.model_dir}", bad, f"--out={out}"],
          cwd=self.tmp, env=_env(), capture_output=True, text=True, timeout=300)
      self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
      self.assertIn(says, proc.stderr)
      self.assertLen(proc.stderr.strip().splitlines(), 1, proc.stderr)


if __name__ == "__main__":
  absltest.main()
