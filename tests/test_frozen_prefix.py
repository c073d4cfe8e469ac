"""A frozen net's layers 1..n computed once per input (raytransfer/frozen_prefix.py) train the same net as
those layers run at every step; nets where the inputs are not a fixed finite set run them every step (once per
batch for a whole cohort), and only up to a stage that draws at random."""
import pytest
import torch

from conftest import trial_spec

import raytransfer.frozen_prefix as frozen_prefix
import raytransfer.trial as trial
from raytransfer.frozen_prefix import Suffix, plan_inputs, shared_depth, why_not
from raytransfer.loop import Member
from raytransfer.loaders import CropSpec, build_half_loaders
from raytransfer.models import build_model
from raytransfer.recipes import get_recipe
from raytransfer.transfer import build_trial_network

CPU = torch.device("cpu")
# the demo's net and input (30 px crops of 32 px images held in memory: 3 x 3 offsets x mirror = 18 inputs an
# image), 20 epochs of 6 steps: more epochs than inputs, so the prefix is looked up
RECIPE = get_recipe("demo", epochs=20, batch_size=8, milestones=(0.7,))



@pytest.fixture(scope="module")
def dataset(four_class_half):
    return four_class_half


def spec(dataset, treatment, n, recipe=RECIPE):
    return trial_spec(dataset, treatment, n, recipe)


@pytest.mark.parametrize("arch,kw", [("caffenet", dict(width=0.125, resolution=30, norm="batch", stem_stride=2)),
                                     ("caffenet", dict(width=0.125, resolution=32)),
                                     ("resnet18", dict(width=0.125, resolution=32))])
def test_stages_compose_to_the_forward_pass_at_every_cut(arch, kw):
    torch.manual_seed(0)
    net = build_model(arch, num_classes=5, **kw).eval()
    x = torch.randn(3, 3, kw["resolution"], kw["resolution"])
    assert len(net.stages()) == len(net.layer_table())
    for n in range(len(net.stages()) + 1):
        assert torch.equal(net.run_stages(net.run_stages(x, 0, n), n), net(x))


@pytest.fixture(scope="module")
def base(dataset):
    return trial.run_trial(spec(dataset, "baseB", 0, get_recipe("demo", epochs=2, batch_size=8)), CPU)["state_dict"]


# the paper's dropout on fc6/fc7 (demo_lrn): the looked-up prefix stops before the first dropout (fc6's output)
DROPOUT = get_recipe("demo_lrn", epochs=20, batch_size=8, milestones=(0.7,))


@pytest.fixture(scope="module")
def dropout_base(dataset):
    return trial.run_trial(spec(dataset, "baseB", 0, get_recipe("demo_lrn", epochs=2, batch_size=8)), CPU)["state_dict"]


@pytest.mark.parametrize("treatment,n,recipe,depth", [("BnB", 7, RECIPE, 7), ("BnB", 3, RECIPE, 3), ("AnB", 1, RECIPE, 1),
                                                      ("random_frozen", 5, RECIPE, 5), ("BnB", 7, DROPOUT, 6),
                                                      ("BnB", 6, DROPOUT, 6), ("AnB", 3, DROPOUT, 3)])
def test_looked_up_prefix_trains_the_same_net_as_the_prefix_run_every_step(dataset, base, dropout_base, monkeypatch,
                                                                           treatment, n, recipe, depth):
    base = dropout_base if recipe is DROPOUT else base
    plans = []
    real = trial.plan_inputs
    monkeypatch.setattr(trial, "plan_inputs", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    looked_up = trial.run_trial(spec(dataset, treatment, n, recipe), CPU, base_state=base)
    assert sorted(plans[0].trunks[0].tables) == [depth] and not plans[0].trunks[0].live_cuts
    monkeypatch.setattr(frozen_prefix, "why_not", lambda *a: "forced: every step")
    every_step = trial.run_trial(spec(dataset, treatment, n, recipe), CPU, base_state=base)
    assert plans[1].trunks[0].live_cuts == {depth} and not plans[1].trunks[0].tables
    assert [e["val_top1"] for e in looked_up["epoch_log"]] == [e["val_top1"] for e in every_step["epoch_log"]]
    assert looked_up["top1_best10"] == every_step["top1_best10"] and looked_up["frozen_check"] is True
    for k, v in every_step["state_dict"].items():
        assert torch.allclose(looked_up["state_dict"][k].float(), v.float(), atol=1e-5), k


def test_where_the_inputs_are_not_a_fixed_finite_set_the_prefix_runs_every_step(dataset):
    def loaders_for(recipe, input="memory"):
        return build_half_loaders(dataset[0], dataset[1], CropSpec("paper", recipe.crop_size, recipe.resize_size),
                                  batch_size=8, device=CPU, seed=0, input=input)

    def net_for(recipe, n=3):
        return build_trial_network("caffenet", 4, None, n, "random_frozen", 0, recipe.arch_kwargs())

    memory, streamed = loaders_for(RECIPE), loaders_for(RECIPE, input="ffcv")
    assert why_not(net_for(RECIPE), 3, memory, 20) is None
    assert "streamed" in why_not(net_for(RECIPE), 3, streamed, 20)
    assert "less than once" in why_not(net_for(RECIPE), 3, memory, 18)
    dropout = net_for(get_recipe("demo", dropout=0.5), 7)          # dropout on fc6's output: fc7's stage draws
    assert shared_depth(dropout, 7) == 6 and shared_depth(dropout, 5) == 5 and shared_depth(net_for(RECIPE, 7), 7) == 7
    member = Member("m", net_for(RECIPE), net_for(RECIPE), frozen_n=3)
    member.model = member.net
    plan = plan_inputs([member], streamed, 20)
    assert plan.trunks[0].live_cuts == {3} and isinstance(member.model, Suffix) and plan.raw
