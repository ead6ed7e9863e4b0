"""metrics.py: metrics.jsonl rows, the config in TensorBoard, optional W&B."""
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import types
from unittest import mock

from absl.testing import absltest

from fixclip_jax import config_base
from fixclip_jax import metrics


def _hangs_on_a_full_disk(run, timeout_s: float = 60.0) -> bool:
  """Runs `run` in a thread while every TensorBoard record write fails with
  ENOSPC (tensorboardX's writer thread dies at its first); whether it is
  still running after timeout_s."""
  def no_space(self, data):
    raise OSError(28, "No space left on device")
  with mock.patch("tensorboardX.record_writer.RecordWriter.write", no_space), \
       mock.patch.object(threading, "excepthook", lambda args: None):
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=timeout_s)
  return thread.is_alive()


class _FakeRun:
  def __init__(self, **kwargs):
    self.init_kwargs = kwargs
    self.logged = []
    self.finished = False

  def log(self, row, step):
    self.logged.append((step, dict(row)))

  def finish(self):
    self.finished = True


class MetricsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)

  def test_rows_merge_per_step_and_skip_a_cut_line(self):
    writer = metrics.MetricWriter(self.workdir, tensorboard=False)
    writer.write(1, {"loss": 3.0})
    writer.write(2, {"loss": 2.0})
    writer.write(2, {"eval/x/i2t_R@1": 10.0})
    writer.write(1, {"loss": 2.5})  # a resumed run logs step 1 again
    writer.close()
    with open(os.path.join(self.workdir, metrics.METRICS_FILE), "a") as f:
      f.write('{"step": 3, "lo')  # cut short by a crash
    rows = metrics.read_metrics(self.workdir)
    self.assertEqual(rows, [{"step": 1, "loss": 2.5},
                            {"step": 2, "loss": 2.0, "eval/x/i2t_R@1": 10.0}])
    self.assertEqual(metrics.read_metrics(os.path.join(self.workdir, "none")), [])

  def test_a_dead_tensorboard_writer_is_an_error_not_a_hang(self):
    # A full disk kills tensorboardX's writer thread at its first failed
    # write; its bounded queue then blocked add_scalar forever (the trainer
    # hung instead of stopping). Now the next write raises one OSError.
    outcome = {}
    writer = metrics.MetricWriter(self.workdir)   # its first event written

    def run():
      try:
        for step in range(1000):
          writer.write(step, {f"loss_{i}": 1.0 for i in range(8)})
          time.sleep(0.01)
        outcome["error"] = None
      except OSError as e:
        outcome["error"] = str(e)
      writer.close()
      outcome["closed"] = True

    self.assertFalse(_hangs_on_a_full_disk(run), "MetricWriter hung on a dead writer")
    self.assertIn("TensorBoard", outcome["error"])
    self.assertIn(os.path.join(self.workdir, metrics.TB_SUBDIR),
                  outcome["error"])
    self.assertTrue(outcome["closed"])
    with open(os.path.join(self.workdir, metrics.METRICS_FILE)) as f:
      self.assertGreater(len(f.readlines()), 0)   # rows before it are kept

  def test_a_writer_dying_inside_a_row_is_an_error_not_a_hang(self):
    # The soak's 3000-step run: the thread died at a write inside a row of
    # scalars while add_scalar waited on its queue of 10 (the check before
    # each row saw it alive); the trainer hung until SIGKILLed.
    outcome = {}
    writer = metrics.MetricWriter(self.workdir)

    def run():
      try:
        writer.write(1, {f"loss_{i}": 1.0 for i in range(64)})
        outcome["row"] = "written"
        writer._tb._get_file_writer().event_writer._worker.join(30)  # pylint: disable=protected-access
        writer.write(2, {"loss": 1.0})
      except OSError as e:
        outcome["error"] = str(e)
      writer.close()

    self.assertFalse(_hangs_on_a_full_disk(run), "MetricWriter hung inside a row")
    self.assertEqual(outcome.get("row"), "written")
    self.assertIn("writer thread stopped", outcome["error"])

  def test_config_goes_to_tensorboard_as_text(self):
    config = config_base.base_config()
    flat = metrics.flatten_config(config)
    self.assertEqual(flat["optim.lr"], config.optim.lr)
    self.assertEqual(flat["wandb.project"], "")
    table = metrics.config_markdown(flat)
    self.assertIn("| optim.lr | 1e-06 |", table)
    writer = metrics.MetricWriter(self.workdir, hparams=flat, wandb=config.wandb)
    writer.close()
    events = os.listdir(os.path.join(self.workdir, metrics.TB_SUBDIR))
    self.assertLen(events, 1)

  def test_wandb_is_optional_and_off_by_default(self):
    config = config_base.base_config()
    with mock.patch.dict(sys.modules, {"wandb": None}):  # not installed
      writer = metrics.MetricWriter(
          self.workdir, tensorboard=False,
          hparams=metrics.flatten_config(config), wandb=config.wandb)
      writer.write(1, {"loss": 1.0})
      writer.close()
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: runs.append(_FakeRun(**kwargs)) or runs[-1]
    config.wandb.project = "fixclip-tests"
    config.wandb.mode = "offline"
    with mock.patch.dict(sys.modules, {"wandb": fake}):
      writer = metrics.MetricWriter(
          self.workdir, tensorboard=False,
          hparams=metrics.flatten_config(config), wandb=config.wandb)
      writer.write(3, {"loss": 0.5})
      writer.close()
    (run,) = runs
    self.assertEqual(run.init_kwargs["project"], "fixclip-tests")
    self.assertEqual(run.init_kwargs["mode"], "offline")
    self.assertEqual(run.init_kwargs["name"], os.path.basename(self.workdir))
    self.assertEqual(run.init_kwargs["config"]["optim.lr"], config.optim.lr)
    self.assertEqual(run.logged, [(3, {"loss": 0.5})])
    self.assertTrue(run.finished)
    with open(os.path.join(self.workdir, metrics.METRICS_FILE)) as f:
      self.assertLen([json.loads(line) for line in f], 2)


if __name__ == "__main__":
  absltest.main()
