"""Gradient caching (step.grad_cache_value_and_grad, optim.grad_cache_chunks):
the chunked step's gradients are the plain step's, for every objective, on 1
and 8 devices; per-chunk negatives (what accum_steps computes) are not."""
import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from fixclip_jax import config_check
from fixclip_jax import losses
from fixclip_jax import pixels
from fixclip_jax import sharding
from fixclip_jax import step as step_lib
from fixclip_jax.models import clip
from fixclip_jax.models import sizes
from tests import train_test

BATCH = 32  # 8 devices x 4 chunks x 1 row
# Compiling dominates this test's time: XLA's CPU backend without its
# expensive LLVM passes compiles ~2x faster; both sides of every comparison
# are compiled alike.
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}


def tiny_config(objective: str, **overrides):
  """The demo's tiny model (float32) with `objective`; PCM on for longclip,
  in groups of 8 rows so that a group spans several chunks."""
  c = train_test.demo_config(objective=objective, **{"data.global_batch": BATCH})
  c.model.vocab_size = 1024  # a small token table: less to compile and update
  if objective == "longclip":
    c.loss.pcm = True
    c.loss.pcm_components = 4
    c.loss.pcm_group_size = 8
  for key, value in overrides.items():
    node = c
    *parents, name = key.split(".")
    for p in parents:
      node = node[p]
    node[name] = value
  return c


def host_batch(cfg, long_len: int, short_len: int, seed: int = 0) -> dict:
  """uint8 images and captions cut to bucket-like lengths, EOT (the largest
  id) at random places."""
  rng = np.random.default_rng(seed)
  eot = cfg.vocab_size - 1

  def texts(width):
    ids = rng.integers(1, eot - 1, (BATCH, width)).astype(np.int32)
    ends = rng.integers(2, width, (BATCH,))
    ids = np.where(np.arange(width)[None] < ends[:, None], ids, 0)
    ids[np.arange(BATCH), ends] = eot
    ids[:, 0] = eot - 1
    return ids

  return {"image": rng.integers(0, 256, (BATCH, cfg.image_size, cfg.image_size, 3),
                                dtype=np.uint8),
          "text_long": texts(long_len), "text_short": texts(short_len)}


def step_inputs(config, cfg, batch: dict) -> dict:
  """train_outputs' arguments as the step builds them (same random mask)."""
  objective = losses.get_objective(config.objective)
  inputs = {"images": pixels.model_input(jnp.asarray(batch["image"]), jnp),
            "text_long": jnp.asarray(batch["text_long"])}
  if objective.short_caption:
    inputs["text_short"] = jnp.asarray(batch["text_short"])
  if objective.masked_image:
    inputs.update(step_lib.image_masks(config.masking, jax.random.PRNGKey(3), BATCH,
                                       cfg.num_patches))
  return inputs


def full_batch_value_and_grad(model, loss_of_outputs, max_logit_scale):
  """The reference: jax.value_and_grad of the loss of one apply on the batch."""

  def loss_fn(params, inputs):
    out = model.apply({"params": params}, method=clip.CLIP.train_outputs, **inputs)
    out["logit_scale"] = losses.clamp_logit_scale(out["logit_scale"], max_logit_scale)
    return loss_of_outputs(out)

  return jax.value_and_grad(loss_fn, has_aux=True)


def per_chunk_value_and_grad(model, loss_of_outputs, max_logit_scale, num_chunks):
  """What the cotangent must not be: each chunk's loss over its own negatives
  (as accumulation computes), averaged."""
  reference = full_batch_value_and_grad(model, loss_of_outputs, max_logit_scale)

  def value_and_grad(params, inputs):
    chunks = jax.tree.map(lambda x: step_lib.split_chunks(x, num_chunks), inputs)
    (losses_, _), grads = jax.vmap(reference, in_axes=(None, 0))(params, chunks)
    return (losses_.mean(), {}), jax.tree.map(lambda g: g.mean(axis=0), grads)

  return value_and_grad


# (objective, long / short text lengths (bucket-like; equal lengths share one
# text pass), overrides) per case; every case runs in one compiled program per
# mesh (compiling dominates this test's time).
CASES = {
    "clip": ("clip", 48, 16, {}),
    "longclip": ("longclip", 48, 48, {"remat": "full"}),
    "fixclip": ("fixclip", 64, 16, {}),
}
NUM_CHUNKS = 4


def value_and_grad_fns(config, num_chunks: int = NUM_CHUNKS) -> dict:
  """{"full", "cached", "per_chunk"}: (params, inputs) -> ((loss, terms), grads)."""
  model = step_lib.make_model(config, sizes.model_config(config))
  loss_of_outputs = losses.get_objective(config.objective).bind(config.loss)
  cap = config.loss.max_logit_scale
  return {"full": full_batch_value_and_grad(model, loss_of_outputs, cap),
          "cached": step_lib.grad_cache_value_and_grad(
              model, loss_of_outputs, cap, num_chunks),
          "per_chunk": per_chunk_value_and_grad(
              model, loss_of_outputs, cap, num_chunks)}


@functools.lru_cache(maxsize=None)
def host_params(config_key: str = "fixclip") -> dict:
  """The tiny model's random params (host arrays), logit scale below the cap
  (so that it has a gradient)."""
  params = jax.device_get(clip.init_params(
      sizes.model_config(tiny_config(config_key)), jax.random.PRNGKey(1)))
  params["logit_scale"] = np.float32(np.log(20.0))
  return params


def all_gradients(mesh, ways=("full", "cached")) -> dict:
  """{case: {way: (loss, grads)}} for every CASES entry, params sharded as
  training shards them and the batch split over the mesh."""
  configs = {name: tiny_config(obj, **overrides)
             for name, (obj, _, _, overrides) in CASES.items()}
  cfg = sizes.model_config(configs["fixclip"])  # one model for all cases
  params = host_params()
  params = jax.device_put(params, sharding.shardings_for(params, mesh))
  batch_sharding = sharding.batch_sharding(mesh)
  inputs = {}
  for name, (_, long_len, short_len, _) in CASES.items():
    x = step_inputs(configs[name], cfg, host_batch(cfg, long_len, short_len))
    inputs[name] = jax.device_put(x, jax.tree.map(lambda _: batch_sharding, x))
  fns = {name: value_and_grad_fns(c) for name, c in configs.items()}

  def run(params, inputs):
    out = {}
    for name in CASES:
      out[name] = {}
      for way in ways:
        (loss, _), grads = fns[name][way](params, inputs[name])
        out[name][way] = (loss, grads)
    return out

  compiled = jax.jit(run).lower(params, inputs).compile(FAST_COMPILE)
  return jax.device_get(compiled(params, inputs))


def max_relative_error(grads, reference) -> float:
  """Largest |g - ref| over a parameter, relative to that parameter's largest
  reference entry, over all parameters the loss reaches."""
  errors = jax.tree.map(
      lambda g, r: float(np.max(np.abs(g - r)) / max(np.max(np.abs(r)), 1e-30)),
      grads, reference)
  return max(jax.tree.leaves(errors))


MESHES = {"1 device": lambda: sharding.make_mesh(devices=jax.devices()[:1]),
          "8 devices": lambda: sharding.make_mesh(data=4, fsdp=2)}


class GradCacheTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.results = {}

  def gradients(self, mesh: str) -> dict:
    # The full-batch reference once, on one device (sharding it changes
    # nothing but rounding: train_test's sharded-step test).
    if mesh not in self.results:
      ways = (("full", "cached", "per_chunk") if mesh == "1 device" else
              ("cached",))
      self.results[mesh] = all_gradients(MESHES[mesh](), ways)
    return self.results[mesh]

  @parameterized.product(case=tuple(CASES), mesh=tuple(MESHES))
  def test_gradients_equal_the_full_batch_step(self, case, mesh):
    loss_full, full = self.gradients("1 device")[case]["full"]
    loss_cached, cached = self.gradients(mesh)[case]["cached"]
    np.testing.assert_allclose(loss_cached, loss_full, rtol=1e-6)
    self.assertLess(max_relative_error(cached, full), 2e-5, f"{case} on {mesh}")
    # The logit scale's gradient is part of it (it is not a tower output).
    self.assertNotEqual(float(full["logit_scale"]), 0.0)
    np.testing.assert_allclose(cached["logit_scale"], full["logit_scale"], rtol=1e-5)

  @parameterized.parameters(*CASES)
  def test_per_chunk_negatives_are_caught(self, case):
    # The tolerance above separates the full-batch gradient from per-chunk
    # negatives (what a wrong cotangent or accum_steps gives) by far.
    result = self.gradients("1 device")[case]
    self.assertGreater(max_relative_error(result["per_chunk"][1],
                                          result["full"][1]), 1e-2)

  def test_chunks_are_strided_and_joined_back_in_order(self):
    x = jnp.arange(2 * 12 * 3).reshape(2, 12, 3)                    # batch on axis 1
    chunks = step_lib.split_chunks(x, 4, axis=1)                     # [4, 2, 3, 3]
    self.assertEqual(chunks.shape, (4, 2, 3, 3))
    np.testing.assert_array_equal(chunks[1], x[:, 1::4])
    np.testing.assert_array_equal(step_lib.join_chunks(chunks, axis=1), x)
    with self.assertRaisesRegex(ValueError, "grad_cache_chunks=5"):
      step_lib.split_chunks(x, 5, axis=1)

  def test_train_step_with_4_chunks_equals_1(self):
    # The whole sharded step (8 devices, FSDP): same random patch mask (both
    # steps draw it for the whole batch), same update, same metrics.
    mesh = MESHES["8 devices"]()
    runs = {}
    for chunks in (1, 4):
      config = tiny_config("fixclip", **{"optim.grad_cache_chunks": chunks,
                                         "optim.warmup_steps": 0,
                                         "masking.mode": "drop"})
      cfg = sizes.model_config(config)
      model = step_lib.make_model(config, cfg)
      state, shardings, tx = step_lib.init_state(config, model, mesh, host_params())
      batches = [sharding.global_batch(host_batch(cfg, 64, 16, seed=s), mesh)
                 for s in range(2)]
      step = step_lib.jit_train_step(step_lib.make_train_step(config, model, tx),
                                     mesh, shardings, batches[0])
      step = step.lower(state, batches[0]).compile(FAST_COMPILE)
      metrics = []
      for batch in batches:
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
      runs[chunks] = jax.device_get(state["params"]), metrics
    p1, m1 = runs[1]
    p4, m4 = runs[4]
    for step in range(2):
      for k in ("loss", "loss_long", "loss_short", "loss_gta_2", "grad_norm"):
        np.testing.assert_allclose(m4[step][k], m1[step][k], rtol=1e-5,
                                   err_msg=f"step {step} {k}")
    # Two Adam updates of lr 1e-3 (Adam divides by |g|: rounding grows).
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5),
                 p4, p1)

  def test_config_check_names_the_knob(self):
    config = tiny_config("fixclip", **{"optim.grad_cache_chunks": 0})
    with self.assertRaisesRegex(config_check.ConfigError,
                                r"config.optim.grad_cache_chunks=0: must be > 0"):
      config_check.check_ranges(config)
    config.optim.grad_cache_chunks = 8                               # 8 x 8 > 32
    with self.assertRaisesRegex(config_check.ConfigError,
                                r"config.optim.grad_cache_chunks=8: times the 8 "
                                r"devices must divide data.global_batch=32"):
      config_check.check_devices(config, device_count=8, process_count=1)
    config.optim.grad_cache_chunks = 4
    config_check.check_devices(config, device_count=8, process_count=1)


if __name__ == "__main__":
  absltest.main()
