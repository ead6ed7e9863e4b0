"""Evaluation report files: JSON history merge, markdown table, PNG plots."""
import json
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest

from fixclip_jax import fileio
from fixclip_jax.evaluation import report
from tests import fileio_test

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _retrieval(dataset, protocol, r1):
  return {"dataset": dataset, "protocol": protocol, "num_images": 10,
          "num_texts": 50, "i2t_R@1": r1, "i2t_R@5": r1 + 10.0,
          "i2t_R@10": r1 + 20.0, "t2i_R@1": r1 - 5.0, "t2i_R@5": r1 + 5.0,
          "t2i_R@10": r1 + 15.0}


class ReportTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)

  def _path(self, name):
    return os.path.join(self.workdir, name)

  def _read_json(self):
    with open(self._path(report.JSON_NAME)) as f:
      return json.load(f)["results"]

  def _hidden_files(self):
    """Temporary files of fileio (hidden names) left in the workdir."""
    return [n for n in os.listdir(self.workdir) if n.startswith(".")]

  def test_files_written_and_parseable(self):
    report.write_report(self.workdir, [
        _retrieval("urban1k", "urban1k", 60.0),
        _retrieval("coco", "coco-karpathy-test-5000", 40.0),
        {"dataset": "imagenet", "protocol": "zeroshot-1000cls-80templates",
         "top1": 55.5, "top5": 80.25, "num_images": 100}],
                        model="longclip-B/16")
    results = self._read_json()
    self.assertLen(results, 3)
    self.assertEqual({r["model"] for r in results}, {"longclip-B/16"})
    self.assertIsNone(results[0]["step"])
    with open(self._path(report.MARKDOWN_NAME)) as f:
      lines = f.read().strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    # The protocol's numbers (absent here: '-') follow its name.
    self.assertEqual(header[:8], ["model", "step", "dataset", "protocol",
                                  "image_size", "text_context", "i2t_R@1", "i2t_R@5"])
    self.assertIn("top1", header)
    self.assertLen(lines, 2 + 3)
    rows = {r.split("|")[3].strip(): r for r in lines[2:]}
    self.assertIn("| 60.00 |", rows["urban1k"])
    imagenet = [c.strip() for c in rows["imagenet"].strip("|").split("|")]
    self.assertEqual(imagenet[header.index("top5")], "80.25")
    self.assertEqual(imagenet[header.index("i2t_R@1")], "-")
    with open(self._path(report.RECALL_PNG), "rb") as f:
      png = f.read()
    self.assertGreater(len(png), 1000)
    self.assertTrue(png.startswith(_PNG_MAGIC))
    # No step anywhere: no history plot.
    self.assertFalse(os.path.exists(self._path(report.HISTORY_PNG)))
    self.assertEqual(self._hidden_files(), [])

  def test_history_merges_per_step(self):
    for step, r1 in ((100, 20.0), (200, 30.0)):
      report.write_report(self.workdir, [
          _retrieval("synthetic", "synthetic-long", r1),
          _retrieval("synthetic", "synthetic-short", r1 + 1)], model="m", step=step)
    # Re-evaluating step 200 replaces it rather than duplicating it.
    report.write_report(self.workdir, [
        _retrieval("synthetic", "synthetic-long", 35.0)], model="m", step=200)
    results = self._read_json()
    self.assertLen(results, 4)
    long = [(r["step"], r["i2t_R@1"]) for r in results
            if r["protocol"] == "synthetic-long"]
    self.assertEqual(long, [(100, 20.0), (200, 35.0)])
    with open(self._path(report.HISTORY_PNG), "rb") as f:
      self.assertTrue(f.read().startswith(_PNG_MAGIC))
    self.assertGreater(os.path.getsize(self._path(report.HISTORY_PNG)), 1000)

  def test_bad_result_leaves_existing_files_alone(self):
    report.write_report(self.workdir, [_retrieval("urban1k", "urban1k", 60.0)],
                        model="m", step=1)
    before = {n: open(self._path(n), "rb").read() for n in os.listdir(self.workdir)}
    with self.assertRaisesRegex(ValueError, "i2t_R@1"):
      report.write_report(self.workdir, [_retrieval("dci", "dci-long", float("nan"))],
                          model="m", step=2)
    with self.assertRaisesRegex(ValueError, "protocol"):
      report.write_report(self.workdir, [{"dataset": "x", "top1": 1.0}])
    after = {n: open(self._path(n), "rb").read() for n in os.listdir(self.workdir)}
    self.assertEqual(before, after)

  def test_failure_while_writing_keeps_old_json(self):
    report.write_report(self.workdir, [_retrieval("urban1k", "urban1k", 60.0)],
                        model="m", step=1)
    with open(self._path(report.JSON_NAME), "rb") as f:
      before = f.read()
    real_replace = os.replace

    def failing_replace(src, dst):
      if dst.endswith(".md"):
        raise OSError("disk full")
      return real_replace(src, dst)

    with mock.patch.object(fileio.os, "replace", failing_replace):
      with self.assertRaisesRegex(OSError, "disk full"):
        report.write_report(self.workdir, [_retrieval("dci", "dci-long", 50.0)],
                            model="m", step=2)
    # Every file is either wholly old or wholly new (the JSON, written first,
    # is new; the markdown kept its old content); no temp files are left.
    self.assertEqual(self._hidden_files(), [])
    self.assertEqual([r["dataset"] for r in self._read_json()], ["urban1k", "dci"])
    with open(self._path(report.MARKDOWN_NAME)) as f:
      md = f.read()
    self.assertIn("urban1k", md)
    self.assertNotIn("dci", md)
    self.assertTrue(before)

  def test_corrupt_json_is_not_overwritten(self):
    with open(self._path(report.JSON_NAME), "w") as f:
      f.write("{not json")
    with self.assertRaisesRegex(ValueError, "not valid JSON"):
      report.write_report(self.workdir, [_retrieval("urban1k", "urban1k", 1.0)])
    with open(self._path(report.JSON_NAME)) as f:
      self.assertEqual(f.read(), "{not json")


class ProtocolFieldsTest(absltest.TestCase):

  def test_protocol_numbers_are_keys_and_checked(self):
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    rows = [dict(_retrieval("coco", "coco-karpathy-test-5000", 40.0), image_size=size,
                 text_context=77) for size in (224, 336)]
    merged = report.write_report(workdir, rows, model="m")
    self.assertLen(merged, 2)  # 224 px and 336 px are two protocols
    self.assertIn("Protocol: images at 336 px (coco-karpathy-test-5000: 224)",
                  report.console_table(merged))
    # Per model when the models' protocols differ (the demo: a 77-token start).
    start = [dict(r, model="start", text_context=77) for r in rows[:1]]
    self.assertIn("Protocol: images at 224 px; text cut at 77 tokens for start, "
                  "248 tokens for m (coco-karpathy-test-5000: 77)",
                  report.console_table(start + [dict(rows[0], model="m", text_context=248),
                                                dict(rows[0], model="m")]))
    with self.assertRaisesRegex(ValueError, "'image_size' = '224' is not a positive int"):
      report.write_report(workdir, [dict(rows[0], image_size="224")])


class ConsoleAndCurvesTest(absltest.TestCase):

  def test_console_table_has_the_columns_present(self):
    table = report.console_table([
        dict(_retrieval("synthetic", "synthetic-long", 20.0), step=0),
        {"dataset": "imagenet", "protocol": "zeroshot-1000cls-80templates",
         "step": 5, "top1": 55.5, "top5": 80.25}]).splitlines()
    self.assertEqual(table[0], "| step | benchmark | I2T R@1 | I2T R@10 | T2I R@1 | "
                     "T2I R@10 | top-1 | top-5 |")
    self.assertEqual(table[2], "| 0 | synthetic-long | 20.00 | 40.00 | 15.00 | "
                     "35.00 | - | - |")
    self.assertEqual(table[3], "| 5 | imagenet (zeroshot-1000cls-80templates) | - | "
                     "- | - | - | 55.50 | 80.25 |")

  def test_train_curves_png(self):
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    self.assertIsNone(report.write_train_curves(workdir, []))
    rows = [{"step": s, "loss": 5.0 / s, "loss_long": 2.0 / s, "lr": 1e-3 * s,
             "images_per_s": 30.0} for s in range(1, 6)]
    rows.append({"step": 5, "eval/synthetic-long/i2t_R@1": 10.0})  # no loss: skipped
    path = report.write_train_curves(workdir, rows)
    self.assertEqual(path, os.path.join(workdir, report.TRAIN_PNG))
    with open(path, "rb") as f:
      self.assertTrue(f.read().startswith(_PNG_MAGIC))
    self.assertGreater(os.path.getsize(path), 5000)


class UrlWorkdirTest(absltest.TestCase):

  def test_history_in_a_bucket(self):
    bucket = self.enter_context(fileio_test.fake_bucket())
    workdir = "gs://b/run"
    for step, r1 in ((100, 20.0), (200, 30.0)):
      report.write_report(workdir, [_retrieval("urban1k", "urban1k", r1)],
                          model="m", step=step)
    self.assertEqual(sorted(bucket.store), [
        f"/b/run/{name}" for name in sorted((
            report.JSON_NAME, report.MARKDOWN_NAME, report.RECALL_PNG,
            report.HISTORY_PNG))])
    self.assertEqual([(r["step"], r["i2t_R@1"]) for r in report.read_results(workdir)],
                     [(100, 20.0), (200, 30.0)])
    with (fileio.path(workdir) / report.HISTORY_PNG).open("rb") as f:
      self.assertTrue(f.read().startswith(_PNG_MAGIC))


if __name__ == "__main__":
  absltest.main()
