"""The training loop of one trial on a small beton: it learns, reports every epoch and resumes, both in
the trial's own process and under Ray Train's TorchTrainer (two CPU workers, DDP over gloo)."""
import copy
import functools
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raytransfer.hosts import load_state, save_state
from raytransfer.sweep.store import load_weights
from raytransfer.loop import best_k_mean, fit
from raytransfer.prepare import prepare
from raytransfer.recipes import get_recipe
from raytransfer.synthetic import SyntheticSpec
from raytransfer.trial import run_trial

# Four classes, one per superclass (two per family): easy enough to learn in seconds on a CPU.
SPEC = SyntheticSpec(seed=0, superclasses_per_family=2, classes_per_superclass=1, train_per_class=200,
                     val_per_class=50)
# 8 epochs x 25 steps of 32: top-1 0.70-0.79 in-process over 7 runs (chance 0.25; augmentation is unseeded)
RECIPE = get_recipe("smoke", epochs=8, lr=0.005, schedule="step", warmup_fraction=0.1, milestones=(0.75,))
CHANCE = 0.25
CPU = torch.device("cpu")
EPOCH_KEYS = {"epoch", "train_loss", "val_top1", "val_top5", "images_per_s", "lr", "step"}
RECORD_KEYS = EPOCH_KEYS | {"input_wait_s", "train_s", "train_images", "total_steps"}     # every record's
SUMMARY_KEYS = {"top1_final", "top1_best10", "wall_s", "frozen_check", "epochs", "evaluations", "plateau_rise",
                "converged"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic4")
    # native 32 px, raw pixels: JPEG at this size cost ~10 points of top-1 here (0.54-0.63 vs 0.70-0.79)
    manifest = prepare("synthetic", None, out, resolution=None, format="raw", synthetic=SPEC)
    return out, [c["id"] for c in manifest["classes"]]


def trial_spec(dataset, treatment="baseA", n=0, recipe=RECIPE, classes=None, seed=0):
    data_dir, all_classes = dataset
    return {"job_key": f"test.{treatment}.n{n}", "data_dir": str(data_dir), "target_classes": classes or all_classes,
            "treatment": treatment, "n": n, "seed": seed, "recipe": recipe.to_dict()}


@pytest.fixture(scope="module")
def base_run(dataset):
    """A base trained in-process; every epoch's metrics and a copy of its checkpoint state."""
    reports = []
    summary = run_trial(trial_spec(dataset), CPU,
                        report=lambda m, state: reports.append((dict(m), copy.deepcopy(state))))
    return summary, reports


def test_loop_learns_in_process(base_run):
    summary, reports = base_run
    epochs = [m for m, _ in reports]
    assert [m["epoch"] for m in epochs] == list(range(8))
    assert all(EPOCH_KEYS <= m.keys() for m in epochs)
    assert all(m["images_per_s"] > 0 and 0 <= m["val_top1"] <= m["val_top5"] <= 1 for m in epochs)
    assert [m["lr"] for m in epochs][-1] == pytest.approx(RECIPE.lr * 0.1)       # the step schedule ran
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert SUMMARY_KEYS <= summary.keys() and summary["frozen_check"] is None
    log = summary["epoch_log"]                                   # the input path and the share of time waiting on it
    assert summary["input"] in ("pixel_store", "ffcv") and all(m["input_wait_s"] >= 0 for m in log)
    waited, trained = sum(m["input_wait_s"] for m in log), sum(m["train_s"] for m in log)
    assert summary["input_wait_share"] == pytest.approx(waited / trained)
    assert 0 <= summary["input_wait_share"] < 1
    assert summary["top1_final"] > 2 * CHANCE                                     # clearly above chance
    history = reports[-1][1]["history"]
    assert summary["evaluations"] == len(history) == 8 * RECIPE.evals_per_epoch
    assert summary["top1_best10"] == pytest.approx(best_k_mean([h["val_top1"] for h in history], 10))
    assert summary["top1_best10"] == pytest.approx(sum(sorted(h["val_top1"] for h in history)[-10:]) / 10)
    # the convergence rule on its own curve: last tenth of the steps vs the tenth ending at 80 %
    total = history[-1]["step"]
    late = [h["val_top1"] for h in history if h["step"] > 0.9 * total]
    before = [h["val_top1"] for h in history if 0.7 * total < h["step"] <= 0.8 * total]
    assert summary["plateau_rise"] == pytest.approx(sum(late) / len(late) - sum(before) / len(before))
    assert summary["converged"] is (summary["plateau_rise"] < 0.01)


def test_resumed_trial_continues_from_its_checkpoint_epoch(dataset, base_run):
    summary, reports = base_run
    k = 5
    resumed = []
    again = run_trial(trial_spec(dataset), CPU, report=lambda m, state: resumed.append(dict(m)),
                      resume_state=reports[k][1])
    assert [m["epoch"] for m in resumed] == list(range(k + 1, 8))               # only epochs k+1.. trained
    assert [m["step"] for m in resumed] == [m["step"] for m, _ in reports[k + 1:]]
    assert [m["lr"] for m in resumed] == [m["lr"] for m, _ in reports[k + 1:]]   # the schedule continued
    assert again["evaluations"] == summary["evaluations"] and again["steps"] == summary["steps"]


def test_resuming_a_finished_trial_trains_nothing(dataset, base_run):
    summary, reports = base_run
    calls = []
    again = run_trial(trial_spec(dataset), CPU, report=lambda m, s: calls.append(m), resume_state=reports[-1][1])
    assert calls == []
    assert all(torch.equal(again["state_dict"][k], v) for k, v in reports[-1][1]["model"].items())
    assert all(torch.equal(again["state_dict"][k], v) for k, v in summary["state_dict"].items())
    assert again["top1_best10"] == summary["top1_best10"] and again["top1_final"] == summary["top1_final"]


@pytest.mark.parametrize("treatment,n,frozen_check", [("BnB", 3, True), ("random_frozen", 2, True),
                                                      ("BnB+", 2, None)])
def test_transfer_trials_record_the_frozen_check(dataset, base_run, treatment, n, frozen_check):
    base = base_run[0]["state_dict"]
    one_epoch = get_recipe("smoke", epochs=1, lr=0.005)
    summary = run_trial(trial_spec(dataset, treatment, n, one_epoch), CPU, base_state=base)
    assert summary["frozen_check"] is frozen_check
    copied = [f"conv{i}.weight" for i in range(1, n + 1)]
    same_as_base = [torch.equal(summary["state_dict"][k], base[k]) for k in copied]
    assert all(same_as_base) if treatment == "BnB" else not any(same_as_base)


def test_head_outputs_sets_the_head_width(dataset):
    """head_outputs: the paper's 1000-way head whatever the task; here 6 outputs for a 2-class half."""
    half = dataset[1][:2]
    summary = run_trial(trial_spec(dataset, recipe=get_recipe("smoke", epochs=1, head_outputs=6), classes=half), CPU)
    assert summary["num_classes"] == 6 and summary["state_dict"]["fc8.weight"].shape[0] == 6


def test_weights_uri_round_trip(tmp_path, base_run):
    save_state(base_run[1][-1][1], tmp_path)
    assert load_state(tmp_path)["epoch"] == 7
    weights = load_weights(str(tmp_path))
    assert all(torch.equal(weights[k], v) for k, v in base_run[0]["state_dict"].items())


# --- Ray Train -------------------------------------------------------------------------------------

def train_fn_failing_once(config):
    """hosts.train_fn_per_worker, except that the first attempt (no checkpoint yet: the same answer on
    every rank) raises on every rank right after reporting epoch 1. Rank 0 logs `<pid> <epoch>` for
    each report, so the test sees which attempt reported what."""
    import os
    from pathlib import Path

    import ray.train

    from raytransfer import hosts

    rank = ray.train.get_context().get_world_rank()
    first_attempt = ray.train.get_checkpoint() is None
    real_report = ray.train.report

    def report(metrics, checkpoint=None, **kwargs):
        if rank == 0:
            with open(Path(config["scratch"]) / "reports.log", "a") as f:
                f.write(f"{os.getpid()} {metrics.get('epoch', 'final')}\n")
        real_report(metrics, checkpoint=checkpoint, **kwargs)
        if first_attempt and metrics.get("epoch") == 1:
            raise RuntimeError("injected failure after epoch 1")

    ray.train.report = report
    try:
        return hosts.train_fn_per_worker(config)
    finally:
        ray.train.report = real_report


def bases_from(uri: str, keys: list[str]):
    """What the sweep hands a Train worker as `load_bases`: ({job key: its base's weights}, {job key: where from})."""
    weights = load_weights(uri)
    return {k: weights for k in keys}, {k: "storage" for k in keys}


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    import ray.cloudpickle

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")          # short: Ray's socket paths must fit 107 bytes
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 1024**2, _temp_dir=temp_dir)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])     # workers cannot import tests/
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


def test_torch_trainer_learns_checkpoints_and_resumes_after_a_failure(dataset, base_run, local_ray, tmp_path):
    """Two DDP workers train a cohort of two transfers from one stream (conv1 frozen from the in-process base,
    the rest fresh; conv1..2 fine-tuned) and fail once after epoch 1; the restarted workers continue both from
    epoch 2's checkpoint, which holds both."""
    import ray.train
    from ray.train.torch import TorchTrainer

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_state(base_run[1][-1][1], base_dir)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    spec, tuned = trial_spec(dataset, "BnB", 1), trial_spec(dataset, "BnB+", 2)
    trainer = TorchTrainer(
        train_fn_failing_once,
        train_loop_config={"specs": [spec, tuned], "load_bases": functools.partial(bases_from, str(base_dir),
                                                                                  [spec["job_key"], tuned["job_key"]]),
                           "checkpoint_minutes": 0, "scratch": str(scratch)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs"), name="t",
                                       failure_config=ray.train.FailureConfig(max_failures=1)))
    result = trainer.fit()
    assert result.error is None
    attempts = {}                               # pid -> epochs it reported: two attempts, the second resumed
    for line in (scratch / "reports.log").read_text().splitlines():
        pid, epoch = line.split()
        attempts.setdefault(pid, []).append(epoch)
    assert list(attempts.values()) == [["0", "1"], ["2", "3", "4", "5", "6", "7", "final"]]

    per_epoch = [m for _, m in result.best_checkpoints if "epoch" in m]
    assert [m["epoch"] for m in per_epoch] == list(range(8))                        # a checkpoint each epoch
    assert all(EPOCH_KEYS <= m.keys() for m in per_epoch)
    final = result.metrics
    assert final["final"] is True and SUMMARY_KEYS <= final.keys() and final["resumed_from_epoch"] == 1
    assert final["frozen_check"] is True
    assert final["top1_final"] > 2 * CHANCE and final["evaluations"] == 16
    assert result.return_value == final
    summaries = json.loads(final["summaries"])
    assert summaries[spec["job_key"]]["top1_final"] == final["top1_final"]
    assert summaries[tuned["job_key"]]["frozen_check"] is None and summaries[tuned["job_key"]]["resumed_from_epoch"] == 1
    assert summaries[tuned["job_key"]]["top1_final"] > 2 * CHANCE and summaries[tuned["job_key"]]["cohort_size"] == 2
    with result.checkpoint.as_directory() as d:
        state = load_state(d)
    member, other = state["members"][spec["job_key"]], state["members"][tuned["job_key"]]
    assert state["epoch"] == 7 and len(member["history"]) == len(other["history"]) == 16
    assert torch.equal(member["model"]["conv1.weight"], base_run[0]["state_dict"]["conv1.weight"])
    assert not torch.equal(other["model"]["conv1.weight"], base_run[0]["state_dict"]["conv1.weight"])   # tuned


def test_until_plateau_lowers_the_rate_at_each_plateau_and_stops(dataset):
    """--until-plateau: a constant rate until validation top-1 plateaus, x gamma per plateau, stop after the
    last milestone's decay, at most the cap; the epochs run and the rates follow convergence.plateau_state."""
    from raytransfer.convergence import plateau_state
    from raytransfer.loop import epoch_top1

    recipe = get_recipe("smoke", schedule="plateau", until_plateau=30, milestones=(0.5,), lr=0.01, warmup_fraction=0.0)
    reports = []
    summary = run_trial(trial_spec(dataset, recipe=recipe), CPU, report=lambda m, s: reports.append((dict(m), s["history"])))
    epochs = [m for m, _ in reports]
    assert 6 <= len(epochs) <= 30 and summary["epochs"] == len(epochs)
    for i, m in enumerate(epochs):                           # the rate of epoch i: from the curve before it
        level, _ = plateau_state(epoch_top1(reports[i - 1][1] if i else []), decays=1)
        assert m["lr"] == pytest.approx(recipe.lr * recipe.gamma ** level)
    if len(epochs) < 30:                                     # stopped by the rule, not the cap
        assert plateau_state(epoch_top1(reports[-1][1]), decays=1) == (1, True)


# --- Records by iterations, at any epoch count ---------------------------------------------------

def _benchmark(name: str):
    """A benchmark script as a module (its one-layer net and tensor loader serve these tests too)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_overhead = _benchmark("epoch_overhead")
OneLayerNet, TensorLoader = _overhead.OneLayerNet, _overhead.TensorLoader


def synthetic_images(images: int):
    """The first `images` (at most 4) training images of a 4-class built-in dataset, one of each class, shrunk to
    8 x 8: a reduced-volume half at k = 1."""
    from raytransfer.synthetic import SyntheticImages

    data = SyntheticImages(SyntheticSpec(seed=0, superclasses_per_family=2, classes_per_superclass=1,
                                         train_per_class=1, val_per_class=1), "train")
    pairs = [data[i] for i in range(images)]
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im, _ in pairs])
    return F.adaptive_avg_pool2d(x, 8), torch.tensor([label for _, label in pairs])


def tiny_loaders(images: int, batch_size: int, delay_s: float = 0.0, input_name: str = "memory"):
    x, y = synthetic_images(images)
    return types.SimpleNamespace(train=TensorLoader(x, y, batch_size, delay_s=delay_s),
                                 val=TensorLoader(x, y, images, train=False), input=input_name)


def reduced_like(iterations: int, batch_size: int, **overrides):
    """The paper's reduced-volume solver (Caffe's SGD, x0.1 at 64/200 of the run, a test every 1000 steps)."""
    return get_recipe("paper_reduced", iterations=iterations, batch_size=batch_size, **overrides)


def test_records_stay_bounded_over_tens_of_thousands_of_epochs(one_thread):
    """k = 1 of a reduced-volume net in miniature: 2 classes x 1 image at batch 2, so 10,000 iterations are 10,000
    epochs of one step. One record (report, checkpoint state, curve row) per evaluation: 10, not 10,000."""
    recipe = reduced_like(10_000, 2)
    reports = []
    summary = fit(OneLayerNet(4, 192), recipe, tiny_loaders(2, 2), CPU,
                  report=lambda m, s: reports.append((m, {k: s[k] for k in ("epoch", "step", "history")})))
    assert summary["epochs"] == 10_000 and summary["steps"] == 10_000
    assert summary["evaluations"] == len(reports) == 10_000 // recipe.eval_every_iters
    assert [m["step"] for m, _ in reports] == list(range(1000, 10_001, 1000))
    assert [m["epoch"] for m, _ in reports] == list(range(999, 10_000, 1000))
    assert all(RECORD_KEYS <= m.keys() and m["train_images"] == 2000 for m, _ in reports)
    assert [len(s["history"]) for _, s in reports] == list(range(1, 11))     # the state grows by evaluations
    assert reports[-1][0]["lr"] == pytest.approx(recipe.lr * 0.1 ** 3)           # the schedule's three decays ran


def test_a_trial_resumed_inside_an_epoch_continues_exactly(one_thread):
    """Evaluations every 10 steps of epochs of 3 steps fall inside epochs: a resume from any of those records
    replays its epoch's order up to the step and gives the records and the net of the run never stopped."""
    recipe = reduced_like(60, 1, eval_every_iters=10, milestones=(0.5,))
    loaders = tiny_loaders(3, 1)
    full = []
    start = OneLayerNet(4, 192)
    net = copy.deepcopy(start)
    fit(net, recipe, loaders, CPU, report=lambda m, s: full.append((dict(m), copy.deepcopy(s))))
    assert [m["step"] % 3 for m, _ in full] == [1, 2, 0, 1, 2, 0]                # mid-epoch, mostly
    same = ("epoch", "step", "train_loss", "lr", "val_top1", "train_images")
    for k in (0, 1, 3):
        resumed = []
        again = copy.deepcopy(start)
        fit(again, recipe, loaders, CPU, state=full[k][1], report=lambda m, s: resumed.append(m))
        assert [{f: m[f] for f in same} for m in resumed] == [{f: m[f] for f in same} for m, _ in full[k + 1:]]
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))


def test_each_record_has_its_input_wait_and_one_warning_names_the_fix(caplog, one_thread):
    """A loader that takes 20 ms a batch: each record's input wait covers those sleeps, its images/s is the
    images over its training seconds, and one warning (not one per record) says what to change."""
    recipe = get_recipe("smoke", epochs=4, batch_size=1, evals_per_epoch=1)
    reports = []
    with caplog.at_level(logging.WARNING, logger="raytransfer.loop"):
        fit(OneLayerNet(4, 192), recipe, tiny_loaders(3, 1, delay_s=0.02, input_name="ffcv"), CPU,
            report=lambda m, s: reports.append(m))
    assert [m["epoch"] for m in reports] == [0, 1, 2, 3]                         # by epoch: no eval_every_iters
    for m in reports:
        assert 3 * 0.02 <= m["input_wait_s"] <= m["train_s"]
        assert m["images_per_s"] == pytest.approx(m["train_images"] / m["train_s"])
    warnings = [r.getMessage() for r in caplog.records if "waited on its input" in r.getMessage()]
    assert len(warnings) == 1 and "ffcv input" in warnings[0]
    assert "--cpus-per-trial" in warnings[0] and "--set input=pixel_store" in warnings[0]


def test_progress_is_logged_by_time_also_inside_an_epoch(caplog):
    with caplog.at_level(logging.INFO, logger="raytransfer.loop"):
        fit(OneLayerNet(4, 192), reduced_like(3, 1), tiny_loaders(3, 1), CPU, log_every_s=1e-9)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ep ")]
    assert [line.split()[:4] for line in lines] == [["ep", "0", "it", f"{i}/3"] for i in (1, 2, 3)]
    assert all(" loss " in line and " img/s " in line and " data " in line and " eta " in line for line in lines)


def test_a_checkpoint_is_due_at_the_last_step_not_at_every_record_of_the_last_epoch():
    from raytransfer.hosts import Checkpointer

    hourly = Checkpointer(60)
    assert not hourly.due({"epoch": 178, "epochs": 179, "step": 449_000, "total_steps": 450_000})
    assert hourly.due({"epoch": 178, "epochs": 179, "step": 450_000, "total_steps": 450_000})
    assert hourly.due({"epoch": 5, "epochs": 6}) and not hourly.due({"epoch": 4, "epochs": 6})   # by epoch, as before
