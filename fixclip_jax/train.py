"""Training: optimizer, the sharded train step, and the loop.

Data flows one way (design.md): host batch -> global batch on the mesh ->
`CLIP.train_outputs` -> objective (losses.py) -> optax update -> checkpoint.
The train step is the only place where model and losses meet.
"""
import functools
import re
import signal
import time
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fixclip_jax import losses
from fixclip_jax import sharding
from fixclip_jax.models import clip
from fixclip_jax.models import fixclip
from fixclip_jax.models import sizes

Array = jax.Array
TrainState = Dict[str, Any]  # {"params", "opt_state", "step", "rng", "num_skipped"}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------
# Model from config.

def model_config(config: ml_collections.ConfigDict) -> sizes.CLIPConfig:
  """CLIPConfig from config.model_name ("B/16") plus config.model overrides."""
  overrides = dict(config.model)
  if overrides.get("prompt_layers") is not None:
    overrides["prompt_layers"] = tuple(overrides["prompt_layers"])
  return sizes.get_config(config.model_name, **overrides)


def make_model(config, cfg: sizes.CLIPConfig) -> clip.CLIP:
  if config.dtype not in DTYPES:
    raise ValueError(f"config.dtype={config.dtype!r}; use one of {sorted(DTYPES)}")
  return clip.CLIP(cfg, dtype=DTYPES[config.dtype],
                   attn_implementation=config.get("attn_implementation") or None,
                   remat=config.remat)


# ----------------------------------------------------------------------------
# Optimizer.

def param_labels(params: Any, config) -> Any:
  """'frozen' | 'new' | 'base' per parameter, from the config's regexes."""
  frozen = re.compile(config.optim.frozen_regex) if config.optim.frozen_regex else None
  new = re.compile(config.optim.new_params_regex) if config.optim.new_params_regex else None

  def label(path, _):
    name = sharding.path_str(path)
    if frozen is not None and frozen.fullmatch(name):
      return "frozen"
    if new is not None and new.fullmatch(name):
      return "new"
    return "base"

  return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params: Any, config) -> Any:
  """True where weight decay applies: not on names matching no_decay_regex."""
  no_decay = (re.compile(config.optim.no_decay_regex)
              if config.optim.no_decay_regex else None)
  return jax.tree_util.tree_map_with_path(
      lambda p, _: not (no_decay and no_decay.fullmatch(sharding.path_str(p))),
      params)


def learning_rate_schedule(peak: float, config) -> optax.Schedule:
  """Linear warmup then cosine decay to 0 over the run (in optimizer updates)."""
  total = max(config.num_train_steps // config.optim.accum_steps, 1)
  warmup = min(config.optim.warmup_steps, total)
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup, max(total, warmup + 1), end_value=0.0)


def make_optimizer(params: Any, config) -> optax.GradientTransformation:
  """AdamW with decay mask, separate lr for new params, frozen params, clipping
  and gradient accumulation (optax.MultiSteps: one call = one micro-batch)."""
  o = config.optim
  mask = decay_mask(params, config)

  def adamw(lr):
    return optax.adamw(learning_rate_schedule(lr, config), b1=o.b1, b2=o.b2,
                       eps=o.eps, weight_decay=o.weight_decay, mask=mask)

  tx = optax.chain(
      optax.clip_by_global_norm(o.grad_clip) if o.grad_clip else optax.identity(),
      optax.multi_transform(
          {"base": adamw(o.lr), "new": adamw(o.new_params_lr or o.lr),
           "frozen": optax.set_to_zero()},
          param_labels(params, config)))
  if o.accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.accum_steps)
  return tx


# ----------------------------------------------------------------------------
# The train step.

def objective_fn(config, num_batch_shards: int) -> Callable:
  """losses.OBJECTIVES[config.objective] with its config.loss arguments."""
  l = config.loss
  name = config.objective
  if name == "clip":
    kw = dict(label_smoothing=l.label_smoothing)
  elif name == "longclip":
    kw = dict(short_weight=l.short_weight, label_smoothing=l.label_smoothing,
              pcm=l.pcm, pcm_components=l.pcm_components)
  elif name == "fixclip":
    kw = dict(short_weight=l.short_weight, gta_weights=tuple(l.gta_weights),
              gta_first_group=l.gta_first_group, label_smoothing=l.label_smoothing,
              pcm=l.pcm, pcm_components=l.pcm_components)
  else:
    raise ValueError(f"config.objective={name!r}; use clip | longclip | fixclip")
  if name != "clip":
    kw["pcm_shards"] = num_batch_shards if l.pcm_per_device else 1
  return functools.partial(losses.OBJECTIVES[name], **kw)


def image_masks(config, rng: Array, batch: int, num_patches: int) -> dict:
  """FIX-CLIP's short-branch masking inputs for CLIP.train_outputs (§3)."""
  if config.objective != "fixclip":
    return {}
  masked, keep_index = fixclip.random_patch_mask(
      rng, batch, num_patches, config.masking.ratio)
  if config.masking.mode == "replace":
    return {"patch_mask": masked}
  if config.masking.mode == "drop":
    return {"keep_index": keep_index}
  raise ValueError(f"config.masking.mode={config.masking.mode!r}; use replace | drop")


def make_train_step(config, model: clip.CLIP, tx: optax.GradientTransformation,
                    num_batch_shards: int) -> Callable:
  """(state, batch) -> (state, metrics); jit it with shardings (see Trainer)."""
  objective = objective_fn(config, num_batch_shards)
  num_patches = model.cfg.num_patches

  def step_fn(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state["rng"], state["step"])
    masks = image_masks(config, rng, batch["image"].shape[0], num_patches)

    # The clip objective has no short branch: do not pay for its text pass.
    text_short = None if config.objective == "clip" else batch["text_short"]

    def loss_fn(params):
      out = model.apply({"params": params}, batch["image"], batch["text_long"],
                        text_short, method=clip.CLIP.train_outputs, **masks)
      return objective(out)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # CLIP clamps the temperature parameter at ln(100) after every update.
    params["logit_scale"] = jnp.minimum(params["logit_scale"], losses.MAX_LOGIT_SCALE)
    # A batch with NaN/Inf features or gradients is skipped, not applied
    # (config.skip_nonfinite; off = apply it anyway, for debugging).
    bad = ((terms.get("nonfinite_features", 0) > 0) | ~jnp.isfinite(loss) |
           ~jnp.isfinite(grad_norm)) & config.skip_nonfinite
    keep_old = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(bad, o, n), new, old)
    num_skipped = state["num_skipped"] + bad.astype(jnp.int32)
    new_state = {"params": keep_old(params, state["params"]),
                 "opt_state": keep_old(opt_state, state["opt_state"]),
                 "step": state["step"] + 1, "rng": state["rng"],
                 "num_skipped": num_skipped}
    metrics = dict(terms, loss=loss, grad_norm=grad_norm,
                   temperature=losses.temperature(params["logit_scale"]),
                   skipped=bad.astype(jnp.int32), skipped_total=num_skipped)
    return new_state, metrics

  return step_fn


# ----------------------------------------------------------------------------
# State on the mesh.

def state_shardings(state_shapes: TrainState, mesh, config) -> TrainState:
  """Shardings for the train state: params and optimizer moments by rules."""
  rules = [tuple(r) for r in config.sharding_rules]
  return sharding.shardings_for(state_shapes, mesh, rules)


def init_state(config, model: clip.CLIP, mesh, params: Optional[Any] = None,
               ) -> Tuple[TrainState, TrainState, optax.GradientTransformation]:
  """Creates the train state directly sharded on the mesh.

  params: pretrained params (host arrays) or None for a random init.
  Returns (state, shardings, tx).
  """
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  if params is None:
    params = clip.init_params(model.cfg, init_rng)
  tx = make_optimizer(params, config)

  def make(params):
    return {"params": params, "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32), "rng": state_rng,
            "num_skipped": jnp.zeros((), jnp.int32)}

  shapes = jax.eval_shape(make, params)
  shardings = state_shardings(shapes, mesh, config)
  state = jax.jit(make, out_shardings=shardings)(params)
  return state, shardings, tx


def jit_train_step(step_fn, mesh, shardings: TrainState, batch_example: dict):
  batch_shardings = jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch_example)
  return jax.jit(step_fn, in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))


class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

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
    logging.warning("Signal %d: saving a checkpoint and stopping.", signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


# ----------------------------------------------------------------------------
# The loop.

def _host_batch(batch: dict) -> dict:
  return {k: batch[k] for k in ("image", "text_long", "text_short")}


def _write_config_copy(config, workdir: str) -> None:
  """WORKDIR/config.json: the resolved config of this run (process 0)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  directory = epath.Path(workdir)  # local path or gs:// URL
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(config.to_json_best_effort(indent=2))


def _sum_over_hosts(counts: np.ndarray) -> np.ndarray:
  """Per-host counters summed over all processes (a collective: call on all)."""
  if jax.process_count() == 1:
    return counts
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(counts)).sum(0)


def _progress(step: int, total: int, step_time: float, metrics: dict) -> str:
  """One concise stdout line: step, loss, speed, ETA."""
  eta = max(total - step, 0) * step_time
  terms = " ".join(f"{k[5:]}={metrics[k]:.3f}" for k in sorted(metrics)
                   if k.startswith("loss_"))
  return (f"[{step}/{total}] loss={metrics['loss']:.4f} ({terms}) "
          f"{metrics['images_per_s']:.1f} img/s, ETA {eta / 60:.1f} min")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate: bool = True) -> TrainState:
  """Trains config.num_train_steps micro-steps, resuming from WORKDIR if it
  holds a checkpoint; evaluates every config.eval_every steps and at the end
  (and before the first step when config.eval_at_start)."""
  # Imported here so that the model/step import path stays free of data-only
  # dependencies (grain, tfds) for tools that only need the step.
  from fixclip_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from fixclip_jax import flops  # pylint: disable=g-import-not-at-top
  from fixclip_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from fixclip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from fixclip_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from fixclip_jax.evaluation import run as eval_run  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  logging.info("Devices: %s", sharding.describe(mesh))
  cfg = model_config(config)
  model = make_model(config, cfg)
  tokenizer = tokenizers.get_tokenizer("clip", context_length=cfg.context_length)
  data_config = config.data.copy_and_resolve_references()
  if data_config.image_size != cfg.image_size:
    raise ValueError(f"config.data.image_size={data_config.image_size} but model "
                     f"{config.model_name} takes {cfg.image_size}px images")
  train_iter = pipeline.make_train_iterator(data_config, tokenizer)

  _write_config_copy(config, workdir)
  checkpoint.write_workdir_model_config(workdir, cfg)  # convert --src=WORKDIR
  manager = checkpoint.make_train_manager(workdir, config.keep_checkpoints,
                                          best_metric=config.checkpoint_best_metric)
  resume = manager.latest_step() is not None
  params = None
  if config.init_from and not resume:
    fresh = clip.init_params(cfg, jax.random.PRNGKey(config.seed))
    params = checkpoint.load_pretrained(config.init_from, cfg, fresh,
                                        logit_scale=config.init_logit_scale)
  state, shardings, tx = init_state(config, model, mesh, params)
  if resume:
    state = checkpoint.restore_train_state(
        manager, checkpoint.abstract_like(state), train_iter)
    logging.info("Resumed from %s at step %d", workdir, int(state["step"]))
  start = int(jax.device_get(state["step"]))

  writer = metrics_lib.MetricWriter(workdir)
  eval_metrics = {}

  def run_eval(step):
    results = eval_run.evaluate(config, model, state["params"], mesh, tokenizer,
                                workdir=workdir, step=step)
    flat = eval_run.flat_metrics(results)
    writer.write(step, flat)
    return flat

  if evaluate and config.eval_at_start and start == 0:
    eval_metrics = run_eval(0)

  step_fn = make_train_step(config, model, tx, sharding.num_batch_shards(mesh))
  train_step = None  # jitted on the first batch, whose structure it needs
  flops_per_step = flops.train_step_flops(config)["total"]
  peak = 1e12 * (config.peak_tflops or
                 flops.peak_tflops_for(jax.devices()[0].device_kind) or 0.0)
  skipped = np.zeros(len(pipeline.SKIP_REASONS), np.int64)  # this host, this run
  images_per_step = config.data.global_batch
  eval_every = config.eval_every or config.num_train_steps
  timer_start, timer_steps = time.perf_counter(), 0
  step = start
  skipped_logged, last_logged = int(jax.device_get(state["num_skipped"])), start
  with PreemptionGuard() as guard:
    while step < config.num_train_steps:
      host = next(train_iter)
      skipped += np.asarray(host["skipped"]).sum(0)
      batch = sharding.global_batch(_host_batch(host), mesh)
      if train_step is None:
        train_step = jit_train_step(step_fn, mesh, shardings, batch)
      state, metrics = train_step(state, batch)
      step += 1
      timer_steps += 1
      if step % config.log_every == 0 or step == config.num_train_steps:
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - timer_start
        metrics["step_time_s"] = elapsed / timer_steps
        metrics["images_per_s"] = images_per_step * timer_steps / elapsed
        metrics["lr"] = float(learning_rate_schedule(config.optim.lr, config)(
            step // config.optim.accum_steps))
        metrics["logit_scale"] = float(np.log(metrics["temperature"]))
        if peak:
          metrics["mfu"] = flops_per_step / metrics["step_time_s"] / (
              peak * jax.device_count())
        for reason, count in zip(pipeline.SKIP_REASONS, _sum_over_hosts(skipped)):
          metrics[f"data/skipped_{reason}"] = int(count)
        if metrics["skipped_total"] > skipped_logged:
          logging.warning(
              "%d update(s) skipped for NaN/Inf between steps %d and %d (this "
              "step: %d non-finite feature values); %d skipped in total",
              metrics["skipped_total"] - skipped_logged, last_logged + 1, step,
              int(metrics.get("nonfinite_features", 0)), metrics["skipped_total"])
          skipped_logged = int(metrics["skipped_total"])
        last_logged = step
        writer.write(step, metrics)
        if jax.process_index() == 0:
          print(_progress(step, config.num_train_steps, metrics["step_time_s"],
                          metrics), flush=True)
        timer_start, timer_steps = time.perf_counter(), 0
      preempted = guard.requested or manager.reached_preemption(step)
      if evaluate and not preempted and (step % eval_every == 0 or
                                         step == config.num_train_steps):
        eval_metrics = run_eval(step)
      if (step % config.checkpoint_every == 0 or preempted or
          step == config.num_train_steps):
        checkpoint.save_train_state(manager, step, state, train_iter,
                                    metrics=eval_metrics or None, force=True)
      if preempted:
        logging.warning("Preempted at step %d: checkpoint saved, exiting.", step)
        break
  manager.wait_until_finished()
  writer.close()
  return state


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> list:
  """--mode=eval: scores config.init_from, or WORKDIR's latest train state."""
  from fixclip_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from fixclip_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from fixclip_jax.evaluation import run as eval_run  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  cfg = model_config(config)
  model = make_model(config, cfg)
  manager = checkpoint.make_train_manager(workdir, config.keep_checkpoints)
  step = manager.latest_step()
  if config.init_from:
    fresh = clip.init_params(cfg, jax.random.PRNGKey(config.seed))
    params = checkpoint.load_pretrained(config.init_from, cfg, fresh, logit_scale=0.0)
    params = jax.device_put(params, sharding.replicated(mesh))
  elif step is not None:
    state, _, _ = init_state(config, model, mesh)
    params = checkpoint.restore_train_state(
        manager, checkpoint.abstract_like(state))["params"]
  else:
    raise ValueError(f"--mode=eval needs --config.init_from or a training "
                     f"checkpoint in {workdir}/{checkpoint.TRAIN_CHECKPOINT_SUBDIR}")
  tokenizer = tokenizers.get_tokenizer("clip", context_length=cfg.context_length)
  return eval_run.evaluate(config, model, params, mesh, tokenizer,
                           workdir=workdir, step=step)
