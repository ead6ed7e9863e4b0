"""The built-in default: tiny FIX-CLIP on synthetic scenes, CPU, a few minutes.

python -m fixclip_jax.main --config=configs/demo.py --workdir=/tmp/fixclip_demo
"""
from fixclip_jax import config_base


def get_config():
  c = config_base.base_config()
  c.model_name = "tiny"
  c.model.gta_groups = 2                  # tiny has 2 layers
  c.loss.gta_weights = (0.5,)
  c.loss.gta_first_group = 2
  c.dtype = "float32"
  c.data.type = "synthetic"
  c.data.synthetic_num = 2048
  c.data.synthetic_image_size = 64
  c.data.image_size = 32
  c.data.global_batch = 32
  c.data.short_context = 77
  c.num_train_steps = 300
  c.optim.lr = 1e-3                       # from scratch, not fine-tuning
  c.optim.new_params_lr = 1e-3
  c.optim.warmup_steps = 20
  c.log_every = 25
  c.checkpoint_every = 150
  c.eval_every = 150
  c.eval_at_start = True                  # the table compares with the untrained model
  c.eval.batch_size = 64
  c.eval.synthetic_num = 256
  return c
