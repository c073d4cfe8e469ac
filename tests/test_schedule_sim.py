"""The scheduling simulator: hand-checked makespans, dependencies respected, the paper grid's shape."""
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "schedule_sim.py"
_spec = importlib.util.spec_from_file_location("schedule_sim", _PATH)
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)
Job = sim.Job


def tiny_grid():
    """Two bases of unequal length, one transfer from each (worked by hand in the tests below)."""
    return [Job("baseA", 2.0, is_base=True), Job("baseB", 4.0, is_base=True),
            Job("t1", 3.0, needs=("baseA",)), Job("t2", 1.0, needs=("baseB",))]


def runs_by_name(schedule):
    return {r.name: (r.gpu, r.start, r.end) for r in schedule.runs}


def test_dependency_schedule_by_hand():
    # K=2: both bases at t=0, the longer (baseB) on GPU 0; t1 starts on GPU 1 when baseA ends (2),
    # t2 on GPU 0 when baseB ends (4). Makespan 5.
    s = sim.simulate(tiny_grid(), gpus=2)
    assert runs_by_name(s) == {"baseB": (0, 0.0, 4.0), "baseA": (1, 0.0, 2.0),
                               "t1": (1, 2.0, 5.0), "t2": (0, 4.0, 5.0)}
    assert s.makespan == 5.0
    assert s.gpu_hours == 10.0
    assert s.reserved_gpu_hours == 10.0


def test_two_phase_by_hand():
    # Barrier at 4 (the longer base): t1 runs 4..7, t2 4..5. Makespan 7, same busy GPU-hours.
    s = sim.simulate(sim.two_phase(tiny_grid()), gpus=2)
    assert runs_by_name(s)["t1"][1:] == (4.0, 7.0)
    assert runs_by_name(s)["t2"][1:] == (4.0, 5.0)
    assert s.makespan == 7.0
    assert s.gpu_hours == 10.0


def test_two_phase_with_controls_in_phase_one_by_hand():
    # K=2, base 0..2 and a control that needs no base. Plain two-phase holds the control behind the
    # barrier: base 0..2 (GPU 1 idle), then control 2..4 and t 2..3, makespan 4. Letting the control
    # run beside the base: base and control 0..2, t 2..3, makespan 3.
    jobs = [Job("base", 2.0, is_base=True), Job("t", 1.0, needs=("base",)), Job("control", 2.0)]
    assert sim.simulate(sim.two_phase(jobs), gpus=2).makespan == 4.0
    early = sim.simulate(sim.two_phase(jobs, controls_in_phase_one=True), gpus=2)
    assert runs_by_name(early) == {"base": (0, 0.0, 2.0), "control": (1, 0.0, 2.0), "t": (0, 2.0, 3.0)}
    assert early.makespan == 3.0


def test_own_base_by_hand():
    # t1 = 2+3 = 5, t2 = 4+1 = 5, and the bases still run first: B 0..4 on GPU 0, A 0..2 on GPU 1;
    # then t1 2..7 on GPU 1 and t2 4..9 on GPU 0. Makespan 9; busy GPU-hours 2+4+5+5 = 16 > 10.
    s = sim.simulate(sim.own_base(tiny_grid()), gpus=2)
    assert runs_by_name(s) == {"baseB": (0, 0.0, 4.0), "baseA": (1, 0.0, 2.0),
                               "t1": (1, 2.0, 7.0), "t2": (0, 4.0, 9.0)}
    assert s.makespan == 9.0
    assert s.gpu_hours == 16.0


def test_bases_first_then_longest_first():
    # One GPU: the base goes before a longer control; once the base is done the longer control
    # goes before the short transfer. Order: base 0..1, control 1..11, transfer 11..12.
    jobs = [Job("control", 10.0), Job("t", 1.0, needs=("base",)), Job("base", 1.0, is_base=True)]
    s = sim.simulate(jobs, gpus=1)
    assert [r.name for r in sorted(s.runs, key=lambda r: r.start)] == ["base", "control", "t"]
    assert s.makespan == 12.0


def test_simulation_is_deterministic_and_ties_break_by_name():
    jobs = [Job(name, 1.0) for name in ("c", "a", "b")]
    first = sim.simulate(jobs, gpus=2)
    assert runs_by_name(first) == {"a": (0, 0.0, 1.0), "b": (1, 0.0, 1.0), "c": (0, 1.0, 2.0)}
    assert first.runs == sim.simulate(list(reversed(jobs)), gpus=2).runs


def test_bad_grids_are_rejected_with_the_name():
    with pytest.raises(ValueError, match="'missing'"):
        sim.simulate([Job("t", 1.0, needs=("missing",))], gpus=1)
    with pytest.raises(ValueError, match="duplicate job name 'a'"):
        sim.simulate([Job("a", 1.0), Job("a", 2.0)], gpus=1)
    with pytest.raises(ValueError, match="cycle"):
        sim.simulate([Job("a", 1.0, needs=("b",)), Job("b", 1.0, needs=("a",))], gpus=1)
    with pytest.raises(ValueError, match="gpus=0"):
        sim.simulate([Job("a", 1.0)], gpus=0)


def test_paper_grid_shape_and_costs():
    jobs = sim.paper_grid(base_hours=1.0)
    names = {j.name for j in jobs}
    assert len(jobs) == len(names) == 5 * (2 + 56 + 14 + 2)
    assert sum(j.is_base for j in jobs) == 10
    assert sum(bool(j.needs) for j in jobs) == 280
    by_name = {j.name: j for j in jobs}
    assert by_name["similar-s0/AnB/n3"].needs == ("similar-s0/baseA",)
    assert by_name["similar-s0/BnB+/n3"].needs == ("similar-s0/baseB",)
    assert by_name["dissimilar/BnA/n7"].needs == ("dissimilar/baseB",)
    assert by_name["dissimilar/BnA/n7"].hours == pytest.approx(0.65 / 1.77)   # ≈0.37 of a base
    assert by_name["dissimilar/BnA+/n7"].hours == 1.0
    assert by_name["similar-s2/random_frozenA/n1"].hours == pytest.approx(1.48 / 1.77)
    assert by_name["similar-s2/random_frozenA/n1"].needs == ()
    assert by_name["similar-s2/scratchB"].hours == 1.0


@pytest.mark.parametrize("gpus", [8, 64])
def test_paper_grid_respects_dependencies_and_bounds(gpus):
    jobs = sim.paper_grid(base_hours=1.0)
    s = sim.simulate(jobs, gpus)
    runs = {r.name: r for r in s.runs}
    for job in jobs:
        for need in job.needs:
            assert runs[job.name].start >= runs[need].end, (job.name, need)
    # no GPU runs two jobs at once
    for gpu in range(gpus):
        on_gpu = sorted((r for r in s.runs if r.gpu == gpu), key=lambda r: r.start)
        assert all(a.end <= b.start for a, b in zip(on_gpu, on_gpu[1:]))
    critical_path = max(j.hours + sum(runs[n].end - runs[n].start for n in j.needs) for j in jobs)
    assert s.makespan >= max(s.gpu_hours / gpus, critical_path) - 1e-9
    # per split: 2 bases + 28 fine-tuned + 2 scratch unfrozen; per n: 4 frozen transfers + 2 random-frozen
    frozen_layers = [0] * 5 * 32 + [n for n in range(1, 8) for _ in range(5 * 6)]
    assert s.gpu_hours == pytest.approx(sim.estimate_gpu_hours(frozen_layers, base_hours=1.0))


@pytest.mark.parametrize("gpus", [8, 64])
def test_sharing_bases_beats_the_alternatives(gpus):
    jobs = sim.paper_grid(base_hours=1.0)
    dependency = sim.simulate(jobs, gpus)
    two_phase = sim.simulate(sim.two_phase(jobs), gpus)
    own_base = sim.simulate(sim.own_base(jobs), gpus)
    assert own_base.gpu_hours > dependency.gpu_hours
    assert own_base.gpu_hours - dependency.gpu_hours == pytest.approx(280 * 1.0)   # one base per transfer
    assert two_phase.gpu_hours == pytest.approx(dependency.gpu_hours)
    assert two_phase.makespan >= dependency.makespan
    assert own_base.makespan > dependency.makespan


def test_relative_cost_and_estimate():
    assert sim.relative_cost(0) == 1.0
    assert sim.relative_cost(7) == pytest.approx(0.367, abs=1e-3)
    assert sim.estimate_gpu_hours([0, 0, 7], base_hours=2.0) == pytest.approx(2.0 * (2 + 0.65 / 1.77))
    with pytest.raises(ValueError, match="frozen_layers=8"):
        sim.relative_cost(8)


def test_results_section_replaced_not_duplicated(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\n## Other section\nkeep me\n")
    jobs = sim.paper_grid()
    rows = sim.compare(jobs, [8])
    sim.write_results_section(path, sim.results_markdown(rows, jobs, sim.H100_BASE_HOURS, "cmd"))
    sim.write_results_section(path, sim.results_markdown(rows, jobs, sim.H100_BASE_HOURS, "cmd2"))
    text = path.read_text()
    assert text.count(sim.RESULTS_SECTION) == 1
    assert "keep me" in text and "`cmd2`" in text and "`cmd`" not in text
    assert "| 8 | dependency |" in text and "| 8 | own-base |" in text
