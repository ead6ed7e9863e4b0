"""The built-in default: tiny FIX-CLIP on synthetic scenes, CPU, a few minutes.

python -m fixclip_jax.main --config=configs/demo.py --workdir=/tmp/fixclip_demo

Two stages, as Long-CLIP and FIX-CLIP are used: a plain CLIP at 77 tokens
(stage 1, standing in for OpenAI's CLIP, which is not at hand offline), then
FIX-CLIP at 248 tokens from it (stage 2: KPS stretch, first 20 rows frozen).
The final table scores the 77-token start and the result on the same
held-out scenes: long captions at full length, the same captions cut to 77
tokens (what the start can read), and the one-sentence summaries.
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
  # The masked short branch keeps half of tiny's 4x4 patch grid: the paper's
  # 0.75 (for a 14x14 grid) would leave 4 patches for a summary naming four
  # shapes (RESULTS.md, cause 4).
  c.masking.ratio = 0.5
  # Stage 1: the 77-token start (train.py, pretrain77.py).
  c.pretrain77.steps = 300
  c.pretrain77.lr = 1e-3                  # from scratch
  # Stage 2: FIX-CLIP from it.
  c.num_train_steps = 150
  c.optim.lr = 3e-4                       # the start's weights
  c.optim.new_params_lr = 1e-3            # prompts, mask token, GTA: new
  c.optim.warmup_steps = 15
  c.init_logit_scale = 0.0                # keep the start's temperature (RESULTS.md)
  c.log_every = 25
  c.checkpoint_every = 150
  c.eval_every = 0                        # at the end
  c.eval.datasets = "synthetic,synthetic_long77,synthetic_late"
  c.eval.batch_size = 64
  c.eval.synthetic_num = 256
  return c
