"""The whole experiment of Yosinski et al. 2014 as one Ray Tune sweep: how transferable are the
features of each layer, for similar and dissimilar halves of a dataset's classes?

Paper figures 2-3: per n = 1..7 (layers conv1..fc7 copied; ResNet-18: stem..layer4.1, n = 1..9), the
selffers BnB/BnB+ and the transfers AnB/AnB+ against the bases, plus random frozen layers and scratch
nets as controls. At paper scale random frozen layers train on all classes against a whole-dataset
netbase, and the reduced-volume nets (first k images per class, --reduced-k) come with the grid.
Expect: BnB dips at n = 3..5 (co-adaptation), AnB falls with n (specificity; faster on the
dissimilar split), AnB+ beats the base (fine-tuning boost), random frozen layers fail from n = 3.

Cost: the embedded default (synthetic data, demo scale: 3 training seeds x n = 1, 3, 5, 7, every treatment
on the similar split and, as in the paper, frozen AnB alone on the dissimilar one: 87 networks trained to
their plateau + 18 diagnostics) takes about 14 minutes on 2 CPU cores; `--scale paper` with the paper's four
random splits and the dissimilar one in both directions is 276 networks (12 of them reduced-volume), ~524
H100-hours at the `paper` recipe's fp32 eager step (see `--dry-run`; `--set` changes any recipe field).

    python sweeps/full_paper.py --dry-run                     # the job table and an estimate
    python sweeps/full_paper.py                               # demo: synthetic data, both splits
    python sweeps/full_paper.py --scale smoke --out /tmp/smoke
    python sweeps/full_paper.py --data betons --split-file halves.json --arch resnet18   # your data (README)
    python sweeps/full_paper.py --scale paper --data /mnt/betons/imagenet --storage s3://bucket/rt \
        --directions both --gpus-per-trial 1 --address auto
"""
import sys

from ray import tune

from raytransfer.sweep import main

GRID = {
    "split": tune.grid_search(["similar", "dissimilar"]),     # random halves; man-made vs natural
                                                              # (--split-file F.json: your own halves)
    "target": tune.grid_search(["B"]),                        # one direction (--directions both: + "A")
    "treatment": tune.grid_search(["BnB", "BnB+", "AnB", "AnB+",       # selffers and transfers, frozen and fine-tuned
                                   "random_frozen",                    # control: random frozen layers
                                   "scratch"]),                        # control: nothing copied (n ignored)
    "n": "all",                                               # layers copied: 1 .. layers-1 of the arch
                                                              # (CaffeNet: conv1 .. fc7); --n 1,3,5 for some
    # training seeds come from the scale (0, 1, 2 at demo scale; 0 elsewhere) or --train-seeds; the similar
    # split's seeds from the scale (0 at demo scale; the paper's 0-3 at paper scale) or --seeds; bases A and B
    # of every split are added as the jobs' dependencies.
}
# The paper ran its dissimilar split with frozen transfers only (AnB and the bases it needs); so does this grid
# (--treatments puts every listed treatment on every split).
SPLIT_TREATMENTS = {"dissimilar": ["AnB"]}

if __name__ == "__main__":
    sys.exit(main(GRID, name="full_paper", split_treatments=SPLIT_TREATMENTS))
