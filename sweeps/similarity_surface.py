"""Beyond the paper: how fast transferability falls as two tasks move apart, layer by layer.

The paper measured two points of task similarity: random halves and man-made vs natural. This sweep measures
the curve between them: on graded splits, half A takes a share p of its classes from the other family
(`raytransfer split --kind graded`): p = 0 is the dissimilar split, p = 1/2 a random split balanced over the
families. At each level it trains the two bases and frozen AnB at every n (the diagnostics' transferability
estimators beside them), and the report draws AnB minus its base over n x p, the slope against p per layer,
where the dependence starts, whether it is gradual or sudden, and the estimators against p.

Levels must be exact for the dataset's family sizes (the built-in data's 12-class families: multiples of
1/12; ImageNet's 551 man-made classes: k/551); a level that is not is one error naming the nearest exact ones.
Level 0 is the dissimilar split itself, so a `full_paper.py` run on the same --out has trained its bases.

Cost: the default demo scale (built-in data, 3 training seeds, levels 0, 1/6, 1/3, 1/2, n = 1..7) is 84 frozen
AnB + 24 bases + 36 diagnostics (`--dry-run`): 12 min 43 s on an idle 2-core machine (2026-12-06, in cohorts;
benchmarks/RESULTS.md, "Transferability over graded task similarity"). The smoke-scale run is a test
(tests/test_similarity.py).

    python sweeps/similarity_surface.py --dry-run
    python sweeps/similarity_surface.py --out results/similarity
    python sweeps/similarity_surface.py --splits graded:0,graded:1/12,graded:1/4,graded:1/2 --seeds 0,1
    python sweeps/similarity_surface.py --scale paper --data /mnt/betons/imagenet --storage s3://bucket/rt \
        --splits graded:0,graded:92/551,graded:184/551,graded:275/551 --address auto
"""
import sys

from ray import tune

from raytransfer.sweep import main

GRID = {
    "split": tune.grid_search(["graded:0", "graded:1/6", "graded:1/3", "graded:1/2"]),   # p: 0 = dissimilar
    "target": tune.grid_search(["B"]),                        # one direction (--directions both: + "A")
    "treatment": tune.grid_search(["AnB"]),                   # frozen transfers: the paper's specificity measure
    "n": "every",                                             # every layer n, at every scale
    # training seeds from the scale (0, 1, 2 at demo scale) or --train-seeds; --seeds: which classes each
    # graded level swaps (0 by default); bases A and B of every split are added as the jobs' dependencies.
}

if __name__ == "__main__":
    sys.exit(main(GRID, name="similarity_surface"))
