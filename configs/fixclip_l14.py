"""FIX-CLIP L/14 from OpenAI CLIP (docs/method.md §3): fixclip_b16.py (every value
labelled there) with the L/14 towers."""
import os

from fixclip_jax import config_base


def get_config():
  # The B/16 file holds every FIX-CLIP choice; loaded by path so this config
  # works from any working directory.
  c = config_base.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixclip_b16.py"))
  c.model_name = "L/14"                   # paper
  c.model.gta_groups = 4                  # ours: 24 layers -> 4 groups of 6
  c.data.image_size = 224                 # OpenAI L/14's resolution (not @336)
  # Global batch 2048 as B/16 (Long-CLIP trains both at 2048): the negatives
  # come from the batch, so halving it would change the objective. Memory comes
  # from remat and FSDP, not from accum_steps (per-micro-batch negatives).
  c.data.global_batch = 2048
  c.num_train_epochs = 6                  # as B/16: 6 epochs of data.path
  c.num_train_steps = 3654                # ShareGPT4V's (the fallback)
  c.remat = "full"                        # activations of 24 layers x 2 branches
  c.mesh.fsdp = -1                        # shard params/optimizer over all devices
  c.mesh.data = 1
  return c
