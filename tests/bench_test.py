"""tools/bench.py: a short benchmark of the tiny demo config, with the open_clip
comparison, on all (8 virtual CPU) devices as training would use them."""
import json
import math
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np

from fixclip_jax import config_base
from fixclip_jax import flops
from fixclip_jax.models import clip
from fixclip_jax.models import sizes
from fixclip_jax.tools import bench


def demo_config():
  """configs/demo.py's get_config(), loaded by path as --config does."""
  return config_base.load_config_file(
      os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"))


def positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


class PeakTableTest(absltest.TestCase):

  def test_device_kinds(self):
    self.assertEqual(flops.peak_tflops_for("NVIDIA H100 80GB HBM3"), 989.0)
    self.assertEqual(flops.peak_tflops_for("NVIDIA H100 PCIe"), 756.0)
    self.assertEqual(flops.peak_tflops_for("NVIDIA H200"), 989.0)
    self.assertEqual(flops.peak_tflops_for("NVIDIA A100-SXM4-80GB"), 312.0)
    self.assertEqual(flops.peak_tflops_for("TPU v4"), 275.0)
    self.assertEqual(flops.peak_tflops_for("TPU v5 lite"), 197.0)
    self.assertEqual(flops.peak_tflops_for("TPU v5"), 459.0)
    self.assertEqual(flops.peak_tflops_for("TPU v5p"), 459.0)
    self.assertEqual(flops.peak_tflops_for("TPU v6 lite"), 918.0)
    self.assertIsNone(flops.peak_tflops_for("cpu"))


class SyntheticBatchTest(absltest.TestCase):

  def test_shapes_and_eot(self):
    c = demo_config()
    cfg = sizes.model_config(c)
    b = bench.synthetic_batch(c, cfg, 4)
    self.assertEqual(b["image"].shape, (4, 32, 32, 3))
    self.assertEqual(b["text_long"].shape, (4, 248))
    self.assertEqual(b["text_short"].shape, (4, 77))
    for t in (b["text_long"], b["text_short"]):
      self.assertEqual(t.dtype, np.int32)
      # The EOT (largest id) is where the towers pool: exactly one per row.
      np.testing.assert_array_equal((t == cfg.vocab_size - 1).sum(1), 1)


class MaskingModeTest(absltest.TestCase):

  def test_reported_only_for_objectives_that_mask(self):
    c = demo_config()
    c.masking.mode = "drop"
    self.assertEqual(bench.masking_mode(c), "drop")          # fixclip masks
    for name in ("clip", "longclip"):
      c.objective = name
      self.assertEqual(bench.masking_mode(c), "n/a")
    c.objective = "nope"
    with self.assertRaisesRegex(ValueError, "nope"):
      bench.masking_mode(c)


class RunBenchmarkTest(absltest.TestCase):

  def test_tiny_with_torch(self):
    n = len(jax.devices())
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "out", "bench.json")
      r = bench.run_benchmark(demo_config(), batch=n, steps=2, warmup=1,
                              eval_steps=1, peak_tflops=1.0, compare_torch=True,
                              json_path=path, config_name="configs/demo.py")
      with open(path) as f:
        written = json.load(f)
      self.assertEqual(os.listdir(os.path.dirname(path)), ["bench.json"])  # no temp left
    self.assertEqual(written["images_per_s"], r["images_per_s"])
    self.assertEqual(r["num_devices"], n)
    self.assertEqual(r["batch"], n)
    for key in ("images_per_s", "achieved_tflops_per_s", "mfu", "compile_s",
                "xla_flops_per_step", "eval_images_per_s", "eval_texts_per_s",
                "torch_images_per_s", "twin_images_per_s", "ratio_twin_over_torch",
                "ratio_ours_over_torch_per_flop"):
      self.assertTrue(positive(r[key]), f"{key}={r[key]!r}")
    for key in ("step_time_s", "torch_step_time_s", "twin_step_time_s"):
      t = r[key]
      self.assertTrue(all(positive(t[q]) for q in ("median", "p10", "p90")), t)
      self.assertLessEqual(t["p10"], t["median"])
      self.assertLessEqual(t["median"], t["p90"])
    self.assertEqual(r["analytic_flops_per_step"],
                     flops.train_step_flops(demo_config(), batch=n)["total"])
    self.assertAlmostEqual(r["mfu"], r["achieved_tflops_per_s"] / n, places=12)
    # The step is partitioned over the devices; cost_analysis x devices must
    # land near the analytic count (replicated optimizer work makes it larger).
    self.assertBetween(r["xla_over_analytic"], 0.9, 1.3)
    # The twin runs no short-caption pass: XLA ~ one text pass.
    self.assertBetween(r["twin_xla_flops_per_step"] / r["twin_analytic_flops_per_step"],
                       0.9, 1.3)
    self.assertEqual(r["peak_memory_bytes"], "n/a")          # CPU has no stats
    self.assertEqual(r["torch_precision"], "float32")
    self.assertEqual(r["masking_mode"], demo_config().masking.mode)
    table = bench.format_table(r)
    for row in ("| step time |", "| MFU |", "| twin / open_clip step time |",
                "| eval texts/s |"):
      self.assertIn(row, table)

  def test_open_clip_model_matches_our_size(self):
    import open_clip  # pylint: disable=g-import-not-at-top
    twin_config = bench.plain_clip_twin(demo_config())
    cfg = sizes.model_config(twin_config)
    host = bench.synthetic_batch(twin_config, cfg, 2)
    torch_step = bench.TorchTrainStep(twin_config, cfg, host)
    ours = jax.eval_shape(lambda: clip.init_params(cfg))
    ours_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ours))
    # Long-CLIP's second positional table is ours only (same shape as the first).
    extra = int(np.prod(ours["text"]["positional_embedding_res"].shape))
    theirs_count = sum(p.numel() for p in torch_step.model.parameters())
    self.assertEqual(theirs_count, ours_count - extra)
    self.assertIsInstance(torch_step.model, open_clip.CLIP)
    torch_step()                                             # one real step runs
    torch_step()

  def test_cli_writes_json(self):
    root = os.path.join(os.path.dirname(__file__), "..")
    out = os.path.join(tempfile.mkdtemp(), "bench.json")
    proc = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.tools.bench", "--config=configs/demo.py",
         "--config.data.global_batch=8", "--steps=1", "--warmup=1",
         "--eval_steps=1", f"--json={out}"],
        cwd=root, capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    result = json.load(open(out))
    self.assertIn("| images/s |", proc.stdout)
    self.assertEqual(result["batch"], 8)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "steps"):
      bench.run_benchmark(demo_config(), steps=0)
    with self.assertRaisesRegex(ValueError, "batch"):
      bench.run_benchmark(demo_config(), batch=0, steps=1)


if __name__ == "__main__":
  absltest.main()
