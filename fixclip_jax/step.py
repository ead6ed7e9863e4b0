"""The train step: model, optimizer and objective from a config, and the
sharded state they update.

Data flows one way (WORKSPACE.md): global batch on the mesh ->
`CLIP.train_outputs` -> the objective's loss (losses.OBJECTIVES) -> optax
update. This is the only module where model and losses meet. It imports no
data or evaluation code, so the step runs (and is benchmarked) on machines
that only have the model's dependencies.
"""
import functools
import re
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fixclip_jax import losses
from fixclip_jax import pixels
from fixclip_jax import sharding
from fixclip_jax.models import clip
from fixclip_jax.models import fixclip
from fixclip_jax.models import sizes

Array = jax.Array
TrainState = Dict[str, Any]  # {"params", "opt_state", "step", "rng", "num_skipped"}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def make_model(config: ml_collections.ConfigDict, cfg: sizes.CLIPConfig) -> clip.CLIP:
  if config.dtype not in DTYPES:
    raise ValueError(f"config.dtype={config.dtype!r}; use one of {sorted(DTYPES)}")
  return clip.CLIP(cfg, dtype=DTYPES[config.dtype],
                   attn_implementation=config.get("attn_implementation") or None,
                   remat=config.remat)


# ----------------------------------------------------------------------------
# Optimizer.

def param_labels(params: Any, optim: ml_collections.ConfigDict) -> Any:
  """'frozen' | 'new' | 'base' per parameter, from optim's regexes.

  optim: the run config's `optim` block (config_base.py); here and below the
  optimizer's functions read only that block.
  """
  frozen = re.compile(optim.frozen_regex) if optim.frozen_regex else None
  new = re.compile(optim.new_params_regex) if optim.new_params_regex else None

  def label(path, _):
    name = sharding.path_str(path)
    if frozen is not None and frozen.fullmatch(name):
      return "frozen"
    if new is not None and new.fullmatch(name):
      return "new"
    return "base"

  return jax.tree_util.tree_map_with_path(label, params)


def frozen_mask(params: Any, optim: ml_collections.ConfigDict) -> Any:
  """True for parameters the optimizer keeps frozen (optim.frozen_regex)."""
  return jax.tree.map(lambda label: label == "frozen", param_labels(params, optim))


def zero_frozen(grads: Any, optim: ml_collections.ConfigDict) -> Any:
  """Gradients with the frozen parameters' entries zeroed."""
  return jax.tree.map(lambda g, frozen: jnp.zeros_like(g) if frozen else g,
                      grads, frozen_mask(grads, optim))


def decay_mask(params: Any, optim: ml_collections.ConfigDict) -> Any:
  """True where weight decay applies: not on names matching optim.no_decay_regex."""
  no_decay = re.compile(optim.no_decay_regex) if optim.no_decay_regex else None
  return jax.tree_util.tree_map_with_path(
      lambda p, _: not (no_decay and no_decay.fullmatch(sharding.path_str(p))),
      params)


def learning_rate_schedule(peak: float, optim: ml_collections.ConfigDict,
                           num_train_steps: int) -> optax.Schedule:
  """Linear warmup then cosine decay to 0 over the run (in optimizer updates:
  num_train_steps micro-batches are num_train_steps / optim.accum_steps)."""
  total = max(num_train_steps // optim.accum_steps, 1)
  warmup = min(optim.warmup_steps, total)
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup, max(total, warmup + 1), end_value=0.0)


def make_optimizer(params: Any, optim: ml_collections.ConfigDict,
                   num_train_steps: int) -> optax.GradientTransformation:
  """AdamW with decay mask, separate lr for new params, frozen params, clipping
  and gradient accumulation (optax.MultiSteps: one call = one micro-batch)."""
  mask = decay_mask(params, optim)

  def adamw(lr):
    return optax.adamw(learning_rate_schedule(lr, optim, num_train_steps),
                       b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay, mask=mask)

  tx = optax.chain(
      # Frozen parameters' gradients are zeroed first, so they never count in
      # the clipping norm.
      optax.masked(optax.set_to_zero(), frozen_mask(params, optim)),
      optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip else optax.identity(),
      optax.multi_transform(
          {"base": adamw(optim.lr), "new": adamw(optim.new_params_lr or optim.lr),
           "frozen": optax.set_to_zero()},
          param_labels(params, optim)))
  if optim.accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim.accum_steps)
  return tx


# ----------------------------------------------------------------------------
# The train step.

def all_finite(tree: Any) -> Array:
  """True when every float entry of `tree` is finite (ints are skipped)."""
  flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.stack(flags).all() if flags else jnp.array(True)


def image_masks(masking: ml_collections.ConfigDict, rng: Array, batch: int,
                num_patches: int) -> dict:
  """The masked short branch's inputs for CLIP.train_outputs (docs/method.md §3).

  masking: the run config's `masking` block (ratio, mode).
  """
  masked, keep_index = fixclip.random_patch_mask(
      rng, batch, num_patches, masking.ratio)
  if masking.mode == "replace":
    return {"patch_mask": masked}
  if masking.mode == "drop":
    return {"keep_index": keep_index}
  raise ValueError(f"masking.mode={masking.mode!r}; use one of "
                   f"{' | '.join(fixclip.MASKING_MODES)}")


def make_train_step(config, model: clip.CLIP, tx: optax.GradientTransformation
                    ) -> Callable:
  """(state, batch) -> (state, metrics); jit it with shardings (`jit_train_step`).

  batch: image uint8 (or normalised float) [B, H, W, 3]; text_long [B, T],
  text_short [B, Ts] int32, any T <= context_length (buckets.py cuts them to
  length buckets; one compiled variant per shape).
  The objective's spec (losses.OBJECTIVES) says which branches run: the short
  caption and the masked image are computed only for objectives that read them.
  With config.optim.grad_cache_chunks = N > 1 the gradients come from
  `grad_cache_value_and_grad` (the same loss on the whole batch, the towers
  run N chunks at a time).
  """
  objective = losses.get_objective(config.objective)
  loss_of_outputs = objective.bind(config.loss)
  max_logit_scale = config.loss.max_logit_scale
  num_patches = model.cfg.num_patches
  num_chunks = config.optim.get("grad_cache_chunks", 1)

  def step_fn(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state["rng"], state["step"])
    # The pipeline sends uint8 pixels; normalised here, bit-identical to the
    # eval transform (pixels.py). Float batches are taken as normalised.
    images = pixels.model_input(batch["image"], jnp)                # [B, H, W, 3]
    masks = (image_masks(config.masking, rng, images.shape[0], num_patches)
             if objective.masked_image else {})
    text_short = batch["text_short"] if objective.short_caption else None

    def loss_fn(params):
      out = model.apply({"params": params}, images, batch["text_long"],
                        text_short, method=clip.CLIP.train_outputs, **masks)
      out["logit_scale"] = losses.clamp_logit_scale(out["logit_scale"], max_logit_scale)
      return loss_of_outputs(out)

    if num_chunks > 1:
      inputs = dict(masks, images=images, text_long=batch["text_long"])
      if text_short is not None:
        inputs["text_short"] = text_short
      (loss, terms), grads = grad_cache_value_and_grad(
          model, loss_of_outputs, max_logit_scale, num_chunks)(
              state["params"], inputs)
    else:
      (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    # The optimizer zeroes frozen parameters' gradients before clipping; the
    # logged norm is the same trainable-only norm.
    grad_norm = optax.tree.norm(zero_frozen(grads, config.optim))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # CLIP caps the temperature parameter after every update (Long-CLIP: never).
    if max_logit_scale is not None:
      params["logit_scale"] = jnp.minimum(params["logit_scale"], max_logit_scale)
    # A batch with NaN/Inf features, loss or gradients is skipped, not
    # applied, and so is a finite one whose update is not (an overflowing
    # step): no NaN/Inf ever enters the state (config.skip_nonfinite; off =
    # apply it anyway, for debugging).
    bad = ((terms.get("nonfinite_features", 0) > 0) | ~jnp.isfinite(loss) |
           ~jnp.isfinite(grad_norm) | ~all_finite(params) |
           ~all_finite(opt_state)) & config.skip_nonfinite
    keep_old = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(bad, o, n), new, old)
    num_skipped = state["num_skipped"] + bad.astype(jnp.int32)
    new_state = {"params": keep_old(params, state["params"]),
                 "opt_state": keep_old(opt_state, state["opt_state"]),
                 "step": state["step"] + 1, "rng": state["rng"],
                 "num_skipped": num_skipped}
    metrics = dict(terms, loss=loss, grad_norm=grad_norm,
                   temperature=losses.temperature(
                       new_state["params"]["logit_scale"], max_logit_scale),
                   skipped=bad.astype(jnp.int32), skipped_total=num_skipped)
    return new_state, metrics

  return step_fn


# ----------------------------------------------------------------------------
# Gradient caching: full-batch negatives, a chunk's activations at a time.

# The tower outputs the objectives read (losses.py): what the cached step
# carries from the chunked towers to the full-batch loss. [B, d] features
# carry the batch on axis 0, "gta" [G, B, d] on axis 1.
LOSS_FEATURES = {"embedding": 0, "gta": 1}


def split_chunks(x: Array, num_chunks: int, axis: int = 0) -> Array:
  """[.., B, ..] -> [N, .., B/N, ..]; chunk i holds rows i, i+N, i+2N, ...

  Strided, not contiguous: with the batch sharded contiguously over D
  devices and B divisible by N*D, every chunk is spread over all devices,
  each device's part of it already local (no data moves).
  """
  b = x.shape[axis]
  if b % num_chunks:
    raise ValueError(f"optim.grad_cache_chunks={num_chunks} does not divide "
                     f"the batch of {b}")
  x = x.reshape(x.shape[:axis] + (b // num_chunks, num_chunks) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis + 1, 0)


def join_chunks(x: Array, axis: int = 0) -> Array:
  """split_chunks' inverse: [N, .., B/N, ..] -> [.., B, ..] in the batch's order."""
  x = jnp.moveaxis(x, 0, axis + 1)                                # [.., B/N, N, ..]
  return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def _map_features(fn, features: dict) -> dict:
  """fn(array, batch_axis) over {branch: {feature: array}}."""
  return {branch: {k: fn(v, LOSS_FEATURES[k]) for k, v in tower.items()}
          for branch, tower in features.items()}


def grad_cache_value_and_grad(model: clip.CLIP, loss_of_outputs: Callable,
                              max_logit_scale, num_chunks: int) -> Callable:
  """(params, inputs) -> ((loss, terms), grads) with the whole batch's negatives,
  the towers' activations kept for one chunk at a time (gradient caching,
  Gao et al. 2021; docs/method.md §1).

  inputs: train_outputs' arguments by name (images [B, H, W, 3], text_long,
  text_short, patch_mask | keep_index), all [B, ...]. Three passes:
    1. the features the loss reads (LOSS_FEATURES of every branch) chunk by
       chunk, without gradient: nothing kept but [B, d]-sized features;
    2. the loss on the whole batch (PCM groups, label order, every negative
       as in the plain step) and its gradient with respect to those features
       and the logit scale;
    3. per chunk, the towers again under jax.vjp, pulled back with that
       chunk's slice of the feature gradient; parameter gradients summed.
  The loss is a function of the features only, so the sum equals the plain
  step's gradient (up to float rounding; tests/grad_cache_test.py). Both
  chunk loops are lax.scan: XLA keeps one chunk's activations alive
  (an unrolled loop lets the scheduler overlap chunks and keep several).
  Cost: the towers' forward runs twice (~4/3 of the plain step's FLOPs).
  """

  def chunk_features(params, chunk: dict) -> dict:
    out = model.apply({"params": params}, method=clip.CLIP.train_outputs, **chunk)
    return {branch: {k: v for k, v in tower.items() if k in LOSS_FEATURES}
            for branch, tower in out.items() if branch != "logit_scale"}

  def full_batch_loss(features: dict, logit_scale: Array):
    out = dict(features, logit_scale=losses.clamp_logit_scale(
        logit_scale, max_logit_scale))
    return loss_of_outputs(out)

  def value_and_grad(params, inputs: dict):
    chunks = jax.tree.map(lambda x: split_chunks(x, num_chunks), inputs)

    def embed(carry, chunk):
      return carry, chunk_features(params, chunk)

    _, features = jax.lax.scan(embed, None, chunks)               # [N, .., B/N, ..]
    features = _map_features(join_chunks, features)               # [.., B, ..]
    (loss, terms), (d_features, d_logit_scale) = jax.value_and_grad(
        full_batch_loss, argnums=(0, 1), has_aux=True)(
            features, params["logit_scale"])
    d_chunks = _map_features(lambda g, axis: split_chunks(g, num_chunks, axis),
                             d_features)

    def backward(grads, chunk_and_cotangent):
      chunk, d_chunk = chunk_and_cotangent
      _, pull_back = jax.vjp(lambda p: chunk_features(p, chunk), params)
      (d_params,) = pull_back(d_chunk)
      return jax.tree.map(jnp.add, grads, d_params), None

    grads, _ = jax.lax.scan(backward, jax.tree.map(jnp.zeros_like, params),
                            (chunks, d_chunks))
    grads = dict(grads, logit_scale=grads["logit_scale"] + d_logit_scale)
    return (loss, terms), grads

  return value_and_grad


# ----------------------------------------------------------------------------
# State on the mesh.

def _state_maker(seed: int, tx: optax.GradientTransformation) -> Callable:
  state_rng = jax.random.split(jax.random.PRNGKey(seed))[1]

  def make(params):
    return {"params": params, "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32), "rng": state_rng,
            "num_skipped": jnp.zeros((), jnp.int32)}

  return make


def abstract_state(config, model: clip.CLIP, mesh
                   ) -> Tuple[TrainState, TrainState, optax.GradientTransformation]:
  """(ShapeDtypeStructs of the train state with their shardings, shardings, tx)
  without allocating anything: what a restore needs."""
  params = jax.eval_shape(functools.partial(clip.init_params, model.cfg),
                          jax.random.PRNGKey(0))
  tx = make_optimizer(params, config.optim, config.num_train_steps)
  shapes = jax.eval_shape(_state_maker(config.seed, tx), params)
  shardings = sharding.state_shardings(
      shapes, mesh, [tuple(r) for r in config.sharding_rules])
  abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)
  return abstract, shardings, tx


def init_state(config, model: clip.CLIP, mesh, params: Any = None,
               ) -> Tuple[TrainState, TrainState, optax.GradientTransformation]:
  """Creates the train state directly sharded on the mesh.

  params: pretrained params (host arrays) or None for a random init.
  Returns (state, shardings, tx).
  """
  if params is None:
    init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]
    params = clip.init_params(model.cfg, init_rng)
  _, shardings, tx = abstract_state(config, model, mesh)
  state = jax.jit(_state_maker(config.seed, tx), out_shardings=shardings)(params)
  return state, shardings, tx


def jit_train_step(step_fn, mesh, shardings: TrainState, batch_example: dict):
  batch_shardings = jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch_example)
  return jax.jit(step_fn, in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))
