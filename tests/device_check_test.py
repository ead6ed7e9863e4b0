"""tools/device_check.py: the accelerator check, run here as --cpu-smoke
(tiny models, batch 8, 2 steps, the same parts and code), so that it still
runs when a GPU is lent; and its budget, timeouts and records."""
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest

from fixclip_jax import cli
from fixclip_jax.tools import ablate
from fixclip_jax.tools import device_check
from fixclip_jax.tools import device_parts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Generous: the smoke compiles two tiny train steps and a few towers; at load
# 20 on 2 cores a train step took 5 minutes (BENCHMARKS.md "Accelerator check").
_SMOKE_BUDGET_S = 1800


def _read(out_dir, name):
  with open(os.path.join(out_dir, name)) as f:
    return json.load(f)


class CpuSmokeTest(absltest.TestCase):
  """The whole check as a user runs it (one command, $OUT as the folder).

  Measured on the shared 2-core VM: 19.6 min at load 17-25 (a tiny train
  step's compilation alone took 5 minutes); 6-8 min at load ~12.
  FIXCLIP_SKIP_SLOW=1 skips it (as tests/soak_test.py)."""

  @absltest.skipIf(os.environ.get("FIXCLIP_SKIP_SLOW") == "1",
                   "FIXCLIP_SKIP_SLOW=1")
  def test_every_part_runs_and_records(self):
    out = tempfile.mkdtemp()
    env = dict(os.environ, OUT=out)
    # The check ends itself within its budget (parts past it are skipped).
    # Compilations are kept between runs of the suite (a changed program
    # is simply compiled again).
    cache = os.path.join(tempfile.gettempdir(), "fixclip_device_check_smoke_cache")
    proc = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.tools.device_check", "--cpu-smoke",
         f"--budget_s={_SMOKE_BUDGET_S}", "--parts=env,gpu_tests,bench",
         f"--cache_dir={cache}"],
        cwd=REPO, env=env, capture_output=True, text=True,
        timeout=_SMOKE_BUDGET_S + 120)
    self.assertEqual(proc.returncode, 0, proc.stdout[-4000:] + proc.stderr[-2000:])
    # At most 8 files come back from the device tool's $OUT.
    self.assertCountEqual(os.listdir(out), [
        device_check.LOG_FILE, device_check.SUMMARY_FILE, "env.json",
        "gpu_tests.json", "bench.json"])
    summary = _read(out, device_check.SUMMARY_FILE)
    self.assertEqual({n: p["status"] for n, p in summary["parts"].items()},
                     {"env": "ok", "gpu_tests": "ok", "bench": "ok"})
    self.assertTrue(summary["cpu_smoke"])

    env_part = _read(out, "env.json")
    self.assertEqual(env_part["results"]["backend"], "cpu")
    self.assertEqual(env_part["results"]["missing_modules"], [])
    self.assertGreater(env_part["results"]["bf16_matmul"]["tflops"], 0)

    tests = _read(out, "gpu_tests.json")["results"]
    parity = tests["towers_vs_open_clip_tiny"]
    self.assertLess(max(parity["rel_err_highest"].values()), 1e-4)
    self.assertGreater(tests["bf16_vs_float32"]["image"]["min_cosine"], 0.99)
    step = tests["fixclip_step_vs_cpu"]
    # The "device" is this CPU: float32 there is the reference step itself.
    self.assertEqual(step["float32"]["rel_err"], {"loss": 0.0, "grad_norm": 0.0})
    self.assertTrue(step["float32"]["finite"])
    self.assertEqual(step["float32"]["skipped"], 0)

    bench = _read(out, "bench.json")["results"]
    clip_row = bench["clip_b16"]["row"]
    self.assertEqual(clip_row["batch"], 8)
    self.assertGreater(clip_row["images_per_s"], 0)
    self.assertGreater(clip_row["twin_speedup_over_open_clip"], 0)
    attention = bench["attention_clip_b16"]
    self.assertGreater(attention["xla"]["images_per_s"], 0)
    self.assertIn("needs a GPU", attention["cudnn"]["skipped"])
    self.assertNotIn("fixclip_b16", bench)  # the smoke runs one of each kind

    with open(os.path.join(out, device_check.LOG_FILE)) as f:
      log = f.read()
    for part in ("env", "gpu_tests", "bench"):
      self.assertIn(f"--- {part}: ok", log)


class AblatePartTest(absltest.TestCase):
  """The ablate part's own logic. Its smoke (`--cpu-smoke --parts=ablate`:
  a 1-step CLIP-77 and CLIP-248 with their evaluations) took 577 s on this
  2-core machine at load 14, too long for the suite; tools/ablate.run_ablation
  itself is run by tests/ablate_test.py."""

  def test_discriminative_budget_at_four_times_its_steps(self):
    base = ablate.BUDGETS["discriminative"]
    budget, note = device_parts.ablate_budget(smoke=False)
    self.assertEqual((budget.pretrain_steps, budget.finetune_steps),
                     (4 * base.pretrain_steps, 4 * base.finetune_steps))
    self.assertEqual((budget.batch, budget.eval_num), (base.batch, base.eval_num))
    self.assertIn("4x", note)

  def test_a_missing_budget_is_skipped_with_a_line(self):
    # A fixed set, so that adding a budget to ablate.py does not change the line.
    others = {k: ablate.BUDGETS[k] for k in ("demo", "small")}
    results = device_check.Results(os.path.join(tempfile.mkdtemp(), "r.json"))
    with mock.patch.dict(ablate.BUDGETS, others, clear=True), \
        mock.patch.object(ablate, "run_ablation") as run_ablation:
      self.assertTrue(device_parts.run_ablate(results, False, tempfile.mkdtemp()))
    run_ablation.assert_not_called()
    self.assertIn("no budget 'discriminative' (has: demo, small)",
                  results.data["skipped"])

  def test_variants_run_one_at_a_time_headline_pair_first(self):
    results = device_check.Results(os.path.join(tempfile.mkdtemp(), "r.json"))
    calls = []

    def fake_run(workdir, budget_name, seeds, variants):
      calls.append(tuple(variants))
      self.assertEqual(ablate.BUDGETS[budget_name].pretrain_steps,
                       4 * ablate.BUDGETS["discriminative"].pretrain_steps)
      return {"runs": [{"variant": variants[0]}], "wall_seconds": 1.0,
              "rows": [], "paired_rows": [], "budget": {}, "seeds": list(seeds)}

    with mock.patch.object(ablate, "run_ablation", side_effect=fake_run), \
        mock.patch.object(ablate, "markdown", return_value="table"):
      self.assertTrue(device_parts.run_ablate(results, False, tempfile.mkdtemp()))
    self.assertEqual(calls[:2], [("clip248",), ("fixclip",)])
    self.assertCountEqual([c[0] for c in calls], [v[0] for v in ablate.VARIANTS])
    self.assertEqual(results.data["variant_fixclip"]["runs"],
                     [{"variant": "fixclip"}])


class OrchestrationTest(absltest.TestCase):
  """Budget, timeouts and error lines, with stand-in parts (fast)."""

  def _parts(self, code_by_part, timeouts=None):
    """PARTS whose processes run `python -c CODE` (CODE may write the
    results file, sys.argv[1])."""
    parts = tuple(device_check.Part(name, "unused", (timeouts or {}).get(name, 30),
                                    f"stand-in {name}")
                  for name in code_by_part)

    def fake_popen(cmd, **kwargs):
      name = cmd[3][len("--part="):]
      result = cmd[4][len("--result="):]
      return real_popen([sys.executable, "-c", code_by_part[name], result], **kwargs)

    real_popen = subprocess.Popen
    return (mock.patch.object(device_check, "PARTS", parts),
            mock.patch.object(device_check, "PART_NAMES", tuple(code_by_part)),
            mock.patch.object(device_check.subprocess, "Popen", side_effect=fake_popen))

  def run_parts(self, code_by_part, budget_s=60, timeouts=None):
    out = tempfile.mkdtemp()
    patches = self._parts(code_by_part, timeouts)
    with patches[0], patches[1], patches[2]:
      summary = device_check.run_check(out, tuple(code_by_part), budget_s)
    return out, summary

  def test_timeout_keeps_what_the_part_recorded_and_the_next_part_runs(self):
    out, summary = self.run_parts({
        "slow": ("import json, sys, time\n"
                 "json.dump({'first': 1}, open(sys.argv[1], 'w'))\n"
                 "print('working', flush=True)\ntime.sleep(60)"),
        "fine": "print('fine')",
    }, timeouts={"slow": 3})
    self.assertEqual(summary["parts"]["slow"]["status"], "timeout")
    self.assertLess(summary["parts"]["slow"]["wall_s"], 30)
    self.assertEqual(_read(out, "slow.json")["results"], {"first": 1})
    self.assertEqual(summary["parts"]["fine"]["status"], "ok")
    with open(os.path.join(out, device_check.LOG_FILE)) as f:
      log = f.read()
    self.assertIn("working", log)
    self.assertIn("--- slow: timeout", log)

  def test_failures_give_one_error_line(self):
    _, summary = self.run_parts({
        "crash": "raise ModuleNotFoundError(\"No module named 'grain'\")",
        "check": ("import json, sys\njson.dump({'parity': {'ok': False, "
                  "'error': 'rel err 0.3'}}, open(sys.argv[1], 'w'))\nsys.exit(1)"),
        "skip": ("import json, sys\njson.dump({'skipped': 'no budget named x'}, "
                 "open(sys.argv[1], 'w'))"),
    })
    parts = summary["parts"]
    self.assertEqual(parts["crash"]["status"], "failed")
    self.assertEqual(parts["crash"]["error"],
                     "ModuleNotFoundError: No module named 'grain'")
    self.assertEqual((parts["check"]["status"], parts["check"]["error"]),
                     ("failed", "parity: rel err 0.3"))
    self.assertEqual((parts["skip"]["status"], parts["skip"]["error"]),
                     ("skipped", "no budget named x"))

  def test_parts_past_the_budget_are_skipped(self):
    out, summary = self.run_parts({"a": "print(1)", "b": "print(2)"},
                                  budget_s=device_check.MIN_PART_S - 1)
    self.assertEqual([p["status"] for p in summary["parts"].values()],
                     ["skipped", "skipped"])
    self.assertIn("budget left", _read(out, "b.json")["error"])

  def test_output_folder(self):
    with mock.patch.dict(os.environ, {"DEVICE_CHECK_OUT": "", "OUT": "/o"}):
      self.assertEqual(device_check.output_dir(None), "/o")
      self.assertEqual(device_check.output_dir("/x"), "/x")
    with mock.patch.dict(os.environ, {"DEVICE_CHECK_OUT": "", "OUT": ""}):
      with self.assertRaisesRegex(cli.UserError, "--out=DIR"):
        device_check.output_dir(None)
    with self.assertRaisesRegex(cli.UserError, "unknown part.*nope"):
      device_check.run_check(tempfile.mkdtemp(), ("env", "nope"))


if __name__ == "__main__":
  absltest.main()
