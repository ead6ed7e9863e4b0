"""Tests for fixclip_jax.tools.data_bench (input pipeline throughput)."""
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl import flags
from absl.testing import absltest
import numpy as np
from PIL import Image

from fixclip_jax.data import sources
from fixclip_jax.tools import data_bench as bench

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _tempdir(test: absltest.TestCase) -> str:
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


class WriteBenchDatasetTest(absltest.TestCase):

  def test_files_decode_and_have_photo_like_noise(self):
    root = _tempdir(self)
    manifest = bench.write_bench_dataset(os.path.join(root, "d"), 3,
                                         render_size=64)
    src = sources.JsonlSource(manifest)
    self.assertLen(src, 3)
    img = Image.open(io.BytesIO(src[1]["image"]))
    self.assertEqual((img.format, img.size), ("JPEG", (64, 64)))
    self.assertGreater(len(src[1]["caption"]), len(src[1]["short_caption"]))
    # The noise: a flat render would have few distinct colours.
    pixels = np.asarray(img).reshape(-1, 3)
    self.assertGreater(len(np.unique(pixels, axis=0)), 1000)
    png = bench.write_bench_dataset(os.path.join(root, "p"), 1, 32, fmt="png")
    self.assertEqual(Image.open(io.BytesIO(
        sources.JsonlSource(png)[0]["image"])).format, "PNG")

  def test_errors_leave_nothing_behind(self):
    root = _tempdir(self)
    with self.assertRaisesRegex(ValueError, "gif"):
      bench.write_bench_dataset(os.path.join(root, "d"), 1, 32, fmt="gif")
    self.assertEqual(os.listdir(root), [])
    os.makedirs(os.path.join(root, "taken"))
    with self.assertRaisesRegex(FileExistsError, "taken"):
      bench.write_bench_dataset(os.path.join(root, "taken"), 1, 32)
    with self.assertRaisesRegex(FileNotFoundError, "nope.jsonl"):
      bench.run_bench(num=4, source=os.path.join(root, "nope.jsonl"))


class RunBenchTest(absltest.TestCase):

  def test_tiny_run_in_process_and_with_a_worker(self):
    # grain spawns workers that read absl flags: parse them under pytest.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    # 48 images of 128 px: enough CPU time for /proc's 10 ms ticks.
    result = bench.run_bench(num=48, image_size=32, num_workers=(0, 1),
                             render_size=128, jpeg_draft=(True, False),
                             batch=4, num_files=6, stage_images=4)
    self.assertLen(result["rows"], 4)
    self.assertEqual([(r["num_workers"], r["jpeg_draft"])
                      for r in result["rows"]],
                     [(0, True), (0, False), (1, True), (1, False)])
    for row in result["rows"]:
      self.assertEqual(row["images"], 48)
      for key in ("seconds", "images_per_s", "images_per_s_per_process",
                  "cpu_s", "images_per_cpu_s"):
        self.assertGreater(row[key], 0, msg=key)
    stages = result["stages"]
    self.assertLen(stages["ms_per_image"], 7)
    for name, ms in stages["ms_per_image"].items():
      self.assertGreater(ms, 0, msg=name)
    self.assertGreater(stages["images_per_s_one_core_jpeg_draft"], 0)
    self.assertGreater(result["mean_file_kb"], 0)
    table = bench.format_table(result)
    self.assertIn("| workers |", table)
    self.assertIn("| 1 | ", table)
    self.assertIn("decode (full size)", table)
    json.dumps(result)  # --json can write it

  def test_process_tree_cpu_counts_this_process(self):
    before = bench.process_tree_cpu_s()
    x = 0
    for i in range(2_000_000):
      x += i
    self.assertGreater(bench.process_tree_cpu_s(), before)


def _run_cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "fixclip_jax.tools.data_bench", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=600)


class MainTest(absltest.TestCase):

  def test_importing_defines_no_flags(self):
    # Its flags (--batch, --json, ...) would clash with tools.bench's.
    self.assertNotIn("jpeg_draft", flags.FLAGS)
    self.assertNotIn("render_size", flags.FLAGS)

  def test_cli_prints_the_table_and_writes_json(self):
    path = os.path.join(_tempdir(self), "out", "bench.json")
    proc = _run_cli("--num=4", "--image_size=32", "--num_workers=0",
                    "--render_size=64", "--batch=2", "--num_files=2",
                    f"--json={path}")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("| workers |", proc.stdout)
    with open(path) as f:
      result = json.load(f)
    self.assertEqual(result["rows"][0]["images"], 4)
    self.assertEqual(os.listdir(os.path.dirname(path)), ["bench.json"])
    bad = _run_cli("--jpeg_draft=maybe")
    self.assertNotEqual(bad.returncode, 0)
    self.assertIn("maybe", bad.stderr)


if __name__ == "__main__":
  absltest.main()
