"""Learning curve of a pretraining run: kNN top-1 against images seen, with baselines.

Reads the run's metrics (the kNN monitor's `knn_top1`, logged every
`knn.every_steps` and at the end) and `config.json` (batch size), and draws one line of
kNN top-1 against pretraining images seen. Baselines measured with the same protocol
(`byol-jax knn --pretrained=pixels|random`, each writing knn.json) are drawn as horizontal
lines, and the linear protocol's test top-1 of the final encoder (results.json) as a point.

  python scripts/learning_curve.py --workdir=runs/fm_long --out=experiments/fm_long_curve.png \
      --baseline="raw pixels=runs/fm_pixels_knn/knn.json" \
      --baseline="random encoder=runs/fm_random_knn/knn.json" \
      --linear=runs/fm_long/linear/results.json

Every path may be local or gs:// (byol_jax.store.files). Prints the curve's points as a table.
"""
import argparse
import io

from byol_jax.store import files
from byol_jax.store import run_config
from byol_jax.store import writers


def knn_curve(workdir: str) -> list[tuple[int, float]]:
  """[(images seen, knn_top1)] from workdir's metrics (writers.read_metrics), in step order.

  Raises:
    ValueError: the run logged no kNN figure (knn.every_steps was 0).
  """
  config = files.read_json(files.join(workdir, run_config.CONFIG_FILE))
  batch = int(config["batch_size"])
  points = {}
  for record in writers.read_metrics(workdir):
    if "knn_top1" in record:
      points[int(record["step"])] = float(record["knn_top1"])  # A resumed run's rerun wins.
  if not points:
    raise ValueError(f"the metrics of {workdir} have no knn_top1: pretrain with "
                     "--config.knn.every_steps=N to record the curve.")
  return [(step * batch, points[step]) for step in sorted(points)]


def plot(curve, baselines: dict[str, float], linear: float | None, out: str, title: str) -> None:
  """Writes the PNG to `out` (local or gs://)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  images = [x / 1e6 for x, _ in curve]
  ax.plot(images, [100 * y for _, y in curve], "o-", label="BYOL encoder, kNN (k=20)")
  for (name, value), style in zip(sorted(baselines.items()), ("--", ":", "-.")):
    ax.axhline(100 * value, linestyle=style, color="grey", label=f"{name}, kNN: {value:.2%}")
  if linear is not None:
    ax.plot([images[-1]], [100 * linear], "s", color="C3",
            label=f"final encoder, linear: {linear:.2%}")
  ax.set_xlabel("pretraining images seen (millions)")
  ax.set_ylabel("test top-1 (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  buffer = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buffer, format="png", dpi=120)
  plt.close(fig)
  files.write_bytes_atomic(out, buffer.getvalue())


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="the pretraining workdir")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--baseline", action="append", default=[],
                      help="NAME=PATH of a knn.json (repeatable)")
  parser.add_argument("--linear", default="", help="results.json of the final encoder")
  parser.add_argument("--title", default="")
  args = parser.parse_args(argv)
  curve = knn_curve(args.workdir)
  baselines = {}
  for item in args.baseline:
    name, sep, path = item.partition("=")
    if not sep:
      parser.error(f"--baseline={item!r}: expected NAME=PATH.")
    baselines[name] = float(files.read_json(path)["knn_top1"])
  linear = float(files.read_json(args.linear)["top1"]) if args.linear else None
  plot(curve, baselines, linear, args.out, args.title or args.workdir)
  print("images seen | kNN top-1")
  for images, top1 in curve:
    print(f"{images:>11,} | {top1:.2%}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
