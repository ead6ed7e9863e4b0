"""Tests for fixclip_jax.tools.ablate: fair configs, the table, a small run."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest

from fixclip_jax import train
from fixclip_jax.tools import ablate

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DATA = {"train": "/data/train/manifest.jsonl",
         "finetune": "/data/finetune/manifest.jsonl", "eval": "/data/eval"}


def _tempdir(test: absltest.TestCase) -> str:
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _finetunes(budget="medium", seed=0):
  b = ablate.BUDGETS[budget]
  return {name: ablate.finetune_config(b, seed, _DATA, "/runs/clip77", overrides)
          for name, _, overrides in ablate.VARIANTS}


class ConfigTest(absltest.TestCase):

  def test_pretrain_is_plain_clip_at_77_tokens(self):
    c = ablate.pretrain_config(ablate.BUDGETS["medium"], 1, _DATA)
    self.assertEqual(c.objective, "clip")
    self.assertEqual((c.model.context_length, c.data.text_context), (77, 77))
    self.assertIsNone(c.model.positional_keep)
    self.assertEqual(c.optim.frozen_regex, "")  # its one table trains
    self.assertEqual((c.model.num_prompts, c.model.mask_token,
                      c.model.gta_groups), (0, False, 0))
    self.assertEqual(c.init_from, "")
    self.assertEqual((c.seed, c.data.shuffle_seed), (1, 1))
    self.assertEqual(c.data.path, _DATA["train"])

  def test_finetunes_share_the_budget_and_differ_in_one_knob(self):
    configs = _finetunes()
    self.assertEqual(
        [n for n, _, _ in ablate.VARIANTS],
        ["clip248", "longclip", "fixclip", "fixclip_fresh", "fixclip_no_prompts",
         "fixclip_no_masking", "fixclip_no_gta", "fixclip_no_short",
         "fixclip_mask50"])
    for name, c in configs.items():
      with self.subTest(name):
        self.assertEqual(c.init_from, "/runs/clip77")
        self.assertEqual(c.data.path, _DATA["finetune"])
        self.assertEqual((c.model.context_length, c.data.text_context),
                         (248, 248))
        self.assertEqual(c.model.positional_keep, 20)
        self.assertEqual(c.optim.frozen_regex, r"text/positional_embedding")
        for key in ("num_train_steps", "seed"):
          self.assertEqual(c[key], configs["fixclip"][key])
        for key in ("global_batch", "path", "shuffle_seed"):
          self.assertEqual(c.data[key], configs["fixclip"].data[key])
        self.assertEqual(c.optim.to_dict(), configs["fixclip"].optim.to_dict())
        self.assertEqual(c.eval.to_dict(), configs["fixclip"].eval.to_dict())
    self.assertEqual(configs["clip248"].objective, "clip")
    self.assertEqual(configs["longclip"].objective, "longclip")
    self.assertTrue(configs["longclip"].loss.pcm)
    for name in ("clip248", "longclip"):
      self.assertEqual((configs[name].model.num_prompts,
                        configs[name].model.gta_groups), (0, 0))
    full = configs["fixclip"]
    self.assertEqual(full.objective, "fixclip")
    self.assertGreater(full.model.num_prompts, 0)
    self.assertGreater(full.masking.ratio, 0.0)
    self.assertGreater(full.model.gta_groups, 0)
    # Each ablation switches off exactly its module.
    for name, (section, key, off) in {
        "fixclip_fresh": ("model", "prompt_mode", "fresh"),
        "fixclip_no_prompts": ("model", "num_prompts", 0),
        "fixclip_no_masking": ("masking", "ratio", 0.0),
        "fixclip_no_gta": ("model", "gta_groups", 0),
        "fixclip_no_short": ("loss", "short_weight", 0.0),
        "fixclip_mask50": ("masking", "ratio", 0.5)}.items():
      ablated = configs[name].to_dict()
      ablated[section][key] = full[section][key]
      self.assertEqual(ablated, full.to_dict(), name)

  def test_fine_tune_scenes_come_in_the_budgets_families(self):
    workdir = _tempdir(self)
    budget = ablate.Budget(pretrain_steps=1, finetune_steps=1, batch=4,
                           train_num=8, eval_num=4, eval_batch=4,
                           finetune_family_size=4)
    data = ablate.make_data(workdir, budget, late_detail_share=1.0)
    self.assertNotEqual(data["finetune"], data["train"])

    def scenes(manifest):
      with open(manifest) as f:
        return [json.loads(line)["scene"] for line in f]
    summaries = [json.dumps(s["objects"][:2]) for s in scenes(data["finetune"])]
    self.assertEqual(len(set(summaries[:4])), 1)   # one family of four
    self.assertEqual(len(set(summaries)), 2)
    pairs = [json.dumps(s["objects"][:2]) for s in scenes(data["train"])]
    self.assertEqual(len(set(pairs)), 4)           # pretraining keeps pairs
    self.assertTrue(os.path.isdir(data["eval"]))
    # Pairs everywhere: the fine-tune set is the train set.
    paired = ablate.make_data(workdir, dataclasses.replace(
        budget, finetune_family_size=2), late_detail_share=1.0)
    self.assertEqual(paired["finetune"], paired["train"])

  def test_a_changed_config_does_not_reuse_an_old_run(self):
    run_dir = _tempdir(self)
    old = ablate.finetune_config(ablate.BUDGETS["small"], 0, _DATA, "/x", {})
    with open(os.path.join(run_dir, train.CONFIG_FILE), "w") as f:
      f.write(old.to_json_best_effort())
    ablate.check_same_config(old, run_dir)
    new = ablate.finetune_config(ablate.BUDGETS["medium"], 0, _DATA, "/x", {})
    with self.assertRaisesRegex(ValueError, "another config"):
      ablate.check_same_config(new, run_dir)

  def test_a_run_stopped_by_a_signal_is_a_stop_not_a_crash(self):
    # SIGTERM mid-run: the trainer saves, says how to resume and returns
    # early; the tool raised "no evaluation at step N" with a traceback.
    run_dir = _tempdir(self)
    config = ablate.finetune_config(ablate.BUDGETS["small"], 0, _DATA, "/x", {})
    with mock.patch.object(train, "train_and_evaluate",
                           lambda *a, **k: {"step": 3}):
      with self.assertRaisesRegex(ablate.Stopped, "stopped at step 3 of 6"):
        ablate.train_once(config, run_dir)


class TableTest(absltest.TestCase):

  def test_mean_and_std_over_seeds(self):
    def run(variant, seed, value):
      return {"variant": variant, "label": variant.upper(), "seed": seed,
              "recall": {f"{p}/{m}": value for p, m, _ in ablate.COLUMNS}}
    rows = ablate.table_rows([run("fixclip", 0, 40.0), run("clip77", 0, 10.0),
                              run("fixclip", 1, 50.0), run("clip77", 1, 10.0)])
    self.assertEqual([r["variant"] for r in rows], ["clip77", "fixclip"])
    cell = rows[1]["synthetic-long/t2i_R@1"]
    self.assertAlmostEqual(cell["mean"], 45.0)
    self.assertAlmostEqual(cell["std"], 50 ** 0.5)  # sample std of (40, 50)
    self.assertEqual(cell["values"], [40.0, 50.0])
    self.assertEqual(rows[0]["synthetic-short/i2t_R@1"]["std"], 0.0)
    summary = {"budget": {"eval_num": 8, "pretrain_steps": 1,
                          "finetune_steps": 1, "batch": 8, "train_num": 8},
               "budget_name": "small", "seeds": [0, 1],
               "late_detail_share": 0.5, "rows": rows, "wall_seconds": 60.0,
               "devices": ["cpu:0"]}
    md = ablate.markdown(summary)
    self.assertIn("| FIXCLIP | 45.0 ± 7.1 |", md)
    self.assertNotIn("Paired", md)
    # Runs reused from earlier invocations: their own times are summed.
    summary["runs"] = [{"seconds": 90.0}, {"seconds": 30.0}]
    self.assertIn("Wall time 1.0 min on ['cpu:0']; the runs' own times "
                  "(when they ran, `ablate_seconds.txt`) add up to 2.0 min.",
                  ablate.markdown(summary))
    self.assertTrue(ablate.plot_png(summary).startswith(b"\x89PNG"))

  def test_paired_differences_to_clip248(self):
    def run(variant, seed, value):
      return {"variant": variant, "label": variant, "seed": seed,
              "recall": {"synthetic-long/t2i_R@1": value}}
    diffs = ablate.paired_differences(
        [run("clip248", 0, 10.0), run("clip248", 1, 30.0),
         run("fixclip", 0, 12.0), run("fixclip", 1, 31.0),
         run("clip77", 1, 20.0)])
    self.assertEqual([(d["variant"], d["seed"],
                       d["recall"]["synthetic-long/t2i_R@1"]) for d in diffs],
                     [("fixclip", 0, 2.0), ("fixclip", 1, 1.0), ("clip77", 1, -10.0)])


class SmallBudgetTest(absltest.TestCase):
  """The CLI end to end at the small budget, two seeds, one fine-tune (clip248,
  the paired differences' reference): every path of the tool (data, start
  model, pretraining, fine-tuning, mean/std, pairs, table, plot), about 2
  minutes on 2 quiet CPU cores. The variants differ only in config knobs
  (ConfigTest); FIX-CLIP training itself is tested by main_test/readme_test."""

  _VARIANTS = ("clip248",)

  def test_small_budget_writes_a_sane_table(self):
    workdir = os.path.join(_tempdir(self), "ablate")
    # As a user runs it: one CPU device, not conftest's 8 virtual ones
    # (which split every tiny step eight ways).
    env = dict(os.environ, XLA_FLAGS="")
    subprocess.run(
        [sys.executable, "-m", "fixclip_jax.tools.ablate", "--budget=small",
         f"--workdir={workdir}", "--seeds=0,1",
         f"--variants={','.join(self._VARIANTS)}"],
        check=True, cwd=_REPO, capture_output=True, env=env)
    with open(os.path.join(workdir, ablate.TABLE_JSON)) as f:
      summary = json.load(f)
    rows = summary["rows"]
    self.assertEqual([r["variant"] for r in rows],
                     [ablate.PRETRAIN[0], *self._VARIANTS])
    for row in rows:
      self.assertEqual(row["num_seeds"], 2)
      for protocol, metric, _ in ablate.COLUMNS:
        cell = row[f"{protocol}/{metric}"]
        self.assertLen(cell["values"], 2)
        for value in cell["values"]:
          self.assertBetween(value, 0.0, 100.0)
        self.assertGreaterEqual(cell["std"], 0.0)
    # Paired differences to CLIP-248: every other model, both seeds.
    paired = summary["paired_rows"]
    self.assertEqual([r["variant"] for r in paired],
                     [r["variant"] for r in rows if r["variant"] != "clip248"])
    for row in paired:
      for protocol, metric, _ in ablate.COLUMNS:
        self.assertLen(row[f"{protocol}/{metric}"]["values"], 2)
        for value in row[f"{protocol}/{metric}"]["values"]:
          self.assertBetween(value, -100.0, 100.0)
    with open(os.path.join(workdir, ablate.TABLE_MD)) as f:
      recalls, differences = f.read().split("Paired differences")
    for text, models in ((recalls, rows), (differences, paired)):
      table = [line for line in text.splitlines() if line.startswith("| ")]
      self.assertLen(table, 1 + len(models))  # header + one line per model
      for row in models:
        self.assertLen([line for line in table
                        if line.startswith(f"| {row['label']} |")], 1)
    with open(os.path.join(workdir, ablate.PLOT_PNG), "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    # --start_seed: seed 1's fine-tune from seed 0's CLIP-77, with seed 1's
    # data order and random numbers; an unfinished start is one line.
    swap = [sys.executable, "-m", "fixclip_jax.tools.ablate", "--budget=small",
            f"--workdir={workdir}", "--seeds=1", "--variants=clip248"]
    subprocess.run(swap + ["--start_seed=0"], check=True, cwd=_REPO,
                   capture_output=True, env=env)
    with open(os.path.join(workdir, "seed_1_start_0", "clip248",
                           "config.json")) as f:
      config = json.load(f)
    self.assertEqual(config["init_from"],
                     os.path.join(workdir, "seed_0", ablate.PRETRAIN[0]))
    self.assertEqual((config["seed"], config["data"]["shuffle_seed"]), (1, 1))
    with open(os.path.join(workdir, ablate.TABLE_JSON)) as f:
      summary = json.load(f)
    self.assertEqual([(r["variant"], r["seed"], r["start_seed"])
                      for r in summary["runs"]], [("clip248", 1, 0)])
    with open(os.path.join(workdir, ablate.TABLE_MD)) as f:
      self.assertIn("every fine-tune starts from seed 0's CLIP-77", f.read())
    missing = subprocess.run(swap + ["--start_seed=7"], cwd=_REPO,
                             capture_output=True, text=True, env=env)
    self.assertNotEqual(missing.returncode, 0)
    self.assertIn("--start_seed=7", missing.stderr)
    self.assertIn("run --seeds=7 first", missing.stderr)


if __name__ == "__main__":
  absltest.main()
