"""A cohort -- the nets that read one target half, trained from one batch stream (trial.run_cohort) -- trains
each member exactly as alone: on the CPU in fp32 the same final weights, bit for bit, and the same curves, for
a base, a frozen, a fine-tuned, a random-frozen and a scratch member, and for frozen members of different n
that share one trunk; with the trunk looked up per input and computed per batch; with dropout (each member its
own draws). Memory is measured per member and a cohort that does not fit hands members back."""
import contextlib
import copy

import pytest
import torch

from conftest import trial_spec as spec

from raytransfer.cohort import fit_members, member_bytes, stream_key
from raytransfer.frozen_prefix import RAW, plan_inputs
from raytransfer.recipes import get_recipe
from raytransfer.trial import build_cohort, run_cohort, run_trial, train_cohort

CPU = torch.device("cpu")
# the demo's net and input (30 px crops of 32 px images from the pixel store: 18 inputs an image); 20 epochs:
# more than an image's inputs, so frozen layers are looked up; 6 epochs: fewer, so they run once per batch
LOOKED_UP = get_recipe("demo", epochs=20, batch_size=8, milestones=(0.7,))
PER_BATCH = get_recipe("demo", epochs=6, batch_size=8, milestones=(0.7,))



@pytest.fixture(scope="module")
def dataset(four_class_half):
    return four_class_half


@pytest.fixture(scope="module")
def bases(dataset):
    """Two bases of the half (different training seeds: different weights), 2 epochs each."""
    short = get_recipe("demo", epochs=2, batch_size=8)
    return {s: run_trial({**spec(dataset, "baseB", 0, short), "seed": s}, CPU)["state_dict"] for s in (0, 1)}


MEMBERS = [("baseB", 0, None), ("AnB", 3, 0), ("AnB", 1, 0), ("BnB", 3, 1), ("AnB+", 2, 0),
           ("random_frozen", 3, None), ("random_frozen", 5, None), ("scratch", 0, None)]


def assert_same_net(alone: dict, together: dict, key: str):
    assert [r["val_top1"] for r in together["epoch_log"]] == [r["val_top1"] for r in alone["epoch_log"]], key
    assert [r["train_loss"] for r in together["epoch_log"]] == [r["train_loss"] for r in alone["epoch_log"]], key
    assert together["frozen_check"] == alone["frozen_check"] and together["top1_best10"] == alone["top1_best10"]
    for k, v in alone["state_dict"].items():
        assert torch.equal(together["state_dict"][k], v), (key, k)


@pytest.mark.parametrize("recipe", [LOOKED_UP, PER_BATCH], ids=["looked-up", "per-batch"])
def test_every_member_of_a_cohort_is_the_net_trained_alone(dataset, bases, recipe):
    specs = [spec(dataset, t, n, recipe) for t, n, _ in MEMBERS]
    base_of = {s["job_key"]: bases[b] for s, (_, _, b) in zip(specs, MEMBERS) if b is not None}
    together = run_cohort(specs, CPU, base_of)
    assert list(together) == [s["job_key"] for s in specs]
    for s in specs:
        alone = run_trial(s, CPU, base_state=base_of.get(s["job_key"]))
        assert_same_net(alone, together[s["job_key"]], s["job_key"])
        assert together[s["job_key"]]["cohort_size"] == len(specs) and alone["cohort_size"] == 1
    assert sum(t["cohort_share"] for t in together.values()) == pytest.approx(1.0)
    frozen = {k: t for k, t in together.items() if "AnB-" in k or "BnB-" in k or "random" in k}
    assert all(t["frozen_check"] is True for t in frozen.values())


def test_frozen_members_share_one_trunk_per_base(dataset, bases):
    """AnB at n = 1 and 3 from base 0 read one trunk at two cuts, BnB from base 1 its own, the two random-frozen
    nets (one seeded init) a third; looked up once per input where the inputs are a finite set."""
    specs = [spec(dataset, t, n, LOOKED_UP) for t, n, _ in MEMBERS]
    base_of = {s["job_key"]: bases[b] for s, (_, _, b) in zip(specs, MEMBERS) if b is not None}
    cohort = build_cohort(specs, CPU, base_of)
    plan = plan_inputs(cohort.members, cohort.loaders, 20)
    feed = {m.key: m.feed for m in cohort.members}
    assert feed["t-baseB-n0"] == feed["t-AnB+-n2"] == feed["t-scratch-n0"] == RAW
    assert feed["t-AnB-n3"][0] == feed["t-AnB-n1"][0] != feed["t-BnB-n3"][0]
    assert feed["t-random_frozen-n3"][0] == feed["t-random_frozen-n5"][0] not in (feed["t-AnB-n3"][0], feed["t-BnB-n3"][0])
    assert len(plan.trunks) == 3 and all(t.tables and not t.live_cuts for t in plan.trunks)
    assert sorted(plan.trunks[feed["t-AnB-n3"][0]].tables) == [1, 3]
    per_batch = plan_inputs(build_cohort(specs, CPU, base_of).members, cohort.loaders, 6)
    assert all(t.live_cuts and not t.tables for t in per_batch.trunks)


def test_members_with_dropout_draw_their_own_masks(dataset, bases):
    """The paper's dropout on frozen fc6's output: a frozen n = 7 member shares layers 1..6 and runs the rest
    itself with its own draws, so alone and beside others it is the same net."""
    recipe = get_recipe("demo", epochs=4, batch_size=8, dropout=0.5, milestones=(0.7,))
    specs = [spec(dataset, t, n, recipe) for t, n in (("AnB", 7), ("AnB", 6), ("AnB+", 2), ("scratch", 0))]
    base_of = {s["job_key"]: bases[0] for s in specs if s["treatment"] != "scratch"}
    cohort = build_cohort(specs, CPU, base_of)
    plan_inputs(cohort.members, cohort.loaders, 4)
    assert [m.feed[1] for m in cohort.members[:2]] == [6, 6]       # n = 7: layers 1..6 shared, fc7 its own
    together = run_cohort(specs, CPU, base_of)
    for s in specs:
        assert_same_net(run_trial(s, CPU, base_state=base_of.get(s["job_key"])), together[s["job_key"]], s["job_key"])


def test_a_cohort_resumes_every_member_from_its_checkpoint(dataset, bases):
    specs = [spec(dataset, t, n, PER_BATCH) for t, n in (("AnB", 3), ("AnB+", 3), ("scratch", 0))]
    base_of = {s["job_key"]: bases[0] for s in specs if s["treatment"] != "scratch"}
    states = []
    whole = run_cohort(specs, CPU, base_of, report=lambda records, state: states.append(copy.deepcopy(state)))
    assert [s["epoch"] for s in states] == list(range(6))
    resumed = run_cohort(specs, CPU, base_of, resume_state=states[2])
    for s in specs:
        key = s["job_key"]
        curve = lambda log: [(r["epoch"], r["step"], r["train_loss"], r["val_top1"]) for r in log]
        assert curve(resumed[key]["epoch_log"]) == curve(whole[key]["epoch_log"])   # the curve before it came along
        for k, v in whole[key]["state_dict"].items():
            assert torch.equal(resumed[key]["state_dict"][k], v), (key, k)


def test_jobs_of_another_stream_are_refused(dataset):
    a, b = spec(dataset, "scratch", 0, PER_BATCH), {**spec(dataset, "AnB", 1, PER_BATCH), "seed": 4}
    assert stream_key(a) != stream_key(b)
    assert stream_key(a) == stream_key({**a, "treatment": "AnB", "n": 3, "job_key": "other"})
    with pytest.raises(ValueError, match="one stream"):
        build_cohort([a, b], CPU)


def test_memory_is_measured_per_member_and_a_cohort_that_does_not_fit_hands_members_back(dataset, bases, monkeypatch):
    specs = [spec(dataset, t, n, PER_BATCH) for t, n in (("baseB", 0), ("AnB", 7), ("AnB", 3), ("scratch", 0))]
    base_of = {s["job_key"]: bases[0] for s in specs if s["treatment"] == "AnB"}
    cohort = build_cohort(specs, CPU, base_of)
    probe = cohort.probe_batch()
    assert len(probe) == 8
    sizes = {m.key: member_bytes(m.net, probe, contextlib.nullcontext) for m in cohort.members}
    base, n7, n3 = sizes["t-baseB-n0"], sizes["t-AnB-n7"], sizes["t-AnB-n3"]
    assert base["weights"] == n7["weights"] and base["training"] > n3["training"] > n7["training"] > 0
    assert base["activations"] > n3["activations"] > n7["activations"] > 0      # frozen layers save nothing
    params = sum(p.numel() for p in cohort.members[0].net.parameters())
    assert base["training"] == 2 * 4 * params                                   # a gradient and a momentum
    assert fit_members({"a": 5, "b": 5, "c": 5}, 11) == (["a", "b"], ["c"])
    assert fit_members({"a": 50}, 11) == (["a"], [])
    monkeypatch.setenv("RAYTRANSFER_COHORT_BYTES", str(base["total"] + n7["total"] + 1))
    kept, deferred, measured = cohort.fit_memory()
    assert kept == ["t-baseB-n0", "t-AnB-n7"] and deferred == ["t-AnB-n3", "t-scratch-n0"]
    assert measured["t-AnB-n7"] == n7["total"] + 0                              # no table: fewer epochs than inputs
    cohort.keep(kept)
    assert set(train_cohort(cohort)) == set(kept)


def test_a_member_whose_frozen_layers_changed_is_a_failed_row_alone(dataset, bases, tmp_path):
    """A member whose frozen batch norm was left in training mode (its layer table no longer names them frozen)
    updates their statistics: its frozen check fails and its record is a failure, while the cohort's other
    members finish and are done."""
    from raytransfer.sweep.outcomes import record_outcome
    from raytransfer.sweep.settings import TrialSettings
    from raytransfer.sweep.store import JobStore

    specs = [spec(dataset, t, n, PER_BATCH) for t, n in (("AnB", 5), ("AnB", 2), ("AnB+", 2), ("scratch", 0))]
    base_of = {s["job_key"]: bases[0] for s in specs if s["treatment"] != "scratch"}
    cohort = build_cohort(specs, CPU, base_of)
    broken = cohort.members[0]                     # AnB n = 5: the deepest cut, its net is the trunk
    broken.net.frozen_layers = ()
    summaries = train_cohort(cohort)
    assert summaries["t-AnB-n5"]["frozen_check"] is False
    assert any("_bn.running_mean" in k for k in summaries["t-AnB-n5"]["frozen_mismatched"])
    assert summaries["t-AnB-n2"]["frozen_check"] is True and summaries["t-AnB+-n2"]["frozen_check"] is None
    store = JobStore(str(tmp_path))
    trial = TrialSettings(str(tmp_path), "process", 1.0, 0.0, 1, 10.0, "no-registry")
    outcomes = {k: record_outcome(store, k, cohort.specs[k], s, trial, 0.0) for k, s in summaries.items()}
    assert "failure_reason" in outcomes["t-AnB-n5"] and set(store.failed()) == {"t-AnB-n5"}
    assert set(store.completed()) == {"t-AnB-n2", "t-AnB+-n2", "t-scratch-n0"}
