"""Long-CLIP L/14 (docs/method.md §2): longclip_b16.py with the L/14 towers
(the same recipe: global batch 2048, 6 epochs = 3,654 steps on ShareGPT4V)."""
import os

from fixclip_jax import config_base


def get_config():
  # The B/16 file holds every Long-CLIP choice; loaded by path so this config
  # works from any working directory.
  c = config_base.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "longclip_b16.py"))
  c.model_name = "L/14"
  c.num_train_epochs = 6                  # as B/16: steps follow the data (main.py)
  c.remat = "full"
  return c
