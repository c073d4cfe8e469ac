"""The paper's own networks as rows of the sweep's results table, and its report without training.

Reads the project's copy of the authors' logged results (`analysis/data/paper_results.json`,
`paper_curves.json`, from github.com/yosinski/convnet_transfer) and turns every logged network into
one row of the results contract, so the paper and a sweep go through one code path.
Usage: `python -m analysis.paper --out DIR` (prints Table 1 both ways and the report's path).

Naming, from the target's point of view as in the sweep:
- similar: repo half{s}A / half{s}B are baseA / baseB of split s (s = 0..3); transfer{s}X{s}Y_1_n is
  a transfer from base X to target Y: "BnB" when X == Y (the repo has only A→A selffers), else
  "AnB" (source_half X, target_half Y); transfer-ft… are the "+" (fine-tuned) versions.
- dissimilar: the paper's letters, A = man-made (551 classes), B = natural (449); the repo swapped
  them (repo A = natural). transfernatmanBA (man-made → natural) is AnB with source A, target B.
- random_frozen (nolearn_1_n) ran on all 1000 classes against netbase: split_kind "whole",
  target_half "all", netbase is treatment "base".
- One training run per network (Caffe's seed was not set): seed 0. epochs and curves' epoch are
  iterations × 256 / (1,281,167 × classes / 1000), approximate (per-class image counts vary).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import pandas as pd

from analysis.results import CURVE_COLUMNS, normalise_curves, normalise_rows

DATA_DIR = Path(__file__).parent / "data"
BATCH_SIZE = 256  # paper: batch 256, 450k iterations
MAX_ITER = 450_000
IMAGENET_TRAIN_IMAGES = 1_281_167
DISSIMILAR_HALVES = {"A": "man-made", "B": "natural"}  # the paper's letters (the repo swapped them)
REPO_NATMAN = {"A": "B", "B": "A"}  # repo letter -> paper letter: repo A is natural = paper B
CLASSES = {"similar": 500, ("dissimilar", "A"): 551, ("dissimilar", "B"): 449, "whole": 1000}
KEY_PREFIX = "paper/"


def load_paper_results(path: Path = DATA_DIR / "paper_results.json") -> dict:
    """The raw per-network results; refuses a file without the `meta` it is read by."""
    data = json.loads(Path(path).read_text())
    if "meta" not in data or "similar" not in data:
        raise ValueError(f"{path} is not the paper's results file (no 'meta'/'similar'); "
                         "expected analysis/data/paper_results.json")
    return data


PAPER_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")   # the paper's net, n = 1..7 copied


def _row(name, treatment, split_kind, split_seed, target_half, n, value, final, source_half="",
         base_name="") -> dict:
    classes = CLASSES.get((split_kind, target_half), CLASSES.get(split_kind))
    return {
        "job_key": KEY_PREFIX + name, "dataset": "imagenet", "split_kind": split_kind,
        "split_seed": split_seed, "seed": 0, "treatment": treatment, "source_half": source_half,
        "target_half": target_half, "n": n, "layer": PAPER_LAYERS[n - 1] if n else "", "arch": "caffenet",
        "recipe": "paper",
        "top1_final": final, "top1_best10": value, "top5_final": math.nan,
        "epochs": MAX_ITER * BATCH_SIZE / (IMAGENET_TRAIN_IMAGES * classes / 1000),
        "train_images_per_s": math.nan, "wall_s": math.nan, "frozen_check": "",
        "base_job_key": KEY_PREFIX + base_name if base_name else "", "status": "done",
    }


def _by_net_with_final(section: dict, final: dict, treatment: str, n: str) -> list[tuple[str, float, float]]:
    """(network name, best-10 value, final value) for one treatment and n; the per-net dict and the
    lists share one order, which is checked rather than assumed."""
    by_net = section[f"{treatment}_by_net"][n]
    assert list(by_net.values()) == section[treatment][n], f"{treatment} n={n}: lists out of order"
    finals = final.get(treatment, {}).get(n, [math.nan] * len(by_net))
    return [(name, value, finals[i]) for i, (name, value) in enumerate(by_net.items())]


def _parse_transfer(name: str) -> tuple[int, str, str, int]:
    """'transfer-ft1A1B_1_3' -> (split 1, source 'A', target 'B', n 3)."""
    body = name.removeprefix("transfer-ft").removeprefix("transfer")
    pair, _, n = body.partition("_1_")
    return int(pair[0]), pair[1], pair[3], int(n)


def paper_rows(data: dict | None = None) -> pd.DataFrame:
    """Every logged network of the paper as one row of the results table."""
    data = data or load_paper_results()
    final = data["final_iter_values"]
    rows = []

    similar, similar_final = data["similar"], final["similar"]
    for half_name, value in similar["baseB_by_net"].items():  # e.g. "0A"
        split, half = int(half_name[0]), half_name[1]
        rows.append(_row(f"half{half_name}", f"base{half}", "similar", split, half, 0, value,
                         final["similar_baseB_by_net"][half_name]))
    for treatment in ("BnB", "AnB", "BnB+", "AnB+"):
        for n in similar[treatment]:
            for name, value, final_value in _by_net_with_final(similar, similar_final, treatment, n):
                split, source, target, layers = _parse_transfer(name)
                assert layers == int(n), name
                kind = "BnB" if source == target else "AnB"
                assert treatment.rstrip("+") == kind, f"{name} filed under {treatment}"
                rows.append(_row(name, treatment, "similar", split, target, layers, value, final_value,
                                 source_half=source, base_name=f"half{split}{source}"))

    dissimilar, dissimilar_final = data["dissimilar"], final["dissimilar"]
    # lists are ordered [target natural, target man-made]; repo halfnatmanA is natural
    for i, repo_half in enumerate(("A", "B")):
        half = REPO_NATMAN[repo_half]
        rows.append(_row(f"halfnatman{repo_half}", f"base{half}", "dissimilar", 0, half, 0,
                         dissimilar["base"][i], dissimilar_final["base"][i]))
    for n, values in dissimilar["AnB"].items():
        for i, repo_pair in enumerate(("BA", "AB")):  # BA: man-made base -> natural target
            source, target = REPO_NATMAN[repo_pair[0]], REPO_NATMAN[repo_pair[1]]
            rows.append(_row(f"transfernatman{repo_pair}_1_{n}", "AnB", "dissimilar", 0, target, int(n),
                             values[i], dissimilar_final["AnB"][n][i], source_half=source,
                             base_name=f"halfnatman{repo_pair[0]}"))

    random_frozen, random_final = data["random_frozen"], final["random_frozen"]
    rows.append(_row("netbase", "base", "whole", 0, "all", 0, random_frozen["base_1000class"],
                     random_final["base_1000class"]))
    for n, values in random_frozen["frozen_random"].items():
        rows.append(_row(f"nolearn_1_{n}", "random_frozen", "whole", 0, "all", int(n), values[0],
                         random_final["frozen_random"][n][0]))
    return normalise_rows(pd.DataFrame(with_convergence(rows)))


def with_convergence(rows: list[dict], path: Path = DATA_DIR / "paper_curves.json") -> list[dict]:
    """Each row's `plateau_rise` and `converged` by the sweep's own rule, from the network's logged curve (the
    bases and the random-frozen nets have one: every base rose by at most 0.1 point over its last 20 %)."""
    from raytransfer.convergence import PLATEAU_POINTS, plateau_rise

    curves = json.loads(Path(path).read_text())["curves"]
    for row in rows:
        points = curves.get(row["job_key"].removeprefix(KEY_PREFIX))
        if points:
            rise = plateau_rise([{"step": int(i), "val_top1": v} for i, v in points.items()], MAX_ITER)
            row.update(plateau_rise=rise, converged=bool(rise < PLATEAU_POINTS) if rise == rise else None)
    return rows


def paper_reduced_curve(data: dict | None = None) -> pd.DataFrame:
    """The paper's reduced-volume nets (1000 classes, first k images per class; 1300: all): one row per k,
    images_per_class and top-1 (best-10 mean, and at the last of 200k iterations)."""
    data = data or load_paper_results()
    best, final = data["reduced_1000class_examples_per_class"], data["final_iter_values"]["reduced"]
    return pd.DataFrame([{"images_per_class": int(k), "top1_best10": v, "top1_final": final.get(k, math.nan)}
                         for k, v in sorted(best.items(), key=lambda kv: int(kv[0]))])


def paper_curves(rows: pd.DataFrame, path: Path = DATA_DIR / "paper_curves.json") -> pd.DataFrame:
    """The logged top-1 of each network (iteration 1k and every 10k) in the curves.csv shape."""
    curves = json.loads(Path(path).read_text())["curves"]
    epochs_per_iter = (rows.set_index("job_key")["epochs"] / MAX_ITER).to_dict()
    records = []
    for name, points in curves.items():
        key = KEY_PREFIX + name
        if key not in epochs_per_iter:  # reduced-* runs are not rows of the table
            continue
        for iteration, top1 in points.items():
            records.append({"job_key": key, "epoch": int(iteration) * epochs_per_iter[key], "val_top1": top1})
    return normalise_curves(pd.DataFrame(records, columns=list(CURVE_COLUMNS)))


def main(argv: list[str] | None = None) -> int:
    """CLI: build the report from the paper's data alone and print Table 1."""
    from analysis.report import build_report_from_rows, format_table1

    parser = argparse.ArgumentParser(prog="python -m analysis.paper", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write report.html and the rest into")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    rows = paper_rows()
    report = build_report_from_rows(rows, paper_curves(rows), args.out, source="the paper's logged networks")
    print(format_table1(json.loads((args.out / "table1.json").read_text())))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
