"""An objective is one entry in losses.OBJECTIVES: the step, FLOPs and the
training loop read its spec, so a new one trains without touching them."""
import json
import os
import tempfile

from absl.testing import absltest
import jax.numpy as jnp

from fixclip_jax import flops
from fixclip_jax import losses
from fixclip_jax import train
from tests import train_test


def toy_objective(out, *, label_smoothing=0.0):
  """InfoNCE on the short caption only: a branch the clip objective skips."""
  l_short = losses.infonce(out["image"]["embedding"], out["text_short"]["embedding"],
                           out["logit_scale"], label_smoothing)
  # Touches the long text too, so every parameter group gets a gradient.
  l_long = 0.0 * jnp.sum(out["text_long"]["embedding"])
  return l_short + l_long, {"loss_toy": l_short}


class ObjectiveSpecTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    losses.OBJECTIVES["toy"] = losses.Objective(
        toy_objective, ("label_smoothing",), short_caption=True)
    self.addCleanup(losses.OBJECTIVES.pop, "toy")

  def test_registered_objective_trains_two_steps(self):
    config = train_test.demo_config(**{"objective": "toy", "num_train_steps": 2,
                                       "checkpoint_every": 100})
    workdir = tempfile.mkdtemp()
    state = train.train_and_evaluate(config, workdir, evaluate=False)
    self.assertEqual(int(state["step"]), 2)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    self.assertEqual([r["step"] for r in rows], [1, 2])
    self.assertIn("loss_toy", rows[-1])
    self.assertNotIn("loss_long", rows[-1])

  def test_flops_follow_the_spec(self):
    config = train_test.demo_config(objective="toy")
    toy = flops.train_step_flops(config)
    self.assertGreater(toy["text_short"], 0)   # short caption: yes
    self.assertEqual(toy["vision_masked"], 0)  # masked image: no
    config.objective = "clip"
    self.assertEqual(flops.train_step_flops(config)["text_short"], 0)

  def test_unknown_objective_names_the_known_ones(self):
    with self.assertRaisesRegex(ValueError, r"config.objective='nope'.*clip \| "
                                r"fixclip \| longclip \| toy"):
      losses.get_objective("nope")


if __name__ == "__main__":
  absltest.main()
