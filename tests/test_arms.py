"""Arms of one sweep (issue 24): the demo with the paper's normalisation (`demo_lrn`: LRN, dropout 0.5 on fc6/fc7,
no batch norm) beside the batch-norm demo, `--recipes` building each recipe's jobs with their own keys,
`--data-seed` drawing another built-in dataset, and the seeded dropout those nets train with. No Ray: dry runs
and single tiny trials. The report's per-arm answer is tested in test_findings.py."""
from __future__ import annotations

import copy
import runpy
from pathlib import Path

import pytest
import torch

import raytransfer.recipes as recipes
from raytransfer.models import CaffeNet, CrossChannelLRN, SeededDropout, build_model
from raytransfer.recipes import get_recipe
from raytransfer.sweep.runner import main

ROOT = Path(__file__).resolve().parents[1]
GRID = runpy.run_path(str(ROOT / "sweeps" / "full_paper.py"))["GRID"]
FLAGS = ["--scale", "smoke", "--splits", "similar", "--treatments", "BnB,BnB+", "--n", "3,7", "--no-report",
         "--dry-run"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYTRANSFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def job_table(capsys, argv) -> dict:
    """{job key: what it depends on} from a --dry-run's job table."""
    capsys.readouterr()
    assert main(GRID, FLAGS + argv, name="full_paper") == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        parts = line.split()
        if parts and parts[0].startswith("similar"):
            rows[parts[0]] = parts[-1]
    return rows


def test_demo_lrn_is_the_demo_net_with_the_papers_normalisation_and_dropout():
    demo, lrn = get_recipe("demo"), get_recipe("demo_lrn")
    assert (lrn.norm, lrn.dropout, demo.norm, demo.dropout) == ("lrn", 0.5, "batch", 0.0)
    same = ("arch", "width", "fc_width", "stem_stride", "input", "crop_size", "resize_size", "batch_size")
    assert {f: getattr(lrn, f) for f in same} == {f: getattr(demo, f) for f in same}
    assert lrn.identity() != demo.identity()                   # its own job keys
    net = build_model("caffenet", 12, **lrn.arch_kwargs())
    assert isinstance(net.norm1, CrossChannelLRN) and isinstance(net.norm2, CrossChannelLRN)
    assert not [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert isinstance(net.drop6, SeededDropout) and net.drop6.p == net.drop7.p == 0.5
    assert net.deterministic_stages() == 6                     # fc7's stage applies fc6's dropout
    assert build_model("caffenet", 12, **demo.arch_kwargs()).deterministic_stages() == 8


def test_seeded_dropout_draws_the_same_masks_for_the_same_init_and_leaves_the_weights_init_alone():
    def net(dropout, seed=3):
        torch.manual_seed(seed)
        return CaffeNet(5, width=0.125, resolution=30, fc_width=0.0625, init="kaiming", dropout=dropout, stem_stride=2)

    with_dropout, without = net(0.5), net(0.0)
    for (name, a), (_, b) in zip(with_dropout.state_dict().items(), without.state_dict().items()):
        assert torch.equal(a, b), name                         # the seeds are drawn after the weights
    x = torch.randn(4, 3, 30, 30)
    first, again, other = net(0.5).train(), net(0.5).train(), net(0.5, seed=4).train()
    torch.manual_seed(0)
    out = first(x)
    torch.manual_seed(1)                                       # the global generator plays no part
    assert torch.equal(out, again(x)) and not torch.equal(out, other(x))
    assert not torch.equal(first(x), out)                      # a new mask each step
    assert torch.equal(first.eval()(x), again.eval()(x))       # off in eval mode
    clone = copy.deepcopy(net(0.5).train())                   # a net copies (and pickles): its masks start afresh
    assert torch.equal(clone(x), out)


def test_a_demo_lrn_trial_records_the_convergence_fields(tmp_path, one_thread):
    from raytransfer.prepare import prepare
    from raytransfer.synthetic import SyntheticSpec
    from raytransfer.trial import run_trial

    spec = SyntheticSpec(seed=0, superclasses_per_family=2, classes_per_superclass=1, train_per_class=12,
                         val_per_class=4)
    manifest = prepare("synthetic", None, tmp_path / "data", resolution=None, synthetic=spec)
    recipe = get_recipe("demo_lrn", epochs=10, batch_size=8)
    out = run_trial({"job_key": "t", "data_dir": str(tmp_path / "data"), "treatment": "baseB", "n": 0, "seed": 0,
                     "target_classes": [c["id"] for c in manifest["classes"]], "recipe": recipe.to_dict()},
                    torch.device("cpu"))
    assert {"plateau_rise", "converged", "top1_best10", "top1_final"} <= set(out)
    assert isinstance(out["converged"], bool) and out["epochs"] == 10 and out["plateau_rise"] == out["plateau_rise"]


def test_recipes_builds_every_arm_with_its_own_keys_and_bases(capsys, env):
    one = job_table(capsys, ["--out", str(env / "one")])
    both = job_table(capsys, ["--out", str(env / "both"), "--recipes", "smoke,demo_lrn"])
    lrn = {k: d for k, d in both.items() if "-demo_lrn-" in k}
    smoke = {k: d for k, d in both.items() if "-smoke-" in k}
    assert smoke == one                                        # the first arm: the same jobs as without --recipes
    assert len(lrn) == len(smoke) == len(both) // 2 == 2 + 2 * 2   # bases A, B + BnB, BnB+ at n = 3, 7
    assert not set(lrn) & set(smoke)
    for key, dependency in lrn.items():                        # each arm's transfers read that arm's bases
        assert dependency == "-" if "-base" in key else (dependency in lrn and "-baseB-" in dependency)
    keys = list(both)
    assert all("-base" in k for k in keys[:4])                 # the bases of every arm first


def test_a_bad_recipe_name_is_one_error_before_anything_is_written(capsys, env):
    capsys.readouterr()
    assert main(GRID, FLAGS + ["--out", str(env / "x"), "--recipes", "demo,demo_lrm"], name="full_paper") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "unknown recipe 'demo_lrm'; expected one of" in err and "demo_lrn" in err
    assert not (env / "x").exists() and not (env / "cache").exists()


def test_recipes_of_different_architectures_are_one_error(capsys, env, monkeypatch):
    monkeypatch.setitem(recipes.RECIPES, "tiny_resnet", recipes.Recipe("tiny_resnet", arch="resnet18", epochs=1))
    capsys.readouterr()
    assert main(GRID, FLAGS + ["--out", str(env / "x"), "--recipes", "smoke,tiny_resnet"], name="full_paper") == 2
    assert "train different architectures (caffenet, resnet18)" in capsys.readouterr().err


def test_data_seed_draws_another_built_in_dataset_with_other_keys(capsys, env):
    default = job_table(capsys, ["--out", str(env / "a")])
    assert job_table(capsys, ["--out", str(env / "b"), "--data-seed", "0"]) == default
    other = job_table(capsys, ["--out", str(env / "c"), "--data-seed", "1"])
    assert len(other) == len(default) and not set(other) & set(default)
    capsys.readouterr()
    assert main(GRID, FLAGS + ["--out", str(env / "d"), "--data-seed", "1", "--data", str(env)],
                name="full_paper") == 2
    assert "drop --data-seed" in capsys.readouterr().err


def test_a_treatment_at_some_n_alone(capsys, env):
    """--treatments BnB,BnB+:7: BnB at every n of the grid, BnB+ at n = 7 alone (the second schedule's control)."""
    argv = ["--out", str(env / "x"), "--recipes", "smoke,demo_lrn"]
    table = job_table(capsys, argv + ["--treatments", "BnB,BnB+:7"])
    transfers = sorted(k.split("-")[1] + k.split("-")[3] for k in table if "-base" not in k)
    assert transfers == ["BnBn3", "BnBn3", "BnBn7", "BnBn7", "BnBpn7", "BnBpn7"]
    capsys.readouterr()
    assert main(GRID, FLAGS + argv + ["--treatments", "BnB,BnB+:5"], name="full_paper") == 2
    assert "--treatments BnB+:5: n = 5 is not in the grid's n (3, 7)" in capsys.readouterr().err
