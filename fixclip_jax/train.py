"""Training and evaluation runs: the loop around the train step (step.py).

host batches (data/pipeline.py) -> global batch on the mesh -> jitted step ->
metrics, periodic evaluation (evaluation/run.py) and checkpoints
(checkpoint.py); init_from through pretrained.py. Resume is automatic.
"""
import dataclasses
import functools
import json
import os
import signal
import time
from typing import Callable, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from fixclip_jax import buckets
from fixclip_jax import checkpoint
from fixclip_jax import fileio
from fixclip_jax import flops
from fixclip_jax import metrics as metrics_lib
from fixclip_jax import pretrain77
from fixclip_jax import pretrained
from fixclip_jax import sharding
from fixclip_jax import step as step_lib
from fixclip_jax.data import pipeline
from fixclip_jax.data import tokenizers
from fixclip_jax.evaluation import report
from fixclip_jax.evaluation import run as eval_run
from fixclip_jax.models import clip
from fixclip_jax.models import sizes

TrainState = step_lib.TrainState
CONFIG_FILE = "config.json"
# config.pretrain77: the 77-token start's workdir in WORKDIR, its initial
# weights in there, and its name in WORKDIR's results.
PRETRAIN77_SUBDIR = "pretrain77"
START_MODEL_SUBDIR = "start_model"
START_MODEL_LABEL = "CLIP-77 (start)"


class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps.

  The loop then saves synchronously and returns; worst-case stop time: the
  step computing when the signal comes and the one queued behind it (the
  loop keeps at most one step queued), plus one synchronous save. Waiting for
  a batch is given up at once (polled every 0.1 s: a stuck read never holds
  the stop up), and the pipeline's threads are released on the way out. A
  second signal gets the default action: the process ends at once, even
  inside a long compile or a stuck save.
  """

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some test runners)
        pass
    return self

  def _handle(self, signum, _frame):
    logging.warning("Signal %d: saving a checkpoint and stopping (a second "
                    "signal ends the process at once).", signum)
    self.requested = True
    for sig in self._previous:
      signal.signal(sig, signal.SIG_DFL)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


# ----------------------------------------------------------------------------
# Divergence: updates skipped for NaN/Inf (step.py) many times in a row.

class DivergenceError(ValueError):
  """config.optim.max_skipped_updates updates in a row were skipped."""
  exit_code = 3  # cli.run: a run that stopped itself, told apart from usage errors


class DivergenceWatch:
  """Counts consecutive skipped updates from the step's metrics (read one
  step late, when the loop waits for that step anyway) and remembers the
  last finite loss."""

  def __init__(self, limit: int):
    self.limit = limit
    self.streak = 0
    self.first_skipped = 0
    self.last_finite: Optional[tuple] = None  # (step, loss)

  def observe(self, step: int, loss, skipped) -> bool:
    """True when the run should stop (the limit reached)."""
    loss, skipped = float(jax.device_get(loss)), int(jax.device_get(skipped))
    if np.isfinite(loss):
      self.last_finite = (step, loss)
    if not skipped:
      self.streak = 0
      return False
    self.streak += 1
    if self.streak == 1:
      self.first_skipped = step
    return bool(self.limit) and self.streak >= self.limit

  def error(self, config, step: int, workdir: str) -> DivergenceError:
    saved = checkpoint.saved_steps(workdir)
    kept = (f"The newest checkpoint, step {saved[-1]}, is kept in "
            f"{os.path.join(workdir, checkpoint.TRAIN_CHECKPOINT_SUBDIR)} "
            "(skipped updates change nothing)" if saved else
            "No checkpoint was saved")
    last = ("no finite loss in this run" if self.last_finite is None else
            f"last finite loss {self.last_finite[1]:.4f} at step "
            f"{self.last_finite[0]}")
    o = config.optim
    return DivergenceError(
        f"The run diverged: stopped at step {step} after {self.streak} updates "
        f"in a row were skipped for NaN/Inf (steps {self.first_skipped}-{step};"
        f" config.optim.max_skipped_updates={self.limit}); {last}. {kept}. "
        f"Try a lower --config.optim.lr (now {o.lr:g}), a longer "
        f"--config.optim.warmup_steps (now {o.warmup_steps}), gradient "
        f"clipping (--config.optim.grad_clip, now {o.grad_clip:g}) or "
        "--config.dtype=float32, then rerun the same command to resume "
        "(--config.resume_step=N: an earlier step).")


# ----------------------------------------------------------------------------
# The loop.

def _host_batch(batch: dict) -> dict:
  return {k: batch[k] for k in ("image", "text_long", "text_short")}


def _write_config_copy(config, workdir: str) -> None:
  """WORKDIR/config.json: the resolved config of this run (process 0)."""
  if jax.process_index() != 0:
    return
  fileio.atomic_write(fileio.path(workdir) / CONFIG_FILE,
                      config.to_json_best_effort(indent=2))


def _say(message: str) -> None:
  """A line for the user: stdout on process 0, and the log file."""
  logging.info("%s", message)
  if jax.process_index() == 0:
    print(message, flush=True)


def _restore(config, workdir, manager, model, mesh, train_iter):
  """The train state at config.resume_step (0: the latest saved step).

  Going back to an earlier step deletes the later checkpoints once the state
  is restored: orbax cannot save a step that exists, and would skip saves of
  steps below its latest.
  """
  steps = manager.all_steps()
  step = config.resume_step or manager.latest_step()
  if step not in steps:
    raise ValueError(f"config.resume_step={config.resume_step}: no such "
                     f"checkpoint in {manager.directory} (saved steps: "
                     f"{sorted(steps) or 'none'})")
  abstract, shardings, tx = step_lib.abstract_state(config, model, mesh)
  # The latest step falls back to the newest older one that restores (the
  # broken ones are moved aside, never deleted); a requested step does not.
  state, step = checkpoint.restore_newest(manager, abstract, train_iter,
                                          newest=step,
                                          fallback=not config.resume_step)
  # Only steps of this workdir's earlier runs can be later (the workdir is
  # locked: no other run writes here now); named before they go.
  later = sorted(s for s in manager.all_steps() if s > step)
  if later:
    logging.warning("Resuming at step %d (config.resume_step): deleting the "
                    "later checkpoints %s of an earlier run in %s (orbax "
                    "cannot save over them)", step, later, manager.directory)
  for s in later:
    manager.delete(s)
  if later:
    _say(f"Deleted the checkpoints after step {step}: {later}")
  if jax.process_index() == 0:  # the steps after `step` are logged again
    cut = metrics_lib.drop_rows_after(workdir, step)
    if cut:
      logging.info("Cut %d line(s) after step %d from %s", cut, step,
                   metrics_lib.METRICS_FILE)
  _say(f"Resumed from {workdir} at step {step}")
  return state, shardings, tx


def _sum_over_hosts(counts: np.ndarray) -> np.ndarray:
  """Per-host counters summed over all processes (a collective: call on all)."""
  if jax.process_count() == 1:
    return counts
  return np.asarray(multihost_utils.process_allgather(counts)).sum(0)


def _progress(step: int, total: int, step_time: float, metrics: dict,
              first: bool = False) -> str:
  """One concise stdout line: step, loss, speed, ETA (none after a run's
  first step, whose time is mostly compilation)."""
  terms = " ".join(f"{k[5:]}={metrics[k]:.3f}" for k in sorted(metrics)
                   if k.startswith("loss_"))
  line = (f"[{step}/{total}] loss={metrics['loss']:.4f} ({terms}) "
          f"{metrics['images_per_s']:.1f} img/s")
  if first:
    return line + " (first step: includes compilation)"
  eta = max(total - step, 0) * step_time
  return line + f", ETA {eta / 60:.1f} min"


def _say_changed_knobs(config, workdir: str) -> None:
  """A resume may change knobs (more steps, another lr); says which differ
  from WORKDIR/config.json, the record of the run that started the workdir."""
  path = fileio.path(workdir) / CONFIG_FILE
  if jax.process_index() != 0 or not fileio.isfile(path):
    return
  try:
    before = metrics_lib.flatten_config(json.loads(fileio.read_text(path)))
  except json.JSONDecodeError:
    return
  now = metrics_lib.flatten_config(json.loads(config.to_json_best_effort()))
  changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}"
             for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
  if changed:
    _say(f"Resuming with {len(changed)} knob(s) changed from {path}: "
         + "; ".join(changed))


def _check_resume_step(config, workdir: str, resuming: bool) -> None:
  if not config.resume_step:
    return
  if not resuming:
    raise ValueError(f"config.resume_step={config.resume_step}: {workdir} "
                     "holds no training checkpoint")
  steps = checkpoint.saved_steps(workdir)
  if config.resume_step not in steps:
    raise ValueError(f"config.resume_step={config.resume_step}: no such "
                     f"checkpoint in {workdir}/{checkpoint.TRAIN_CHECKPOINT_SUBDIR}"
                     f" (saved steps: {steps})")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate: bool = True,
                       on_start: Optional[Callable[[], None]] = None
                       ) -> TrainState:
  """Trains config.num_train_steps micro-steps, resuming from WORKDIR if it
  holds a checkpoint; evaluates every config.eval_every steps and at the end
  (and before the first step when config.eval_at_start).

  With config.pretrain77.steps > 0 (no pretrained CLIP at hand: the demo) a
  plain 77-token CLIP is trained first in WORKDIR/pretrain77
  (pretrain77.py) and the run starts from it as from init_from; its final
  evaluation joins WORKDIR's results as the model "CLIP-77 (start)", so the
  table compares the run with its 77-token starting point.

  Everything that can be wrong with the config, the data source, the
  workdir (another model, another process count) or init_from raises before
  anything is written; `on_start()` runs after those checks, before the
  first write (main.py opens its log file there). The workdir is locked
  (checkpoint.WorkdirLock) from then until the run ends: a second run on it
  stops with one line naming this one.
  """
  lock = checkpoint.WorkdirLock(workdir)

  def start():
    lock.acquire()
    if on_start is not None:
      on_start()

  try:
    return _train_and_evaluate_locked(config, workdir, evaluate, start, lock)
  finally:
    lock.release()


def _train_and_evaluate_locked(config, workdir: str, evaluate: bool,
                               on_start: Callable[[], None],
                               lock: checkpoint.WorkdirLock) -> TrainState:
  """The run, after stage 1 (_pretrain77) when config.pretrain77 asks for it
  and the run has not begun; `on_start` locks the workdir."""
  if config.get("pretrain77") and config.pretrain77.steps:
    start_dir = os.fspath(fileio.path(workdir) / PRETRAIN77_SUBDIR)
    if not checkpoint.has_train_checkpoint(workdir):  # the run has not begun
      lock.acquire()  # stage 1 writes its start model before its checks
      state, preempted = _pretrain77(config, workdir, start_dir, evaluate,
                                     on_start)
      if preempted:
        return state
      on_start = None
      _say(f"Stage 2 of 2: {config.objective} at {config.model.context_length} "
           f"tokens from the 77-token start, {config.num_train_steps} steps")
    config = config.copy_and_resolve_references()
    config.init_from = start_dir
  state, preempted = _train_and_evaluate(config, workdir, evaluate, on_start)
  if not preempted and jax.process_index() == 0:
    _print_outcome(workdir, evaluated=evaluate)
  return state


def _pretrain77(config, workdir: str, start_dir: str, evaluate: bool, on_start):
  """Stage 1: config.pretrain77.steps of plain CLIP at 77 tokens in start_dir,
  from a start model with a smooth position table; its final evaluation joins
  WORKDIR's results as START_MODEL_LABEL. (state, preempted)."""
  stage = pretrain77.clip77_config(config, config.pretrain77.steps,
                                   config.pretrain77.lr)
  stage.eval_at_start = False
  stage.eval_every = 0                    # once, at the end
  _say(f"Stage 1 of 2: plain CLIP at 77 tokens, {stage.num_train_steps} steps "
       f"(the start a pretrained CLIP would give; {start_dir})")
  stage.init_from = pretrain77.write_start_model(
      os.fspath(fileio.path(start_dir) / START_MODEL_SUBDIR), stage)
  state, preempted = _train_and_evaluate(stage, start_dir, evaluate, on_start)
  if not preempted and evaluate and jax.process_index() == 0:
    steps = stage.num_train_steps
    start_rows = [{k: v for k, v in r.items() if k not in ("model", "step")}
                  for r in report.read_results(start_dir) if r.get("step") == steps]
    report.write_report(workdir, start_rows, model=START_MODEL_LABEL, step=steps)
  return state, preempted


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        evaluate: bool = True,
                        on_start: Optional[Callable[[], None]] = None):
  """One stage: set up (every check; nothing written before `on_start`),
  restore or start, loop, finish. (final state, stopped by a signal)."""
  parts, train_iter, resuming, params = _set_up(config, workdir)
  if on_start is not None:
    on_start()
  run = _restore_or_start(config, workdir, evaluate, parts, train_iter,
                          resuming, params)
  with PreemptionGuard() as guard, train_iter:
    end = _loop(run, guard)
  _finish(run, end)
  return run.state, end.preempted


# ----------------------------------------------------------------------------
# A run's pieces: the model (shared with --mode=eval), then its training.

@dataclasses.dataclass
class _ModelParts:
  """The mesh, the run's model and its tokenizer: what a training run and
  --mode=eval build from the config before reading any checkpoint."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  cfg: sizes.CLIPConfig
  model: clip.CLIP
  tokenizer: tokenizers.Tokenizer

  def evaluate(self, params, workdir: str, step: Optional[int]) -> list:
    """config.eval's benchmarks on `params`: WORKDIR's result rows at `step`."""
    return eval_run.evaluate(self.config, self.model, params, self.mesh,
                             self.tokenizer, workdir=workdir, step=step)


def _model_parts(config) -> _ModelParts:
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  logging.info("Devices: %s", sharding.describe(mesh))
  cfg = sizes.model_config(config)
  model = step_lib.make_model(config, cfg)
  tokenizer = tokenizers.get_tokenizer(config.data.tokenizer,
                                       context_length=cfg.context_length)
  tokenizers.check_model_compatible(tokenizer, cfg.vocab_size, cfg.eot_token_id,
                                    "config.data.tokenizer / config.model")
  return _ModelParts(config, mesh, cfg, model, tokenizer)


def _init_from_params(config, cfg: sizes.CLIPConfig, logit_scale):
  """config.init_from's weights fitted to the run's model (pretrained.py)."""
  fresh = clip.init_params(cfg, jax.random.PRNGKey(config.seed))
  return pretrained.load_pretrained(config.init_from, cfg, fresh,
                                    logit_scale=logit_scale)


@dataclasses.dataclass
class _Run:
  """One training stage once its state is restored or started: what the
  loop and the finish read, and the state the loop advances."""
  config: ml_collections.ConfigDict
  workdir: str
  evaluate: bool
  parts: _ModelParts
  train_iter: pipeline.BackgroundBatches
  manager: checkpoint.TrainCheckpointManager
  state: TrainState
  shardings: TrainState
  tx: optax.GradientTransformation
  writer: metrics_lib.MetricWriter
  start_step: int
  eval_metrics: dict = dataclasses.field(default_factory=dict)  # the latest

  def run_eval(self, step: int) -> None:
    results = self.parts.evaluate(self.state["params"], self.workdir, step)
    self.eval_metrics = eval_run.flat_metrics(results)
    self.writer.write(step, self.eval_metrics)

  def save(self, step: int, wait: bool) -> None:
    """A checkpoint of the state and the data position; the latest
    evaluation's metrics go with it (config.checkpoint_best_metric)."""
    checkpoint.save_train_state(self.manager, step, self.state, self.train_iter,
                                metrics=self.eval_metrics or None, force=True,
                                wait=wait)


def _set_up(config, workdir: str):
  """Everything a run checks before its first write: (model parts, train
  batches, resuming, init_from params or None)."""
  parts = _model_parts(config)
  data_config = config.data.copy_and_resolve_references()
  if data_config.image_size != parts.cfg.image_size:
    raise ValueError(f"config.data.image_size={data_config.image_size} but model "
                     f"{config.model_name} takes {parts.cfg.image_size}px images")
  # Batches come from a thread: a stuck read never holds up a stop; the
  # checkpointed data state includes the skip totals (they carry on).
  train_iter = pipeline.BackgroundBatches(
      pipeline.make_train_iterator(data_config, parts.tokenizer))
  resuming = checkpoint.check_resume(workdir, parts.cfg)
  _check_resume_step(config, workdir, resuming)
  params = None
  if config.init_from and not resuming:
    params = _init_from_params(config, parts.cfg, config.init_logit_scale)
  return parts, train_iter, resuming, params


def _restore_or_start(config, workdir: str, evaluate: bool, parts: _ModelParts,
                      train_iter, resuming: bool, params) -> _Run:
  """The state restored from WORKDIR, or started (from `params`, else
  fresh) with the workdir's records; evaluated first when
  config.eval_at_start."""
  if not resuming:  # the workdir's record of its checkpoints, written once
    _write_config_copy(config, workdir)
    checkpoint.write_workdir_model_config(workdir, parts.cfg)  # convert --src=WORKDIR
    checkpoint.write_run_record(workdir)
  manager = checkpoint.make_train_manager(workdir, config.keep_checkpoints,
                                          best_metric=config.checkpoint_best_metric)
  if resuming:  # restore into the abstract state
    _say_changed_knobs(config, workdir)
    state, shardings, tx = _restore(config, workdir, manager, parts.model,
                                    parts.mesh, train_iter)
  else:
    state, shardings, tx = step_lib.init_state(config, parts.model, parts.mesh,
                                               params)
  run = _Run(config, workdir, evaluate, parts, train_iter, manager, state,
             shardings, tx, metrics_lib.MetricWriter(
                 workdir, hparams=metrics_lib.flatten_config(config),
                 wandb=config.wandb),
             start_step=int(jax.device_get(state["step"])))
  if evaluate and config.eval_at_start and run.start_step == 0:
    run.run_eval(0)
  return run


# ----------------------------------------------------------------------------
# The loop: one step queued at most, its metrics read one step late.

class _TrainStep:
  """Host batch -> the jitted step on the mesh, advancing run.state. Text is
  cut to length buckets (buckets.py): exact, one compiled step per bucket
  pair."""

  def __init__(self, run: _Run):
    self._run = run
    self._step_fn = step_lib.make_train_step(run.config, run.parts.model, run.tx)
    self._jitted = None  # jitted on the first batch, whose structure it needs
    self._buckets = buckets.TextBuckets.from_data_config(
        run.config.data, run.parts.cfg.eot_token_id)

  def __call__(self, host: dict):
    """Queues a step; (its metrics, the cut text lengths: what FLOPs count)."""
    host_batch = self._buckets(_host_batch(host))
    lengths = flops.batch_text_lengths(host_batch)
    batch = sharding.global_batch(host_batch, self._run.parts.mesh)
    if self._jitted is None:
      self._jitted = step_lib.jit_train_step(self._step_fn, self._run.parts.mesh,
                                             self._run.shardings, batch)
    self._run.state, metrics = self._jitted(self._run.state, batch)
    return metrics, lengths


class _ProgressLog:
  """A metrics.jsonl row and a progress line every config.log_every steps,
  at the last, and after a run's first step (at once; its time includes
  compilation). Speed, MFU: over the steps since the previous row."""

  def __init__(self, run: _Run):
    config = run.config
    self._run = run
    self._step_flops = functools.lru_cache(lambda lengths: flops.train_step_flops(
        config, lengths=lengths)["total"])
    self._peak = 1e12 * (config.peak_tflops or
                         flops.peak_tflops_for(jax.devices()[0].device_kind) or 0.0)
    self._skipped_logged = int(jax.device_get(run.state["num_skipped"]))
    self._last_logged = run.start_step
    self._open_window()

  def _open_window(self) -> None:
    self._window_start, self._window_steps = time.perf_counter(), 0
    self._window_flops = 0

  def count(self, lengths) -> None:
    """One more step in the window, with its batch's cut text lengths."""
    self._window_steps += 1
    self._window_flops += self._step_flops(lengths)

  def due(self, step: int) -> bool:
    config = self._run.config
    return (step % config.log_every == 0 or step == config.num_train_steps or
            step == self._run.start_step + 1)

  def write(self, step: int, metrics: dict) -> None:
    metrics = self._row(step, jax.device_get(metrics))
    if metrics["skipped_total"] > self._skipped_logged:
      logging.warning(
          "%d update(s) skipped for NaN/Inf between steps %d and %d (this "
          "step: %d non-finite feature values); %d skipped in total",
          metrics["skipped_total"] - self._skipped_logged, self._last_logged + 1,
          step, int(metrics.get("nonfinite_features", 0)),
          metrics["skipped_total"])
      self._skipped_logged = int(metrics["skipped_total"])
    self._last_logged = step
    self._run.writer.write(step, metrics)
    if jax.process_index() == 0:
      print(_progress(step, self._run.config.num_train_steps,
                      metrics["step_time_s"], metrics,
                      first=step == self._run.start_step + 1), flush=True)
    self._open_window()

  def _row(self, step: int, metrics: dict) -> dict:
    """The step's metrics with the window's speed, the lr, and the data
    counters summed over hosts (skipped records, captions cut to context)."""
    config, train_iter = self._run.config, self._run.train_iter
    elapsed = time.perf_counter() - self._window_start
    metrics["step_time_s"] = elapsed / self._window_steps
    metrics["images_per_s"] = (config.data.global_batch * self._window_steps
                               / elapsed)
    metrics["lr"] = float(step_lib.learning_rate_schedule(
        config.optim.lr, config.optim, config.num_train_steps)(
        step // config.optim.accum_steps))
    metrics["logit_scale"] = float(np.log(metrics["temperature"]))
    if self._peak:
      metrics["mfu"] = self._window_flops / elapsed / (self._peak * jax.device_count())
    skipped = _sum_over_hosts(train_iter.skip_totals)
    for reason, count in zip(pipeline.SKIP_REASONS, skipped):
      metrics[f"data/skipped_{reason}"] = int(count)
    cut = _sum_over_hosts(np.asarray([train_iter.truncated[k] for k in
                                      pipeline.TRUNCATION_COUNTS]))
    for name, count in zip(("truncated_long", "truncated_short", "examples"), cut):
      metrics[f"data/{name}"] = int(count)
    return metrics


@dataclasses.dataclass
class _LoopEnd:
  """Where the loop stopped, and why when before config.num_train_steps."""
  step: int
  preempted: bool = False  # a signal or the preemption notice; saved
  divergence: Optional[DivergenceWatch] = None  # set when the run diverged


def _loop(run: _Run, guard: PreemptionGuard) -> _LoopEnd:
  """Steps up to config.num_train_steps, each followed by its row, eval and
  checkpoint when due; ends early on a signal or divergence."""
  train_step, progress = _TrainStep(run), _ProgressLog(run)
  divergence = DivergenceWatch(run.config.optim.get("max_skipped_updates", 0))
  step = run.start_step
  in_flight = None  # the previous step's (step, loss, skipped): one queued
  while step < run.config.num_train_steps:
    host = run.train_iter.next(stop=lambda: guard.requested)
    if host is None:  # a signal while waiting for data (a read may be stuck)
      if step not in run.manager.all_steps():
        run.save(step, wait=True)
      logging.warning("Preempted at step %d while waiting for data: "
                      "checkpoint saved, exiting.", step)
      return _LoopEnd(step, preempted=True)
    metrics, lengths = train_step(host)
    # Reading the previous step waits for it: a signal stops within one step.
    # Diverged: the step just queued is neither counted nor saved.
    if in_flight is not None and divergence.observe(*in_flight):
      return _LoopEnd(step, divergence=divergence)
    in_flight = (step + 1, metrics["loss"], metrics["skipped"])
    step += 1
    progress.count(lengths)
    if progress.due(step):
      progress.write(step, metrics)
    if _eval_and_save(run, guard, step):
      logging.warning("Preempted at step %d: checkpoint saved, exiting.", step)
      return _LoopEnd(step, preempted=True)
  if in_flight is not None and divergence.observe(*in_flight):  # the last step
    return _LoopEnd(step, divergence=divergence)
  return _LoopEnd(step)


def _eval_and_save(run: _Run, guard: PreemptionGuard, step: int) -> bool:
  """Evaluation and checkpoint due after `step`; True when the run stops
  here (a signal, or the preemption notice: saved synchronously)."""
  config = run.config
  preempted = guard.requested or run.manager.reached_preemption(step)
  eval_every = config.eval_every or config.num_train_steps
  if run.evaluate and not preempted and (step % eval_every == 0 or
                                         step == config.num_train_steps):
    run.run_eval(step)
  last = preempted or step == config.num_train_steps
  if step % config.checkpoint_every == 0 or last:
    run.save(step, wait=last)
  checkpoint.check_saves(run.manager)  # a failed save stops the run at once
  return preempted


def _finish(run: _Run, end: _LoopEnd) -> None:
  """Waits for the saves (a failed one raises); DivergenceError when the run
  diverged, else a stopped run says how to resume."""
  checkpoint.check_saves(run.manager, wait=True)
  run.writer.close()
  if end.divergence is not None:
    raise end.divergence.error(run.config, end.step, run.workdir)
  if end.preempted:
    _say(f"Stopped by a signal at step {end.step}; its checkpoint is saved: "
         "rerun the same command to resume.")


def _print_outcome(workdir: str, evaluated: bool) -> None:
  """The end of a run on the console: the eval table, plots, TensorBoard, report."""
  report.write_train_curves(workdir, metrics_lib.read_metrics(workdir))
  root = fileio.path(workdir)
  if evaluated:
    print(report.console_table(report.read_results(workdir)), end="")
  plots = [os.fspath(root / name) for name in
           (report.RECALL_PNG, report.HISTORY_PNG, report.TRAIN_PNG)
           if fileio.exists(root / name)]
  if plots:
    print("Plots: " + ", ".join(plots))
  print(f"TensorBoard: tensorboard --logdir={os.fspath(root / metrics_lib.TB_SUBDIR)}")
  if evaluated:
    print(f"Report: {os.fspath(root / report.MARKDOWN_NAME)}", flush=True)


# ----------------------------------------------------------------------------
# --mode=eval: the same model parts, a checkpoint's params.

def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        on_start: Optional[Callable[[], None]] = None) -> list:
  """--mode=eval: scores config.init_from, or WORKDIR's latest train state
  (config.resume_step: that step's). `on_start()` runs once the model is
  loaded, before the first write."""
  parts = _model_parts(config)
  params, step = _checkpoint_params(config, workdir, parts)
  if on_start is not None:
    on_start()
  results = parts.evaluate(params, workdir, step)
  if jax.process_index() == 0:
    print(report.console_table(report.read_results(workdir)), end="")
    print(f"Report: {os.fspath(fileio.path(workdir) / report.MARKDOWN_NAME)}",
          flush=True)
  return results


def _checkpoint_params(config, workdir: str, parts: _ModelParts):
  """(params, step) --mode=eval scores: config.init_from's (results at
  WORKDIR's step, if any), else the train state's (read only)."""
  steps = checkpoint.saved_steps(workdir)  # read only: nothing created
  step = config.resume_step or (steps[-1] if steps else None)
  if not config.init_from and config.resume_step and step not in steps:
    raise ValueError(f"config.resume_step={step}: no such checkpoint in "
                     f"{workdir}/{checkpoint.TRAIN_CHECKPOINT_SUBDIR} (saved "
                     f"steps: {steps or 'none'})")
  if config.init_from:
    params = _init_from_params(config, parts.cfg, logit_scale=0.0)
    return jax.device_put(params, sharding.replicated(parts.mesh)), step
  if step is None:
    raise ValueError(f"--mode=eval needs --config.init_from or a training "
                     f"checkpoint in {workdir}/{checkpoint.TRAIN_CHECKPOINT_SUBDIR}")
  checkpoint.check_resume(workdir, parts.cfg, with_data=False)
  manager = checkpoint.make_train_manager(workdir, config.keep_checkpoints)
  abstract, _, _ = step_lib.abstract_state(config, parts.model, parts.mesh)
  state, step = checkpoint.restore_newest(manager, abstract, newest=step,
                                          fallback=not config.resume_step)
  return state["params"], step
