"""models/encoders.py: one jitted-encoder builder for the API, evaluation and
the benchmark; a second evaluation in a run compiles nothing."""
import os
import shutil
import tempfile
import types
from unittest import mock

from absl.testing import absltest
import jax
import numpy as np

from fixclip_jax import api
from fixclip_jax import config_base
from fixclip_jax import sharding
from fixclip_jax.data import tokenizers
from fixclip_jax.evaluation import run as eval_run
from fixclip_jax.models import clip
from fixclip_jax.models import encoders
from fixclip_jax.models import sizes
from fixclip_jax.tools import bench

# jax records this event once per XLA compilation (a jit cache miss), not on
# a call that reuses a compiled program.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Counts XLA compilations while active (jax.monitoring's event)."""

  def __init__(self):
    self.count = 0

  def _on_event(self, event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == _COMPILE_EVENT:
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._on_event)


def tiny_eval_config():
  """configs/demo.py's model, evaluated on 8 held-out synthetic scenes."""
  c = config_base.load_config_file(
      os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"))
  c.eval.datasets = "synthetic"
  c.eval.synthetic_num = 8
  c.eval.batch_size = 8
  return c


class EncoderBuilderTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    encoders.tower_fns.cache_clear()  # compilations of earlier tests don't count

  def test_counter_sees_a_compilation(self):
    with CompileCounter() as first:
      jax.jit(lambda x: x * 3 + 1)(np.arange(5.0))
    self.assertEqual(first.count, 1)

  def test_evaluating_twice_compiles_once(self):
    config = tiny_eval_config()
    cfg = sizes.model_config(config)
    params = clip.init_params(cfg, jax.random.PRNGKey(0))
    mesh = sharding.make_mesh()
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    with CompileCounter() as first:
      results = eval_run.evaluate(config, clip.CLIP(cfg), params, mesh,
                                  workdir=workdir, step=1)
    # A fresh module of the same fields, as a later eval (or a restart of the
    # loop's model) would hold.
    with CompileCounter() as second:
      again = eval_run.evaluate(config, clip.CLIP(cfg), params, mesh,
                                workdir=workdir, step=2)
    self.assertGreater(first.count, 0)
    self.assertEqual(second.count, 0, "the second evaluation compiled "
                     f"{second.count} program(s)")
    self.assertEqual([r["t2i_R@1"] for r in results],
                     [r["t2i_R@1"] for r in again])

  def test_api_evaluation_and_bench_share_one_builder(self):
    cfg = sizes.get_config("tiny")
    towers = encoders.tower_fns(clip.CLIP(cfg))
    self.assertIs(api.tower_fns(cfg), towers)
    # A different compute dtype is a different program.
    self.assertIsNot(encoders.tower_fns(clip.CLIP(cfg, dtype=np.float16))[0],
                     towers[0])
    # Two API models of one architecture: the second compiles nothing.
    params = clip.init_params(cfg, jax.random.PRNGKey(1))
    tokens = np.zeros((3, cfg.context_length), np.int32)
    tokens[:, 0], tokens[:, 1] = 49406, cfg.eot_token_id or 49407
    first_model = api.Model(params=params, cfg=cfg, batch_size=4,
                            tokenizer=_tokenizer(cfg))
    first = first_model.encode_tokens(tokens)
    with CompileCounter() as counter:
      second = api.Model(params=params, cfg=cfg, batch_size=4,
                         tokenizer=_tokenizer(cfg)).encode_tokens(tokens)
    self.assertEqual(counter.count, 0)
    np.testing.assert_array_equal(first, second)

  def test_bench_times_the_shared_towers(self):
    config = tiny_eval_config()
    cfg = sizes.model_config(config)
    model = clip.CLIP(cfg)
    step = types.SimpleNamespace(  # what eval_throughput reads of a JaxTrainStep
        config=config, cfg=cfg, model=model,
        state={"params": clip.init_params(cfg, jax.random.PRNGKey(3))})
    with mock.patch.object(encoders, "tower_fns",
                           wraps=encoders.tower_fns) as builder:
      out = bench.eval_throughput(step, sharding.make_mesh(), warmup=0, steps=1)
    builder.assert_called_once_with(model)
    self.assertGreater(out["eval_images_per_s"], 0)


def _tokenizer(cfg):
  return tokenizers.get_tokenizer("clip", context_length=cfg.context_length)


if __name__ == "__main__":
  absltest.main()
