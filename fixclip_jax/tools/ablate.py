"""What 248 tokens, Long-CLIP and each FIX-CLIP module buy, at one budget.

  python -m fixclip_jax.tools.ablate \
      --budget=small|demo|medium|discriminative|discriminative_long_start \
      --workdir=DIR \
      [--seeds=0,1] [--late_detail_share=0.5] [--variants=clip248,fixclip] \
      [--start_positions=smooth|random] [--start_seed=S]

On the synthetic late-detail benchmark (data/synthetic.py: a share of the
scene pairs differ only after token 77), for every seed:

 1. pretrains CLIP at 77 tokens from scratch (objective clip, one positional
    table, no prompts / mask token / GTA heads, no label smoothing): the
    "CLIP-77" starting point. Its text positions start smooth (sinusoidal),
    standing in for the smooth table of a CLIP trained on 400M pairs that KPS
    assumes (pretrain77.START_POSITIONS says why);
 2. fine-tunes it with each variant of VARIANTS (config.init_from = its
    workdir: KPS 77 -> 248, first 20 rows frozen; docs/method.md §2), all
    with the same steps, batch, data order, optimizer, lr, label smoothing
    0.1 and the pretrained temperature;
 3. scores every model on the held-out set (evaluation/run.py
    SYNTHETIC_EVAL_SEED scenes): the late twins' long captions alone
    (synthetic-late: each pair differs only after token 77, so a 77-token
    model's R@1 is at most 50%), all long captions, the same captions cut to
    77 tokens (synthetic-long77: what a 77-token model reads), and the
    one-sentence summaries (short), R@1 both ways.

Training and evaluation are train.train_and_evaluate's; this module only
builds configs and tabulates. WORKDIR gets data/ (train and eval manifests),
seed_S/{start_model,clip77,VARIANT}/ (each run's workdir: checkpoints,
eval_results.json), ablation.md (mean +- sample std over seeds), ablation.json
(every number, per-run wall times, the hyper-parameters) and ablation.png
(bars with the spread). Rerunning with the same WORKDIR reuses finished runs
and resumes the others; a run of a different config there is an error.
--start_seed=S fine-tunes each seed's variants from seed S's CLIP-77 instead
(seed_SEED_start_S/VARIANT/; the seed's own data order): whether a seed's
outcome comes from its start model or from its fine-tune data order.
"""
import dataclasses
import io
import json
import os
import platform
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import flags
import jax
from matplotlib.figure import Figure
import ml_collections
import numpy as np

from fixclip_jax import cli
from fixclip_jax import config_base
from fixclip_jax import fileio
from fixclip_jax import pretrain77
from fixclip_jax import train
from fixclip_jax.data import synthetic
from fixclip_jax.evaluation import report
from fixclip_jax.evaluation import run as eval_run
from fixclip_jax.models import sizes


@dataclasses.dataclass(frozen=True)
class Budget:
  """Everything a budget fixes; the same for every variant."""
  pretrain_steps: int          # CLIP-77 from scratch
  finetune_steps: int          # each variant
  batch: int                   # global batch, pretraining and fine-tuning
  train_num: int               # training scenes (seed 0)
  eval_num: int                # held-out scenes (SYNTHETIC_EVAL_SEED)
  eval_batch: int
  model_name: str = "tiny"     # models/sizes.py; its image size is read there
  # GTA groups G (one layer per group at 2 or 4 layers); losses on the last
  # half, K = G/2 + 1 (the paper's K=3 of G=4).
  gta_groups: int = 2
  # Late-twin family size of the fine-tuning scenes (data/synthetic.py); 2 =
  # the pretraining scenes' pairs. Pretraining and evaluation keep pairs.
  finetune_family_size: int = 2


BUDGETS = {
    # A smoke run (tests/ablate_test.py): every path, no meaningful numbers.
    "small": Budget(pretrain_steps=20, finetune_steps=6, batch=32,
                    train_num=128, eval_num=32, eval_batch=32),
    # About the README demo's size (configs/demo.py): one seed in minutes.
    "demo": Budget(pretrain_steps=200, finetune_steps=60, batch=32,
                   train_num=2048, eval_num=256, eval_batch=64),
    # RESULTS.md: 40-70 minutes on a shared 2-core CPU for two seeds.
    "medium": Budget(pretrain_steps=500, finetune_steps=100, batch=32,
                     train_num=8192, eval_num=512, eval_batch=128),
    # RESULTS.md's main table, issue 21's size: 4+4 layers at 64 px (an 8x8
    # patch grid), batch 128, ~9 epochs of pretraining, 300 fine-tune steps.
    # The fine-tune scenes come in late-twin families of 64: with pairs, a
    # shuffled batch of 128 held a twin pair about once in two batches, too
    # rarely for any variant to need the late tokens (CLIP-248 - CLIP-77 late
    # T2I +8.0 / +0.7); with families of 64, about half the examples of a
    # batch have a late twin beside them. At 300 steps CLIP-248 learns the
    # late tokens on seeds 0 and 2 (+30.0, +26.7 late T2I over CLIP-77) and
    # not on seed 1 (-2.0; RESULTS.md, tools/twin_probe says why).
    "discriminative": Budget(pretrain_steps=600, finetune_steps=300, batch=128,
                             train_num=8192, eval_num=300, eval_batch=100,
                             model_name="tiny4", gta_groups=4,
                             finetune_family_size=64),
    # "discriminative" with twice the pretraining (~18 epochs): seed 1's
    # 600-step start did not read size words (twin_probe's size text cos
    # 0.996, seeds 0 and 2 0.936 / 0.896) and no fine-tune from it read past
    # token 77; its 1200-step start does (0.823), and CLIP-248 from it beats
    # it by +26.7 late T2I (seed 0: +21.3; RESULTS.md).
    "discriminative_long_start": Budget(
        pretrain_steps=1200, finetune_steps=300, batch=128, train_num=8192,
        eval_num=300, eval_batch=100, model_name="tiny4", gta_groups=4,
        finetune_family_size=64),
    # The previous main table (RESULTS.md, "a budget too small"): 2+2 layers
    # at 32 px; CLIP-248 beat CLIP-77 by only 3-11 points there.
    "discriminative_2x2": Budget(pretrain_steps=400, finetune_steps=150,
                                 batch=128, train_num=8192, eval_num=300,
                                 eval_batch=100),
}

# Method hyper-parameters shared by every fine-tune (RESULTS.md says why).
PRETRAIN_LR = 1e-3             # from scratch, as configs/demo.py
FINETUNE_LR = 3e-4             # pretrained weights
NEW_PARAMS_LR = 1e-3           # prompts, mask token, GTA heads: from scratch
WARMUP_SHARE = 0.1             # of each run's steps
RENDER_SIZE = 64               # scenes are drawn at 64 px; tiny reads 32 px
# PCM keeps this share of a batch's principal directions: Long-CLIP keeps 32
# of the 128 features of a GPU's batch.
PCM_SHARE = 0.25


# FIX-CLIP modules off: config knobs of each variant.
_NO_FIXCLIP_MODULES = config_base.PLAIN_CLIP

# (directory name, table label, overrides of the fine-tune config).
VARIANTS: Tuple[Tuple[str, str, Dict[str, Any]], ...] = (
    ("clip248", "CLIP-248", dict(_NO_FIXCLIP_MODULES, objective="clip")),
    ("longclip", "Long-CLIP (PCM)",
     dict(_NO_FIXCLIP_MODULES, objective="longclip", **{"loss.pcm": True})),
    ("fixclip", "FIX-CLIP", {"objective": "fixclip"}),
    ("fixclip_fresh", "FIX-CLIP, prompts fresh (inert)",
     {"objective": "fixclip", "model.prompt_mode": "fresh"}),
    ("fixclip_no_prompts", "FIX-CLIP w/o regional prompts",
     {"objective": "fixclip", "model.num_prompts": 0}),
    ("fixclip_no_masking", "FIX-CLIP w/o masked short branch",
     {"objective": "fixclip", "masking.ratio": 0.0}),
    ("fixclip_no_gta", "FIX-CLIP w/o GTA",
     {"objective": "fixclip", "model.gta_groups": 0}),
    # Not a module of the paper: what the short-caption terms cost the long
    # ones (RESULTS.md, why FIX-CLIP trails CLIP-248 on late details).
    ("fixclip_no_short", "FIX-CLIP w/o short-caption terms",
     {"objective": "fixclip", "loss.short_weight": 0.0}),
    # A method hyper-parameter, not a module: the paper's 0.75 is for a 14x14
    # grid; tiny's is 4x4 (RESULTS.md, cause 4).
    ("fixclip_mask50", "FIX-CLIP, masking 0.5",
     {"objective": "fixclip", "masking.ratio": 0.5}),
)
PRETRAIN = ("clip77", "CLIP-77 (start)")

# Table columns: (protocol, metric, header).
COLUMNS = (
    ("synthetic-late", "t2i_R@1", "late-detail T2I"),
    ("synthetic-late", "i2t_R@1", "late-detail I2T"),
    ("synthetic-long", "t2i_R@1", "long T2I"),
    ("synthetic-long", "i2t_R@1", "long I2T"),
    ("synthetic-long77", "t2i_R@1", "long cut to 77 T2I"),
    ("synthetic-long77", "i2t_R@1", "long cut to 77 I2T"),
    ("synthetic-short", "t2i_R@1", "short T2I"),
    ("synthetic-short", "i2t_R@1", "short I2T"),
)
PROTOCOLS = tuple(sorted({c[0] for c in COLUMNS}))

TABLE_MD = "ablation.md"
SECONDS_FILE = "ablate_seconds.txt"  # a run's wall time, kept for reruns
TABLE_JSON = "ablation.json"
PLOT_PNG = "ablation.png"


# ----------------------------------------------------------------------------
# Configs.

def common_config(budget: Budget, seed: int, data: Dict[str, str]
                  ) -> ml_collections.ConfigDict:
  """Model, data, evaluation and loop knobs every run shares."""
  c = config_base.base_config()
  c.seed = seed
  c.model_name = budget.model_name
  c.model.gta_groups = budget.gta_groups
  c.loss.gta_first_group = budget.gta_groups // 2 + 1
  c.loss.gta_weights = (0.5,) * (budget.gta_groups - c.loss.gta_first_group + 1)
  c.loss.pcm_components = max(int(PCM_SHARE * budget.batch), 1)
  c.dtype = "float32"
  c.data.type = "jsonl"
  c.data.path = data["train"]
  c.data.image_size = sizes.get_config(budget.model_name).image_size
  c.data.global_batch = budget.batch
  c.data.shuffle_seed = seed
  c.data.short_context = 77               # summaries are ~30 tokens
  c.checkpoint_every = 10 ** 9            # only the last step
  c.keep_checkpoints = 1
  c.eval_every = 0                        # evaluate once, at the end
  c.eval.datasets = "synthetic,synthetic_long77,synthetic_late"
  c.eval.root = data["eval"]
  c.eval.batch_size = budget.eval_batch
  return c


def pretrain_config(budget: Budget, seed: int, data: Dict[str, str],
                    init_from: str = "") -> ml_collections.ConfigDict:
  """CLIP-77 from scratch (or from the start model `init_from`, its
  temperature kept): pretrain77.clip77_config of the shared config."""
  c = common_config(budget, seed, data)
  c.log_every = max(budget.pretrain_steps // 8, 1)
  return pretrain77.clip77_config(c, budget.pretrain_steps, PRETRAIN_LR,
                                  init_from)


def finetune_config(budget: Budget, seed: int, data: Dict[str, str],
                    init_from: str, overrides: Dict[str, Any]
                    ) -> ml_collections.ConfigDict:
  """A variant's fine-tune from the CLIP-77 workdir `init_from` (248 tokens,
  base_config's two-table positions and frozen table, Long-CLIP's label
  smoothing 0.1 for every variant).

  The temperature is the pretrained one: Long-CLIP's reset to ln 100 is
  OpenAI CLIP's own value (a no-op there), while a tiny CLIP-77 sits near
  ln(1/0.07); resetting it would multiply every logit by ~6 at step 1.
  """
  c = common_config(budget, seed, data)
  c.data.path = data["finetune"]
  c.init_from = init_from
  c.init_logit_scale = 0.0                # keep the pretrained temperature
  c.model.context_length = 248
  c.data.text_context = 248
  c.num_train_steps = budget.finetune_steps
  c.log_every = max(budget.finetune_steps // 4, 1)
  c.optim.lr = FINETUNE_LR
  c.optim.new_params_lr = NEW_PARAMS_LR
  c.optim.warmup_steps = max(int(WARMUP_SHARE * budget.finetune_steps), 1)
  for key, value in overrides.items():
    config_base.set_knob(c, key, value)
  return c


# ----------------------------------------------------------------------------
# Data and runs.

def make_data(workdir: str, budget: Budget, late_detail_share: float
              ) -> Dict[str, str]:
  """Train, fine-tune and held-out eval data under WORKDIR/data (made once):
  {"train": manifest, "finetune": manifest, "eval": folder}. The fine-tune
  set is the train set unless the budget asks for late-twin families."""
  family = budget.finetune_family_size
  sets = [("train", budget.train_num, 0, 2, ""),
          ("eval", budget.eval_num, eval_run.SYNTHETIC_EVAL_SEED, 2, "")]
  if family != 2:
    sets.append(("finetune", budget.train_num, 0, family, f"_family{family}"))
  out = {}
  for split, num, seed, family_size, suffix in sets:
    name = "train" if split == "finetune" else split
    root = os.path.join(workdir, "data",
                        f"{name}_{num}_share{late_detail_share:g}{suffix}")
    manifest = os.path.join(root, "manifest.jsonl")
    if not os.path.isfile(manifest):
      synthetic.make_synthetic_dataset(root, num, image_size=RENDER_SIZE,
                                       seed=seed,
                                       late_detail_share=late_detail_share,
                                       late_family_size=family_size)
    out[split] = root if split == "eval" else manifest
  out.setdefault("finetune", out["train"])
  return out


def final_results(run_dir: str, step: int) -> Optional[Dict[str, Dict]]:
  """{protocol: result} of the evaluation at `step`, or None if incomplete."""
  by_protocol = {r["protocol"]: r for r in report.read_results(run_dir)
                 if r.get("step") == step}
  if not all(p in by_protocol for p in PROTOCOLS):
    return None
  return by_protocol


def check_same_config(config: ml_collections.ConfigDict, run_dir: str) -> None:
  """ValueError if run_dir holds a run of another config (a changed budget or
  hyper-parameter must not reuse old runs)."""
  path = os.path.join(run_dir, train.CONFIG_FILE)
  if not os.path.isfile(path):
    return
  with open(path) as f:
    saved = json.load(f)
  if saved != json.loads(config.to_json_best_effort()):
    raise ValueError(f"{run_dir} holds a run of another config; use a fresh "
                     "--workdir (or delete that run)")


class Stopped(Exception):
  """A run stopped by a signal (SIGTERM, a preemption) before its last step;
  its checkpoint is saved and rerunning the same command resumes it."""


def train_once(config: ml_collections.ConfigDict, run_dir: str
               ) -> Tuple[Dict[str, Dict], float]:
  """Trains and evaluates `config` in run_dir unless done; (results, seconds)."""
  check_same_config(config, run_dir)
  step = config.num_train_steps
  done = final_results(run_dir, step)
  seconds_file = fileio.path(run_dir) / SECONDS_FILE
  if done is not None:  # its wall time from when it ran (0 if not recorded)
    seconds = (float(seconds_file.read_text()) if seconds_file.exists()
               else 0.0)
    return done, seconds
  start = time.perf_counter()
  state = train.train_and_evaluate(config, run_dir, evaluate=True)
  if int(state["step"]) < step:  # it said so, and how to resume
    raise Stopped(f"{run_dir} stopped at step {int(state['step'])} of {step}")
  if final_results(run_dir, step) is None:  # finished before, not evaluated
    scored = config.copy_and_resolve_references()
    scored.init_from = ""                   # the run's own checkpoint
    train.evaluate_checkpoint(scored, run_dir)
  results = final_results(run_dir, step)
  if results is None:
    raise RuntimeError(f"{run_dir}: no evaluation at step {step} of "
                       f"{', '.join(PROTOCOLS)}")
  seconds = time.perf_counter() - start
  fileio.atomic_write(seconds_file, f"{seconds:.1f}\n")
  return results, seconds


def run_ablation(workdir: str, budget_name: str, seeds: Sequence[int],
                 late_detail_share: float = synthetic.DEFAULT_LATE_DETAIL_SHARE,
                 variants: Sequence[str] = (),
                 start_positions: str = "smooth",
                 start_seed: Optional[int] = None) -> Dict[str, Any]:
  """Every run of the ablation; writes and returns the table's data.

  variants: directory names of VARIANTS to run (empty = all).
  start_positions: the CLIP-77's text positions before pretraining.
  start_seed: fine-tune every seed's variants from this seed's CLIP-77
    (trained by an earlier call) instead of its own, in
    seed_{SEED}_start_{START_SEED}/: the fine-tunes keep their seed's data
    order and random numbers, so the start model and the order can be told
    apart (RESULTS.md, why seed 1 does not read past token 77).
  """
  budget = BUDGETS[budget_name]
  chosen = [v for v in VARIANTS if not variants or v[0] in variants]
  if variants and len(chosen) != len(variants):
    raise ValueError(f"Unknown variants in {list(variants)}; known: "
                     f"{[v[0] for v in VARIANTS]}")
  start = time.perf_counter()
  data = make_data(workdir, budget, late_detail_share)
  runs = []
  if start_seed is not None:
    pretrain_dir = os.path.join(workdir, f"seed_{start_seed}", PRETRAIN[0])
    if final_results(pretrain_dir, budget.pretrain_steps) is None:
      raise ValueError(f"--start_seed={start_seed}: {pretrain_dir} holds no "
                       f"finished CLIP-77; run --seeds={start_seed} first")
  for seed in seeds:
    if start_seed is None:
      seed_dir = os.path.join(workdir, f"seed_{seed}")
      pretrain_dir = os.path.join(seed_dir, PRETRAIN[0])
      start_model = pretrain77.write_start_model(
          os.path.join(seed_dir, "start_model"),
          pretrain_config(budget, seed, data), start_positions)
      jobs = [(PRETRAIN, pretrain_config(budget, seed, data, start_model),
               pretrain_dir)]
    else:
      seed_dir = os.path.join(workdir, f"seed_{seed}_start_{start_seed}")
      jobs = []
    for name, label, overrides in chosen:
      jobs.append(((name, label),
                   finetune_config(budget, seed, data, pretrain_dir, overrides),
                   os.path.join(seed_dir, name)))
    for (name, label), config, run_dir in jobs:
      print(f"[ablate] seed {seed}: {label} -> {run_dir}", flush=True)
      results, seconds = train_once(config, run_dir)
      runs.append({"variant": name, "label": label, "seed": seed,
                   "start_seed": seed if start_seed is None else start_seed,
                   "seconds": round(seconds, 1),
                   "recall": {f"{p}/{m}": results[p][m] for p, m, _ in COLUMNS}})
  summary = {
      "budget": dataclasses.asdict(budget), "budget_name": budget_name,
      "seeds": list(seeds), "late_detail_share": late_detail_share,
      "start_positions": start_positions, "start_seed": start_seed,
      "hyper_parameters": hyper_parameters(budget),
      "devices": [str(d) for d in jax.devices()], "machine": platform.platform(),
      "wall_seconds": round(time.perf_counter() - start, 1), "runs": runs,
      "rows": table_rows(runs),
      "paired_rows": table_rows(paired_differences(runs)),
  }
  write_outputs(workdir, summary)
  return summary


def hyper_parameters(budget: Budget) -> Dict[str, Any]:
  """The method hyper-parameters every fine-tune shares (for the JSON)."""
  c = finetune_config(budget, 0, {"train": "", "finetune": "", "eval": ""},
                      "", {})
  return {"pretrain_lr": PRETRAIN_LR, "finetune_lr": FINETUNE_LR,
          "new_params_lr": NEW_PARAMS_LR, "warmup_share": WARMUP_SHARE,
          "weight_decay": c.optim.weight_decay, "grad_clip": c.optim.grad_clip,
          "label_smoothing_finetune": c.loss.label_smoothing,
          "short_weight": c.loss.short_weight, "masking_ratio": c.masking.ratio,
          "num_prompts": c.model.num_prompts, "gta_groups": c.model.gta_groups,
          "gta_weights": list(c.loss.gta_weights),
          "pcm_components": c.loss.pcm_components,
          "init_logit_scale": "kept" if not c.init_logit_scale else
                              c.init_logit_scale,
          "max_logit_scale": c.loss.max_logit_scale,
          "positional_keep": c.model.positional_keep,
          "render_size": RENDER_SIZE, "model_name": budget.model_name,
          "image_size": c.data.image_size,
          "prompt_mode": c.model.prompt_mode,
          "region_layout": c.model.region_layout}


# ----------------------------------------------------------------------------
# The table and the plot.

def table_rows(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """One row per variant (pretraining first): {column: (mean, std, n)}."""
  order = [PRETRAIN[0]] + [v[0] for v in VARIANTS]
  rows = []
  for name in order:
    mine = [r for r in runs if r["variant"] == name]
    if not mine:
      continue
    row = {"variant": name, "label": mine[0]["label"], "num_seeds": len(mine)}
    for protocol, metric, _ in COLUMNS:
      values = np.asarray([r["recall"][f"{protocol}/{metric}"] for r in mine])
      std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
      row[f"{protocol}/{metric}"] = {"mean": float(values.mean()), "std": std,
                                     "values": values.tolist()}
    rows.append(row)
  return rows


def paired_differences(runs: List[Dict[str, Any]], reference: str = "clip248"
                       ) -> List[Dict[str, Any]]:
  """Each run minus the `reference` run of its seed (same start, data order):
  what a variant changes, without the spread the seeds' starts add."""
  ref = {r["seed"]: r for r in runs if r["variant"] == reference}
  return [dict(r, recall={k: v - ref[r["seed"]]["recall"][k]
                          for k, v in r["recall"].items()})
          for r in runs if r["variant"] != reference and r["seed"] in ref]


def _cells(row: Dict[str, Any], signed: bool = False) -> str:
  fmt = "{:+.1f} ± {:.1f}" if signed else "{:.1f} ± {:.1f}"
  return " | ".join(fmt.format(row[f"{p}/{m}"]["mean"], row[f"{p}/{m}"]["std"])
                    for p, m, _ in COLUMNS)


def markdown(summary: Dict[str, Any]) -> str:
  """The R@1 table (mean +- sample std over seeds) with its provenance."""
  b = summary["budget"]
  family = b.get("finetune_family_size", 2)
  family_note = (f" (fine-tuned on scenes in late-twin families of {family})"
                 if family != 2 else "")
  lines = [
      f"R@1 (%) on {b['eval_num']} held-out synthetic scenes (late-detail share "
      f"{summary['late_detail_share']:g}), mean ± std over seeds "
      f"{','.join(map(str, summary['seeds']))}; budget {summary['budget_name']}: "
      f"CLIP-77 {b['pretrain_steps']} steps, each fine-tune "
      f"{b['finetune_steps']} steps, batch {b['batch']}, {b['train_num']} "
      f"training scenes{family_note}"
      + (f"; every fine-tune starts from seed {summary['start_seed']}'s CLIP-77"
         if summary.get("start_seed") is not None else "") + ".", "",
      "| model | " + " | ".join(c[2] for c in COLUMNS) + " |",
      "|---|" + "---|" * len(COLUMNS)]
  for row in summary["rows"]:
    lines.append(f"| {row['label']} | {_cells(row)} |")
  if summary.get("paired_rows"):
    lines += ["", "Paired differences to CLIP-248 (each seed's run minus that "
              "seed's CLIP-248 run; mean ± std over seeds):", "",
              "| model - CLIP-248 | " + " | ".join(c[2] for c in COLUMNS) + " |",
              "|---|" + "---|" * len(COLUMNS)]
    for row in summary["paired_rows"]:
      lines.append(f"| {row['label']} | {_cells(row, signed=True)} |")
  # Reused runs cost this invocation nothing: their own times are summed too.
  run_minutes = sum(r.get("seconds", 0.0) for r in summary.get("runs", [])) / 60
  lines += ["", f"Wall time {summary['wall_seconds'] / 60:.1f} min on "
                f"{summary['devices']}; the runs' own times (when they ran, "
                f"`{SECONDS_FILE}`) add up to {run_minutes:.1f} min."]
  return "\n".join(lines) + "\n"


def plot_png(summary: Dict[str, Any]) -> bytes:
  """Bars of R@1 per model and protocol, error bars = std over seeds."""
  rows = summary["rows"]
  fig = Figure(figsize=(11, 4.2))
  x = np.arange(len(rows))
  width = 0.8 / 4
  for k, direction in enumerate(("t2i_R@1", "i2t_R@1")):
    ax = fig.add_subplot(1, 2, k + 1)
    for j, (protocol, name) in enumerate((
        ("synthetic-late", "late detail"), ("synthetic-long", "long"),
        ("synthetic-long77", "long cut to 77"),
        ("synthetic-short", "short"))):
      cells = [row[f"{protocol}/{direction}"] for row in rows]
      ax.bar(x + (j - 1.5) * width, [c["mean"] for c in cells], width,
             yerr=[c["std"] for c in cells], capsize=2, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels([row["label"] for row in rows], rotation=35,
                       ha="right", fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"{direction.split('_')[0].upper()} R@1 (%)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  buf = io.BytesIO()  # written by write_outputs through fileio
  fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  return buf.getvalue()


def write_outputs(workdir: str, summary: Dict[str, Any]) -> None:
  """ablation.md, ablation.json and ablation.png in WORKDIR (atomically)."""
  root = fileio.path(workdir)
  fileio.atomic_write(root / TABLE_MD, markdown(summary))
  fileio.atomic_write(root / TABLE_JSON, json.dumps(summary, indent=1))
  fileio.atomic_write(root / PLOT_PNG, plot_png(summary))


# ----------------------------------------------------------------------------
# CLI.

FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined only when run as a program: no clash on import)."""
  flags.DEFINE_enum("budget", "small", sorted(BUDGETS), "Steps, batch and "
                    "data sizes (small: a smoke run; demo: the README's; "
                    "medium, discriminative_2x2: too small to learn late "
                    "details; discriminative: RESULTS.md's table).")
  flags.DEFINE_string("workdir", None, "Where data, runs and the table go.")
  flags.DEFINE_list("seeds", ["0", "1"], "Training seeds (model init, data "
                    "order, masks); the table shows mean and std over them.")
  flags.DEFINE_float("late_detail_share", synthetic.DEFAULT_LATE_DETAIL_SHARE,
                     "Share of scene pairs that differ only after token 77.")
  flags.DEFINE_list("variants", [], "Fine-tunes to run (default all): "
                    + ",".join(v[0] for v in VARIANTS))
  flags.DEFINE_enum("start_positions", "smooth", list(pretrain77.START_POSITIONS),
                    "CLIP-77 text positions before pretraining: smooth "
                    "(sinusoidal, like a well-trained CLIP's; what KPS "
                    "assumes) or random (the model's init).")
  flags.DEFINE_integer("start_seed", None, "Fine-tune each seed's variants "
                       "from this seed's CLIP-77 (run that seed first), in "
                       "WORKDIR/seed_S_start_START_SEED: tells the start "
                       "model's effect from the data order's.")
  flags.mark_flag_as_required("workdir")


def main(argv):
  cli.reject_positional_arguments(argv)
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    raise cli.UserError(f"--seeds={','.join(FLAGS.seeds)}: not integers") from None
  cli.log_to_file(os.path.join(FLAGS.workdir, cli.LOG_FILE))
  # The seeds (and reruns) compile the same programs: keep them on disk.
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(FLAGS.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  try:
    summary = run_ablation(FLAGS.workdir, FLAGS.budget, seeds,
                           FLAGS.late_detail_share, FLAGS.variants,
                           FLAGS.start_positions, FLAGS.start_seed)
  except Stopped:  # a SIGTERM: the trainer's line says how to resume
    return 0
  print(markdown(summary))
  print(f"Wrote {os.path.join(FLAGS.workdir, TABLE_MD)}, {TABLE_JSON}, "
        f"{PLOT_PNG}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
