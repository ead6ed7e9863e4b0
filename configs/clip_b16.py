"""Plain CLIP fine-tuning baseline at 77 tokens (no stretching, one loss)."""
from fixclip_jax import config_base


def get_config():
  c = config_base.base_config()
  c.model_name = "B/16"
  c.objective = "clip"
  c.model.context_length = 77
  c.model.positional_keep = None
  c.model.num_prompts = 0
  c.model.mask_token = False
  c.model.gta_groups = 0
  c.optim.frozen_regex = ""
  c.optim.new_params_regex = ""
  c.data.type = "array_record"
  c.data.text_context = 77
  c.data.image_size = 224
  c.data.global_batch = 2048
  c.num_train_steps = 1000
  return c
