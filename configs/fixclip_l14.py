"""FIX-CLIP L/14 from OpenAI CLIP (docs/method.md §3); see fixclip_b16.py."""
from fixclip_jax import config_base


def get_config():
  c = config_base.base_config()
  c.model_name = "L/14"
  c.model.gta_groups = 4                  # 24 layers -> 4 groups of 6
  c.data.type = "array_record"
  c.data.image_size = 224
  c.data.global_batch = 1024
  c.data.num_workers = 8
  c.num_train_steps = 12000
  c.remat = "full"                          # activations of 24 layers x 2 branches
  c.mesh.fsdp = -1                        # shard params/optimizer over all devices
  c.mesh.data = 1
  c.checkpoint_every = 1000
  c.eval_every = 1000
  c.eval.datasets = "urban1k,sharegpt4v_1k,coco_val2017"
  return c
