"""The 77-token CLIP a long-text run starts from when no pretrained one is at hand.

Long-CLIP and FIX-CLIP fine-tune a CLIP trained at 77 tokens, after
stretching its positions to 248 (docs/method.md §2). Offline (the demo, the
ablation) no such CLIP exists, so one is trained first on the run's own data:

  clip77_config(config, ...)   the run's config as plain CLIP at 77 tokens
                               (objective clip, one trained position table,
                               no prompts / mask token / GTA heads, no label
                               smoothing): Long-CLIP's starting point in small.
  write_start_model(...)       its initial weights, with a smooth (sinusoidal)
                               text position table (START_POSITIONS says why).

train.py runs it as the first stage when config.pretrain77.steps > 0 (the
demo); tools/ablate.py builds its CLIP-77 runs from the same functions.
"""
import jax
import ml_collections
import numpy as np

from fixclip_jax import checkpoint
from fixclip_jax import config_base
from fixclip_jax.models import clip
from fixclip_jax.models import sizes

CONTEXT = 77                   # OpenAI CLIP's text context
WARMUP_SHARE = 0.1             # of the pretraining's steps

# The CLIP-77's text positions before pretraining: "smooth" (a sinusoidal
# table) or "random" (models/clip.py's init). KPS interpolates between
# neighbouring rows (docs/method.md §2), which keeps knowledge only if
# neighbours are alike, as in OpenAI CLIP after 400M pairs; a tiny model
# pretrained for minutes keeps its random rows (adjacent cosine ~0.1), and
# stretching them costs more than a short fine-tune wins back (RESULTS.md).
START_POSITIONS = ("smooth", "random")


def clip77_config(config: ml_collections.ConfigDict, steps: int, lr: float,
                  init_from: str = "") -> ml_collections.ConfigDict:
  """`config` as plain CLIP at 77 tokens, trained `steps` steps at `lr` from
  `init_from` (its temperature kept); data, model size, optimiser otherwise
  the run's own. OpenAI CLIP's recipe in miniature."""
  c = config.copy_and_resolve_references()
  c.init_from = init_from
  c.init_logit_scale = 0.0                # keep the start model's ln(1/0.07)
  c.objective = "clip"
  for key, value in config_base.PLAIN_CLIP.items():
    config_base.set_knob(c, key, value)
  c.model.context_length = CONTEXT
  c.model.positional_keep = None          # one table, trained
  c.optim.frozen_regex = ""
  c.data.text_context = CONTEXT
  c.data.short_context = min(c.data.short_context or CONTEXT, CONTEXT)
  c.loss.label_smoothing = 0.0            # CLIP trains without smoothing
  c.num_train_steps = steps
  c.optim.lr = lr
  c.optim.new_params_lr = lr
  c.optim.warmup_steps = max(int(WARMUP_SHARE * steps), 1)
  if "pretrain77" in c:
    c.pretrain77.steps = 0                # this is the first stage
  return c


def sinusoidal_positions(length: int, width: int, row_norm: float) -> np.ndarray:
  """[length, width] sin/cos table (the Transformer's), rows scaled to
  row_norm: neighbouring rows are alike, as in a well-trained CLIP's table."""
  pos = np.arange(length, dtype=np.float64)[:, None]
  freq = 1.0 / 10000.0 ** (np.arange(0, width, 2, dtype=np.float64) / width)
  table = np.zeros((length, width))
  table[:, 0::2] = np.sin(pos * freq)
  table[:, 1::2] = np.cos(pos * freq)[:, :width // 2]
  table *= row_norm / np.linalg.norm(table, axis=1, keepdims=True)
  return table.astype(np.float32)


def write_start_model(path: str, config: ml_collections.ConfigDict,
                      positions: str = "smooth") -> str:
  """A fresh CLIP of `config` (model dir at `path`, made once) whose text
  positions are `positions` (START_POSITIONS); returns path, or "" for
  "random" (the pretraining's own init is that)."""
  if positions not in START_POSITIONS:
    raise ValueError(f"start positions {positions!r}; use one of {START_POSITIONS}")
  if positions == "random":
    return ""
  if not checkpoint.is_model_dir(path):
    cfg = sizes.model_config(config)
    params = jax.device_get(clip.init_params(cfg, jax.random.PRNGKey(config.seed)))
    # Rows as long as models/clip.py's normal(0.01) init gives on average.
    params["text"]["positional_embedding"] = sinusoidal_positions(
        cfg.context_length, cfg.text_width, 0.01 * np.sqrt(cfg.text_width))
    checkpoint.save_model(path, params, cfg)
  return path
