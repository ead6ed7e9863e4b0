"""Evaluation reports in a workdir: JSON history, markdown table, PNG plots.

Files (all written atomically with fileio, so a crash or a bad input never
leaves a half-written or clobbered file; the workdir may be a URL, gs://...):
  eval_results.json   {"results": [{"model", "step", "dataset", "protocol",
                      "image_size", "text_context", <metric>: number, ...},
                      ...]}; new results replace older ones with the same key
                      (those six fields) and are appended otherwise, so
                      evaluating step after step builds a history.
  eval_results.md     one markdown table row per result.
  eval_recall.png     R@K bars per benchmark, latest step of each model.
  eval_history.png    R@1 over training steps per benchmark (only when some
                      results carry a step); long-caption and short-caption
                      benchmarks (e.g. synthetic-long / synthetic-short) are
                      separate lines.
  train_curves.png    loss terms, learning rate and throughput against step,
                      from metrics.jsonl rows (written by the training loop).
`console_table` is the short form of the table that runs print at the end.

Every row names its protocol (docs/method.md §4): `protocol` is the
benchmark's split and size as its loader names it (coco-karpathy-test-5000,
flickr30k-karpathy-test-1000 or flickr30k-full-31783, dci-full-7805,
urban1k, ...), `image_size` the pixels the model saw (224, 336, ...) and
`text_context` the tokens a caption was cut to (77, 248). The console table
adds one line saying the image sizes and text contexts of its rows.
"""
import io
import json
import math
from typing import Any, Dict, List, Optional, Sequence

# Figures are built without pyplot, so importing this module never changes the
# caller's matplotlib backend (notebooks keep their inline plots).
from matplotlib.figure import Figure

from fixclip_jax import fileio

JSON_NAME = "eval_results.json"
MARKDOWN_NAME = "eval_results.md"
RECALL_PNG = "eval_recall.png"
HISTORY_PNG = "eval_history.png"
TRAIN_PNG = "train_curves.png"
KEY_FIELDS = ("model", "step", "dataset", "protocol", "image_size",
              "text_context")
# The key fields that are protocol numbers (None in results written before).
PROTOCOL_NUMBERS = ("image_size", "text_context")
# Metrics first in this order, then any other numeric fields alphabetically.
METRIC_ORDER = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5",
                "t2i_R@10", "top1", "top5", "num_images", "num_texts")


def read_results(workdir: str) -> List[Dict[str, Any]]:
  """The results list in workdir/eval_results.json ([] when there is none)."""
  path = fileio.path(workdir) / JSON_NAME
  if not fileio.exists(path):
    return []
  try:
    data = json.loads(fileio.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); fix or move it, it "
                     "will not be overwritten") from e
  if not isinstance(data, dict) or not isinstance(data.get("results"), list):
    raise ValueError(f"{path} should be {{\"results\": [...]}}; it will not be "
                     "overwritten")
  return data["results"]


def _validate(result: Dict[str, Any]) -> None:
  for field in ("dataset", "protocol"):
    if not isinstance(result.get(field), str) or not result[field]:
      raise ValueError(f"Result needs a non-empty string {field!r}: {result}")
  for field in PROTOCOL_NUMBERS:
    v = result.get(field)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
      raise ValueError(f"Result field {field!r} = {v!r} is not a positive int")
  for k, v in result.items():
    if k in KEY_FIELDS:
      continue
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
      raise ValueError(f"Result field {k!r} = {v!r} is not a finite number")


def _key(r: Dict[str, Any]):
  return tuple(r.get(f) for f in KEY_FIELDS)


def _step(r: Dict[str, Any]) -> int:
  return -1 if r.get("step") is None else r["step"]


def _sort_key(r: Dict[str, Any]):
  return (str(r.get("model")), _step(r), r["dataset"], r["protocol"],
          r.get("image_size") or 0, r.get("text_context") or 0)


def merge_results(old: Sequence[Dict[str, Any]], new: Sequence[Dict[str, Any]]
                  ) -> List[Dict[str, Any]]:
  """Old results with the new ones replacing same-key entries, sorted."""
  merged = {_key(r): dict(r) for r in old}
  for r in new:
    merged[_key(r)] = dict(r)
  return sorted(merged.values(), key=_sort_key)


def metric_columns(results: Sequence[Dict[str, Any]]) -> List[str]:
  present = {k for r in results for k in r if k not in KEY_FIELDS}
  ordered = [m for m in METRIC_ORDER if m in present]
  return ordered + sorted(present - set(ordered))


def _fmt(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.2f}"
  return str(v)


def markdown_table(results: Sequence[Dict[str, Any]]) -> str:
  """| model | step | dataset | protocol | metrics... | (a cell is '-' when absent)."""
  columns = list(KEY_FIELDS) + metric_columns(results)
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for r in results:
    lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
  return "\n".join(lines) + "\n"


# The console table's metric columns (those present), with short headers.
CONSOLE_COLUMNS = (("i2t_R@1", "I2T R@1"), ("i2t_R@10", "I2T R@10"),
                   ("t2i_R@1", "T2I R@1"), ("t2i_R@10", "T2I R@10"),
                   ("top1", "top-1"), ("top5", "top-5"))


def protocol_line(results: Sequence[Dict[str, Any]]) -> str:
  """"Protocol: images at 224 px; text cut at 248 tokens (synthetic-long77:
  77)" for rows that carry image_size / text_context ('' when none does);
  per model when the models differ ("... at 77 tokens for A, 248 tokens for
  B (...)")."""
  rows = [r for r in results if any(r.get(f) for f in PROTOCOL_NUMBERS)]
  if not rows:
    return ""
  models = list(dict.fromkeys(r.get("model") for r in rows))
  parts = []
  for field, unit, what in (("image_size", "px", "images at"),
                            ("text_context", "tokens", "text cut at")):
    per_model = []
    for model in models:
      values = [r[field] for r in rows if r.get("model") == model and r.get(field)]
      if not values:
        continue
      # The most frequent value (ties: the larger, the model's own context).
      common = max(set(values), key=lambda v: (values.count(v), v))
      others = sorted({f"{_label(r)}: {r[field]}" for r in rows
                       if r.get("model") == model and r.get(field)
                       and r[field] != common})
      per_model.append((model, f"{common} {unit}",
                        f" ({', '.join(others)})" if others else ""))
    if len({(value, rest) for _, value, rest in per_model}) == 1:
      _, value, rest = per_model[0]
      parts.append(f"{what} {value}{rest}")
    elif per_model:
      parts.append(f"{what} " + ", ".join(f"{value} for {model}{rest}"
                                          for model, value, rest in per_model))
  return "Protocol: " + "; ".join(parts) + "\n"


def console_table(results: Sequence[Dict[str, Any]]) -> str:
  """| step | benchmark | I2T R@1 | ... |: the few columns worth a terminal
  (a model column first when the results hold more than one model), then the
  protocol line (image sizes and text contexts of the rows)."""
  present = [(k, h) for k, h in CONSOLE_COLUMNS if any(k in r for r in results)]
  with_model = len({r.get("model") for r in results}) > 1
  head = ["model"] * with_model + ["step", "benchmark"] + [h for _, h in present]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    cells = ([_fmt(r.get("model"))] * with_model +
             [_fmt(r.get("step")), _label(r)] + [_fmt(r.get(k)) for k, _ in present])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n" + protocol_line(results)


def _png_bytes(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  return buf.getvalue()


def _label(r: Dict[str, Any]) -> str:
  return r["protocol"] if r["protocol"].startswith(r["dataset"]) else (
      f"{r['dataset']} ({r['protocol']})")


def recall_bars_png(results: Sequence[Dict[str, Any]]) -> Optional[bytes]:
  """Bars of every R@K per benchmark for the latest step of each model."""
  latest = {}
  for r in results:
    if not any(k.endswith("_R@1") for k in r):
      continue
    k = (r.get("model"), r["dataset"], r["protocol"], r.get("image_size"),
         r.get("text_context"))
    if k not in latest or _step(r) >= _step(latest[k]):
      latest[k] = r
  if not latest:
    return None
  rows = sorted(latest.values(), key=_sort_key)
  metrics = [m for m in metric_columns(rows) if "_R@" in m]
  fig = Figure(figsize=(max(6, 1.2 * len(rows) * len(metrics) / 3), 4))
  ax = fig.subplots()
  width = 0.8 / len(metrics)
  for j, m in enumerate(metrics):
    xs = [i + j * width for i in range(len(rows))]
    ax.bar(xs, [r.get(m, 0.0) for r in rows], width, label=m)
  ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
  ax.set_xticklabels([f"{_label(r)}\n{r.get('model') or ''}" for r in rows],
                     rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("recall (%)")
  ax.set_ylim(0, 100)
  ax.legend(fontsize=7, ncol=2)
  ax.set_title("Retrieval recall@K (latest step of each model)")
  return _png_bytes(fig)


def history_png(results: Sequence[Dict[str, Any]]) -> Optional[bytes]:
  """i2t and t2i R@1 against step, one line per (model, benchmark)."""
  series: Dict[Any, List] = {}
  for r in results:
    if r.get("step") is None or "i2t_R@1" not in r:
      continue
    series.setdefault((r.get("model"), _label(r)), []).append(r)
  if not series:
    return None
  fig = Figure(figsize=(11, 4))
  axes = fig.subplots(1, 2, sharey=True)
  for ax, metric in zip(axes, ("i2t_R@1", "t2i_R@1")):
    for (model, label), rows in sorted(series.items(), key=str):
      rows = sorted(rows, key=lambda r: r["step"])
      style = "--" if "short" in label else "-"
      ax.plot([r["step"] for r in rows], [r.get(metric) for r in rows], style,
              marker="o", label=f"{label} {model or ''}".strip())
    ax.set_title(metric)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("recall@1 (%)")
  axes[1].legend(fontsize=7)
  return _png_bytes(fig)


def train_curves_png(rows: Sequence[Dict[str, float]]) -> Optional[bytes]:
  """Loss terms, learning rate and images/s against step (metrics.jsonl rows)."""
  rows = [r for r in rows if "loss" in r]
  if not rows:
    return None
  steps = [r["step"] for r in rows]
  fig = Figure(figsize=(14, 3.6))
  loss_ax, lr_ax, speed_ax = fig.subplots(1, 3)
  for key in sorted({k for r in rows for k in r if k.startswith("loss")}):
    loss_ax.plot(steps, [r.get(key, math.nan) for r in rows], label=key,
                 linewidth=2 if key == "loss" else 1)
  loss_ax.set_title("loss")
  loss_ax.legend(fontsize=7)
  for key, ax, title in (("lr", lr_ax, "learning rate"),
                         ("images_per_s", speed_ax, "images / s")):
    ax.plot(steps, [r.get(key, math.nan) for r in rows], marker=".")
    ax.set_title(title)
  for ax in (loss_ax, lr_ax, speed_ax):
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  return _png_bytes(fig)


def write_train_curves(workdir: str, rows: Sequence[Dict[str, float]]) -> Optional[str]:
  """WORKDIR/train_curves.png from metrics rows; its path (None without rows)."""
  data = train_curves_png(rows)
  if data is None:
    return None
  path = fileio.path(workdir) / TRAIN_PNG
  fileio.atomic_write(path, data)
  return str(path)


def write_report(workdir: str, results: Sequence[Dict[str, Any]],
                 model: Optional[str] = None, step: Optional[int] = None
                 ) -> List[Dict[str, Any]]:
  """Merges `results` into workdir's eval_results.json and rewrites the table and plots.

  `model` and `step` fill those fields in results that lack them. Everything
  is validated before the first file is touched. Returns the merged history.
  """
  new = []
  for r in results:
    r = dict(r)
    r.setdefault("model", model)
    r.setdefault("step", step)
    if r["step"] is not None:
      r["step"] = int(r["step"])
    _validate(r)
    new.append(r)
  fileio.makedirs(workdir)
  merged = merge_results(read_results(workdir), new)
  json_bytes = json.dumps({"results": merged}, indent=1).encode("utf-8")
  md_bytes = markdown_table(merged).encode("utf-8")
  pngs = {RECALL_PNG: recall_bars_png(merged), HISTORY_PNG: history_png(merged)}
  # All outputs exist in memory before any file is replaced.
  root = fileio.path(workdir)
  fileio.atomic_write(root / JSON_NAME, json_bytes)
  fileio.atomic_write(root / MARKDOWN_NAME, md_bytes)
  for name, data in pngs.items():
    if data is not None:
      fileio.atomic_write(root / name, data)
  return merged
