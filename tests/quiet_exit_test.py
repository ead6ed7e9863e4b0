"""A run with grain worker processes ends quietly (issue 25 item 5): no
"resource_tracker: There appear to be N leaked shared_memory objects" warning
at exit, and whatever reaches stderr is one absl line per warning.

Worker processes hand batches over in shared memory; a batch still held when
the process ends (the prefetch thread's, the queued one, the loop's last) was
never unlinked, and Python's resource tracker said so in a two-line
UserWarning (pipeline.BackgroundBatches.close, pipeline.own_memory).
"""
import os
import re
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# absl's one-line warnings and errors: "W1204 15:02:11.123 file.py:12] ...".
_ABSL_LINE = re.compile(r"^[WE]\d{4} \d\d:\d\d:\d\d")
_XLA_SLOW_COMPILE = re.compile(r"^\*+$|Very slow compile\?|slow_operation_alarm|"
                               r"^The operation took ")

# The train loop's data path alone: BackgroundBatches over a pipeline with one
# worker process, a few batches taken, closed, the process ends.
_PIPELINE_SCRIPT = textwrap.dedent("""
    import time
    from absl import app
    from fixclip_jax import config_base
    from fixclip_jax.data import pipeline, sources, synthetic, tokenizers

    def main(argv):
      c = config_base.base_config().data
      c.type, c.image_size, c.global_batch, c.num_workers = "synthetic", 24, 4, 1
      c.read_threads, c.prefetch_buffer = 2, 8
      src = sources.InMemorySource(synthetic.synthetic_examples(20, image_size=32))
      tok = tokenizers.get_tokenizer("clip", context_length=248)
      with pipeline.BackgroundBatches(pipeline.make_train_iterator(
          c, tok, source=src, process_index=0, process_count=1)) as batches:
        for _ in range(3):
          batch = batches.next()
        time.sleep(2)  # a train step: the thread fetches ahead meanwhile
      print("batch", type(batch["image"]).__name__, flush=True)

    if __name__ == "__main__":
      app.run(main)
    """)


def _env():
  return dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))


class QuietExitTest(absltest.TestCase):

  def _assert_quiet(self, stderr: str):
    self.assertNotIn("resource_tracker", stderr)
    self.assertNotIn("leaked", stderr)
    for line in stderr.splitlines():
      # XLA's own alarm when a compile is slow (a loaded machine): its C++
      # log, not ours, and not about this run's data.
      if not line.strip() or _XLA_SLOW_COMPILE.search(line):
        continue
      self.assertRegex(line, _ABSL_LINE, f"not a one-line warning:\n{stderr}")

  def test_pipeline_with_a_worker_process_leaves_no_shared_memory(self):
    script = os.path.join(tempfile.mkdtemp(), "pipeline_run.py")
    with open(script, "w") as f:
      f.write(_PIPELINE_SCRIPT)
    # Before the fix, each run left the prefetch thread's batch (5 arrays).
    for _ in range(2):
      proc = subprocess.run([sys.executable, script], cwd=_ROOT, env=_env(),
                            capture_output=True, text=True, timeout=300)
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      # The loop gets batches in its own memory, not grain's shared memory.
      self.assertIn("batch ndarray", proc.stdout)
      self._assert_quiet(proc.stderr)

  def test_training_with_num_workers_1_ends_quietly(self):
    workdir = os.path.join(tempfile.mkdtemp(), "run")
    # Plain CLIP at 77 tokens, one text length: the data path is what is
    # tested, so the step compiles fast (tests/faults_test.py's flags).
    plain = ["--config.objective=clip", "--config.model.num_prompts=0",
             "--config.model.mask_token=False", "--config.model.gta_groups=0",
             "--config.model.context_length=77", "--config.data.text_context=77",
             "--config.data.short_context=77", "--config.data.long_buckets=()",
             "--config.data.short_buckets=()", "--config.optim.frozen_regex=",
             "--config.optim.new_params_regex="]
    proc = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.main", "--config=configs/demo.py",
         f"--workdir={workdir}", "--mode=train", "--config.data.num_workers=1",
         "--config.data.global_batch=8", "--config.data.synthetic_num=64",
         "--config.num_train_steps=2", "--config.log_every=1",
         "--config.checkpoint_every=100", "--config.eval_every=0",
         "--config.eval_at_start=False", "--config.pretrain77.steps=0", *plain],
        cwd=_ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("[2/2] loss=", proc.stdout)
    self._assert_quiet(proc.stderr)


if __name__ == "__main__":
  absltest.main()
