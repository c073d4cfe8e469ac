"""The cluster path's decisions, without a cluster: trial sizes and concurrency from the node types an
autoscaler can launch, the registry released as bases' dependents end, failed jobs kept apart from
done ones, checkpoints on a time cadence, data and devices checked where a trial runs, and the shape
of the code (nothing below the sweep imports it; runner and tuning do not import each other)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from raytransfer.sweep.capacity import NodeType, _from_config_file, plan_trials
from raytransfer.sweep.errors import SweepError

ROOT = Path(__file__).resolve().parents[1]
HEAD = NodeType("alive node", {"CPU": 8.0}, 1)
GPU_WORKER = NodeType("gpu_worker", {"CPU": 48.0, "GPU": 4.0}, 8, launchable=True)


def test_gpus_by_default_when_a_launchable_node_type_has_them():
    plan = plan_trials([HEAD, GPU_WORKER], None, 1, 1.0)
    assert plan.gpus_per_worker == 1.0 and plan.host == "process" and plan.fitting == ["gpu_worker"]
    assert plan.concurrency == 32                                   # 8 nodes x 4 GPUs, none alive yet
    assert plan_trials([HEAD], None, 1, 1.0).gpus_per_worker == 0.0  # a CPU cluster trains on CPUs
    assert plan_trials([HEAD, GPU_WORKER], 0, 1, 1.0).fitting == ["alive node", "gpu_worker"]   # asked: head too


def test_several_workers_need_ray_train_and_share_the_slots():
    plan = plan_trials([HEAD, GPU_WORKER], 1, 4, 8.0)
    assert plan.host == "train" and plan.concurrency == 8          # 32 GPUs / 4 workers (CPU: 48/8 = 6 >= 4)
    assert plan_trials([HEAD, GPU_WORKER], 1, 1, 1.0, max_concurrent=3).concurrency == 3
    with pytest.raises(SweepError) as e:                           # 40 workers: more than 32 GPUs at once
        plan_trials([HEAD, GPU_WORKER], 1, 40, 1.0)
    assert "--workers-per-trial 40" in str(e.value) and "holds at most 32" in str(e.value)
    unbounded = NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, -1, launchable=True)
    assert plan_trials([HEAD, unbounded], None, 1, 1.0).concurrency is None


def test_a_gpu_trial_gets_its_node_types_cpus_per_gpu_unless_asked():
    """--cpus-per-trial not given (None): a GPU worker gets the GPU node type's CPUs per GPU (g5.12xlarge:
    48 vCPUs / 4 GPUs = 12), times its share of a GPU; the fewest over the GPU types; a CPU trial 1; asked wins."""
    plan = plan_trials([HEAD, GPU_WORKER], None, 1, None)
    assert (plan.cpus_per_worker, plan.concurrency) == (12.0, 32) and "gpu_worker" in plan.cpus_from
    assert plan_trials([HEAD, GPU_WORKER], 0.5, 1, None).cpus_per_worker == 6.0
    assert plan_trials([HEAD, GPU_WORKER], None, 1, 3.0).cpus_per_worker == 3.0
    assert plan_trials([HEAD], None, 1, None).cpus_per_worker == 1.0
    small = NodeType("g4dn.12xlarge", {"CPU": 48.0, "GPU": 4.0}, 2, launchable=True)
    eight = NodeType("p4d.24xlarge", {"CPU": 96.0, "GPU": 8.0}, 2, launchable=True)
    lean = NodeType("lean", {"CPU": 16.0, "GPU": 8.0}, 1, launchable=True)
    assert plan_trials([HEAD, small, eight], None, 1, None).cpus_per_worker == 12.0
    assert plan_trials([HEAD, small, lean], None, 1, None).cpus_per_worker == 2.0    # every GPU of both types fits


@pytest.mark.parametrize("gpus, cpus, phrases", [
    (8, 1.0, ["--gpus-per-trial 8", "gpu_worker (CPU 48, GPU 4; up to 8 node(s))", "ask for fewer"]),
    (1, 64.0, ["--cpus-per-trial 64", "alive node (CPU 8; 1 alive)"]),
])
def test_no_node_type_fits_is_one_error_naming_the_types(gpus, cpus, phrases):
    with pytest.raises(SweepError) as e:
        plan_trials([HEAD, GPU_WORKER], gpus, 1, cpus)
    for p in phrases:
        assert p in str(e.value)


def test_node_types_from_an_autoscaling_config_file():
    types = _from_config_file(ROOT / "clusters" / "local-autoscaling.yaml")
    assert [(t.name, t.resources["GPU"], t.count, t.launchable) for t in types] == [("gpu_worker", 1.0, 2, True)]
    plan = plan_trials([HEAD, *types], None, 1, 1.0)
    assert plan.test_cluster and plan.concurrency == 2
    aws = _from_config_file(ROOT / "cluster.yaml")                 # the real cluster: no test resource
    assert aws and not plan_trials([HEAD, *aws], 0, 1, 1.0).test_cluster


class FakeJob:
    def __init__(self, key, base=None):
        self.key, self.base_key, self.treatment, self.n = key, base, "AnB" if base else "baseA", 1
        self.split_kind, self.split_seed, self.target_half, self.spec = "similar", 0, "B", {}

    @property
    def deps(self):
        return (self.base_key,) if self.base_key else ()


def test_a_base_is_released_once_every_dependent_has_ended():
    from raytransfer.sweep.searcher import DependencySearcher

    released = []
    s = DependencySearcher([FakeJob("A"), FakeJob("t1", "A"), FakeJob("t2", "A")], release=released.append)
    assert s.suggest("1")["job_key"] == "A"
    s.on_trial_complete("1", {"weights_uri": "/w/A"})
    assert released == []                                           # dependents still to run
    assert s.suggest("2")["job_key"] == "t1" and s.suggest("3")["job_key"] == "t2"
    s.on_trial_complete("2", {"weights_uri": "/w/t1"})
    assert released == []
    s.on_trial_complete("3", None, error=True)                      # failed for good: ended all the same
    assert released == ["A"]
    s.on_trial_complete("3", {"weights_uri": "/w/t2"})              # never twice
    assert released == ["A"] and "released" in s.get_state()


def test_failed_jobs_are_recorded_apart_and_never_done_rows(tmp_path):
    from raytransfer.sweep.outcomes import record_outcome
    from raytransfer.sweep.results import write_results
    from raytransfer.sweep.settings import TrialSettings
    from raytransfer.sweep.store import JobStore

    store = JobStore(str(tmp_path))
    spec = {"treatment": "AnB", "job_key": "k", "recipe": {"arch": "caffenet", "name": "smoke"}}
    trial = TrialSettings(str(tmp_path), "process", 1.0, 0.0, 1, 10.0, "none")
    summary = {"state_dict": {"w": torch.zeros(2)}, "frozen_check": False, "frozen_mismatched": ["conv1.weight"],
               "top1_final": 0.9, "node_id": "n1", "gpus_held": 1.0}
    store.count_attempt("k", {"node_id": "n1"})
    outcome = record_outcome(store, "k", spec, summary, trial, started=0.0)
    assert "weights_uri" not in outcome and "conv1.weight" in outcome["failure_reason"]
    assert store.read("k") is None and "frozen layers changed" in store.failed()["k"]["reason"]
    assert not (tmp_path / "jobstore" / "weights" / "k").exists()

    job = FakeJob("k", "A")
    job.row = lambda: {"job_key": "k", "treatment": "AnB", "n": 1, "base_job_key": "A"}
    job.spec = spec
    done = write_results(tmp_path / "out", [job], {}, store.failed())
    table = __import__("pandas").read_csv(tmp_path / "out" / "results.csv")
    assert len(done) == 0 and list(table.status) == ["failed"] and "frozen" in table.reason[0]

    summary["frozen_check"] = True                                  # the rerun succeeds: the failure goes
    store.count_attempt("k", {"node_id": "n1"})
    outcome = record_outcome(store, "k", spec, summary, trial, started=0.0)
    assert outcome["weights_uri"] and store.read("k")["attempts"] == 2 and store.failed() == {}


def test_attempts_are_counted_across_restarts(tmp_path):
    from raytransfer.sweep.store import JobStore

    store = JobStore(str(tmp_path))
    assert [store.count_attempt("k", {"node_id": n}) for n in ("a", "b")] == [1, 2]
    assert [a["node_id"] for a in JobStore(str(tmp_path)).attempts("k")] == ["a", "b"]


def test_checkpoints_on_a_time_cadence_and_after_the_last_epoch(tmp_path):
    from raytransfer.hosts import Checkpointer

    clock = [0.0]
    c = Checkpointer(minutes=10)
    c.clock, c.last = (lambda: clock[0]), 0.0
    due = []
    for epoch, t in enumerate([60, 300, 620, 700, 1300]):
        clock[0] = t
        due.append(c.due({"epoch": epoch, "epochs": 6}))
        if due[-1]:
            c.save({"x": torch.zeros(10)}, tmp_path)
    clock[0] = 1310
    due.append(c.due({"epoch": 5, "epochs": 6}))                   # the last epoch: always
    assert due == [False, False, True, False, True, True]
    assert c.note()["checkpoints_written"] == 2 and c.note()["checkpoint_bytes"] > 0
    every = Checkpointer(minutes=0)
    assert every.due({"epoch": 0, "epochs": 6})


def test_a_setup_error_inside_a_train_worker_failure_is_found():
    from ray.train import WorkerGroupError

    from raytransfer.hosts import TrialSetupError
    from raytransfer.sweep.trainable import _setup_error

    inner = TrialSetupError("node n1 holds another dataset at /d")
    wrapped = WorkerGroupError("rank 0 failed", {0: RuntimeError("x"), 1: inner})
    assert _setup_error(wrapped, TrialSetupError) == "node n1 holds another dataset at /d"
    assert _setup_error(RuntimeError("boom"), TrialSetupError) is None


def test_a_gpu_trial_without_cuda_outside_a_test_cluster_fails_clearly(monkeypatch):
    from raytransfer import hosts

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hosts.training_device(0) == torch.device("cpu")
    with pytest.raises(hosts.TrialSetupError) as e:
        hosts.training_device(1.0)                                  # no Ray here: not a test cluster
    assert "CUDA is not available" in str(e.value) and "--gpus-per-trial 0" in str(e.value)
    monkeypatch.setattr(hosts, "node_is_test_cluster", lambda: True)
    assert hosts.training_device(1.0) == torch.device("cpu")


def test_the_built_in_dataset_is_prepared_where_a_trial_lacks_it_and_checked(tmp_path):
    from raytransfer.hosts import TrialSetupError, ensure_dataset
    from raytransfer.prepare import prepare, read_manifest
    from raytransfer.synthetic import SyntheticSpec

    spec = SyntheticSpec(train_per_class=3, val_per_class=1, superclasses_per_family=2, classes_per_superclass=2)
    here = prepare("synthetic", None, tmp_path / "driver", resolution=None, synthetic=spec, workers=1)
    node = {"data_dir": str(tmp_path / "node" / "synthetic"), "dataset_fingerprint": here["fingerprint"],
            "synthetic": spec.to_dict()}
    ensure_dataset(node)                                            # this "node" lacked it: prepared here
    there = read_manifest(node["data_dir"])
    assert there["fingerprint"] == here["fingerprint"]              # two independent preparations: one dataset
    # and the same samples (the files' page layout may differ): labels of both splits, every val image
    from raytransfer.loaders import CropSpec, build_half_loaders
    from raytransfer.prepare import label_column

    for split in ("train", "val"):
        a, b = (label_column(d / f"{split}.beton") for d in (tmp_path / "driver", Path(node["data_dir"])))
        assert (a == b).all(), split
    classes = [c["id"] for c in here["classes"]]
    val = [[(x.clone(), y.clone()) for x, y in build_half_loaders(d, classes, CropSpec("paper", 28), 8,
                                                                  torch.device("cpu"), seed=0).val]
           for d in (tmp_path / "driver", Path(node["data_dir"]))]
    assert len(val[0]) == len(val[1]) > 0
    assert all(torch.equal(x0, x1) and torch.equal(y0, y1) for (x0, y0), (x1, y1) in zip(*val))
    with pytest.raises(TrialSetupError) as e:
        ensure_dataset({**node, "dataset_fingerprint": "0" * 64})
    assert "holds another dataset" in str(e.value) and "stage the same prepared betons" in str(e.value)
    with pytest.raises(TrialSetupError) as e:
        ensure_dataset({"data_dir": str(tmp_path / "nowhere"), "dataset_fingerprint": here["fingerprint"]})
    assert "has no prepared dataset" in str(e.value)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_nothing_below_the_sweep_imports_it_and_runner_and_tuning_do_not_import_each_other():
    pkg = ROOT / "raytransfer"
    for f in pkg.glob("*.py"):
        if f.name == "cli.py":                                      # the command line sits above the sweep
            continue
        bad = [m for m in _imports(f) if m.startswith((".sweep", "raytransfer.sweep"))]
        assert not bad, (f.name, bad)
    assert not [m for m in _imports(pkg / "sweep" / "tuning.py") if m.endswith("runner")]    # one direction only
    assert ".tuning" in _imports(pkg / "sweep" / "runner.py")


def test_the_estimate_uses_the_recipes_own_step_speed_and_says_what_it_assumes(capsys, monkeypatch):
    """paper runs fp32 eager (12.6k img/s on the H100), fast compiled bf16 at batch 1024 (27.0k); a frozen n = 7
    job costs its measured share, a fine-tuned one a full step; a recipe never measured gets no estimate."""
    from types import SimpleNamespace

    from raytransfer.recipes import get_recipe
    from raytransfer.step_costs import relative_cost, step_speed
    from raytransfer.sweep import estimate

    paper, fast = get_recipe("paper"), get_recipe("fast")
    assert step_speed(paper).img_per_s == 12_600 and step_speed(fast).img_per_s == 27_000
    assert step_speed(get_recipe("demo")) is None and step_speed(get_recipe("paper", batch_size=512)) is None
    assert relative_cost("AnB", 7) == relative_cost(7) == pytest.approx(0.65 / 1.77)
    assert relative_cost("AnB+", 7) == relative_cost("baseA", 0) == 1.0
    assert relative_cost("BnB", 7, step_speed(fast)) == pytest.approx(23_164 / 59_684)
    monkeypatch.setattr(estimate, "_train_images_per_class", lambda dataset: 1300)
    job = lambda t, n: SimpleNamespace(key=f"{t}{n}", is_diagnostic=False, k=0, treatment=t, n=n,
                                       base_key="A" if t.startswith("AnB") else None,
                                       spec={"recipe": paper.to_dict(), "target_classes": list(range(500)), "seed": 0})
    estimate.print_estimate([job("baseA", 0), job("AnB", 7), job("AnB+", 7)], {}, paper, None)
    out = capsys.readouterr().out
    hours = 450_000 * 256 / 12_600 / 3600 * (2 + 0.65 / 1.77)
    assert f"estimate: {hours:.1f} GPU-hours for the 3 jobs" in out and "12,600 img/s" in out and "fp32" in out
    assert "input: assumed to keep up" in out and "pixel store" in out
    estimate.print_estimate([job("baseA", 0)], {}, get_recipe("paper", input="ffcv"), None, cpus_per_trial=8)
    assert "FFCV decodes on the trial's 8 CPU(s), about 2,050 img/s" in capsys.readouterr().out
    estimate.print_estimate([job("baseA", 0)], {}, get_recipe("demo"), None)
    assert "estimate: none for recipe demo" in capsys.readouterr().out
