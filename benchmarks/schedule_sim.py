"""Scheduling the full paper grid on K GPUs, simulated: why transfers wait only for their own base.

The paper's grid (4 random splits + the dissimilar split) is ~370 jobs, and 280 of them need a base
net trained first. This script compares three ways of running it, one job per GPU:

  dependency  our scheduler: any job whose bases are done may start on a free GPU; bases first,
              then longest-first among ready jobs (a list scheduler).
  two-phase   all bases, a barrier, then everything else longest-first (what a plain grid of two
              `Tuner.fit()` calls does); a variant runs the base-free controls before the barrier.
  own-base    no sharing: every transfer trains its own base first (duration = base + transfer).

Durations come from the paper's K20 logs (paper/README.md §5): an all-trainable step costs 1.77 s,
a step with n frozen layers 1.48 1.19 1.01 0.83 0.69 0.66 0.65 s (n = 1..7), 450k iterations each.
Fine-tuned (+) and scratch nets cost a base; random-frozen costs a frozen net of the same n. Test
passes (≈7% of a base on the K20) are left out. Hours are given in hours of one H100, where a base
is ≈80 min (DESIGN.md, "Speed facts"); the ratios between jobs stay the paper's.

Run: python benchmarks/schedule_sim.py            (prints the table, rewrites its RESULTS.md section)
     python benchmarks/schedule_sim.py --gpus 8 16 64 --no-write
"""
import argparse
import datetime
import heapq
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from raytransfer.step_costs import K20_S_PER_ITER as PAPER_STEP_S, relative_cost   # the paper's K20 step costs

PAPER_ITERATIONS = 450_000
K20_BASE_HOURS = PAPER_STEP_S[0] * PAPER_ITERATIONS / 3600   # ≈221 h ≈ 9.2 days of training
H100_BASE_HOURS = 80 / 60                                    # DESIGN.md: one paper-schedule net ≈80 min
PAPER_SPLITS = ("similar-s0", "similar-s1", "similar-s2", "similar-s3", "dissimilar")
RESULTS_SECTION = "## Scheduling at scale (simulated)"
DEFAULT_RESULTS = Path(__file__).with_name("RESULTS.md")


def estimate_gpu_hours(frozen_layers: Iterable[int], base_hours: float = H100_BASE_HOURS) -> float:
    """Busy GPU-hours of a set of jobs, one entry per job: its number of frozen layers (0 if none).

    This is what a sweep's --dry-run can print: it does not depend on the scheduler as long as no
    base is trained twice.
    """
    return base_hours * sum(relative_cost(n) for n in frozen_layers)


@dataclass(frozen=True)
class Job:
    name: str
    hours: float
    needs: tuple[str, ...] = ()   # names of the jobs that must finish before this one starts
    is_base: bool = False         # bases go first: every transfer waits on one


@dataclass(frozen=True)
class Run:
    name: str
    gpu: int
    start: float
    end: float


@dataclass
class Schedule:
    gpus: int
    runs: list[Run] = field(default_factory=list)

    @property
    def makespan(self) -> float:
        return max((r.end for r in self.runs), default=0.0)

    @property
    def gpu_hours(self) -> float:
        """Busy GPU-hours: the sum of the job durations."""
        return sum(r.end - r.start for r in self.runs)

    @property
    def reserved_gpu_hours(self) -> float:
        """What a fixed cluster of `gpus` GPUs costs for the whole makespan."""
        return self.gpus * self.makespan


def paper_grid(base_hours: float = H100_BASE_HOURS, splits: Iterable[str] = PAPER_SPLITS) -> list[Job]:
    """The full paper grid: per split 2 bases, 56 transfers (AnB, BnB, AnB+, BnB+ and their mirror
    images for n = 1..7), 14 random-frozen and 2 scratch controls. Names read like
    'similar-s0/AnB+/n3'; the mirror of AnB (target A) is 'BnA'."""
    jobs = []
    for split in splits:
        for half in ("A", "B"):
            jobs.append(Job(f"{split}/base{half}", base_hours, is_base=True))
        for target, source in (("B", "A"), ("A", "B")):
            for n in range(1, 8):
                for frozen in (True, False):
                    hours = base_hours * relative_cost(n if frozen else 0)
                    plus = "" if frozen else "+"
                    for origin in (source, target):   # transfer (AnB), then selffer (BnB)
                        jobs.append(Job(f"{split}/{origin}n{target}{plus}/n{n}", hours,
                                        needs=(f"{split}/base{origin}",)))
        for half in ("A", "B"):
            for n in range(1, 8):
                jobs.append(Job(f"{split}/random_frozen{half}/n{n}", base_hours * relative_cost(n)))
            jobs.append(Job(f"{split}/scratch{half}", base_hours))
    return jobs


def two_phase(jobs: list[Job], controls_in_phase_one: bool = False) -> list[Job]:
    """The same jobs behind a barrier: every non-base job waits for every base, or, with
    controls_in_phase_one, only the jobs that need a base (controls then fill GPUs in phase one)."""
    bases = tuple(j.name for j in jobs if j.is_base)
    waits = [not j.is_base and (bool(j.needs) or not controls_in_phase_one) for j in jobs]
    return [replace(j, needs=bases) if wait else j for j, wait in zip(jobs, waits)]


def own_base(jobs: list[Job]) -> list[Job]:
    """No sharing: a job that needs bases trains them itself first (the base jobs still run too)."""
    hours = {j.name: j.hours for j in jobs}
    return [replace(j, hours=j.hours + sum(hours[n] for n in j.needs), needs=()) for j in jobs]


def _priority(job: Job) -> tuple:
    return (not job.is_base, -job.hours, job.name)   # bases first, then longest first; names break ties


def simulate(jobs: list[Job], gpus: int) -> Schedule:
    """List-schedule `jobs` on `gpus` GPUs, one job per GPU, with an event queue (deterministic).

    Whenever GPUs are free, the ready job with the best priority starts on the lowest-numbered free
    GPU. Jobs finishing at the same instant are all retired before anything new starts.
    """
    if gpus < 1:
        raise ValueError(f"gpus={gpus!r}: must be a positive integer")
    by_name = {}
    for job in jobs:
        if job.name in by_name:
            raise ValueError(f"duplicate job name {job.name!r}: every job needs a unique name")
        by_name[job.name] = job
    waiting_on = {j.name: set(j.needs) for j in jobs}
    dependents: dict[str, list[str]] = {name: [] for name in by_name}
    for job in jobs:
        for need in job.needs:
            if need not in by_name:
                raise ValueError(f"job {job.name!r} needs {need!r}, which is not in the grid; "
                                 "add that job or drop the dependency")
            dependents[need].append(job.name)

    ready = [(_priority(j), j.name) for j in jobs if not j.needs]
    heapq.heapify(ready)
    free = list(range(gpus))
    running: list[tuple[float, int, str, float]] = []   # (end, gpu, name, start)
    schedule = Schedule(gpus)
    now = 0.0
    while True:
        while free and ready:
            _, name = heapq.heappop(ready)
            heapq.heappush(running, (now + by_name[name].hours, heapq.heappop(free), name, now))
        if not running:
            break
        now = running[0][0]
        while running and running[0][0] == now:
            end, gpu, name, start = heapq.heappop(running)
            schedule.runs.append(Run(name, gpu, start, end))
            heapq.heappush(free, gpu)
            for dependent in dependents[name]:
                waiting_on[dependent].discard(name)
                if not waiting_on[dependent]:
                    heapq.heappush(ready, (_priority(by_name[dependent]), dependent))
    if len(schedule.runs) != len(jobs):
        stuck = sorted(set(by_name) - {r.name for r in schedule.runs})
        raise ValueError(f"{len(stuck)} jobs never became ready (a dependency cycle?): {stuck[:5]}")
    return schedule


def compare(jobs: list[Job], gpu_counts: Iterable[int]) -> list[dict]:
    """One row per (K, scheduler): makespan, busy and reserved GPU-hours, ratios to dependency."""
    rows = []
    for gpus in gpu_counts:
        schedules = {"dependency": simulate(jobs, gpus),
                     "two-phase": simulate(two_phase(jobs), gpus),
                     "two-phase, controls in phase 1": simulate(two_phase(jobs, True), gpus),
                     "own-base": simulate(own_base(jobs), gpus)}
        reference = schedules["dependency"]
        for scheduler, s in schedules.items():
            rows.append(dict(gpus=gpus, scheduler=scheduler, makespan_h=s.makespan,
                             gpu_hours=s.gpu_hours, reserved_gpu_hours=s.reserved_gpu_hours,
                             utilisation=s.gpu_hours / s.reserved_gpu_hours,
                             makespan_ratio=s.makespan / reference.makespan,
                             gpu_hours_ratio=s.gpu_hours / reference.gpu_hours))
    return rows


def results_markdown(rows: list[dict], jobs: list[Job], base_hours: float, command: str) -> str:
    """The RESULTS.md section: date, duration model, command, table."""
    n_bases = sum(j.is_base for j in jobs)
    n_dependent = sum(bool(j.needs) for j in jobs)
    ratios = " ".join(f"{relative_cost(n):.3f}" for n in range(1, 8))
    lines = [
        RESULTS_SECTION,
        "",
        f"Date: {datetime.date.today().isoformat()}. Command: `{command}`. Simulated, not measured: "
        "an event-driven list scheduler (`benchmarks/schedule_sim.py`), one job per GPU, no start-up "
        "or data-staging time, no failures.",
        "",
        f"Grid: {len(jobs)} jobs = {len(PAPER_SPLITS)} splits × (2 bases; AnB, BnB, AnB+, BnB+ and "
        f"mirrors for n = 1..7; random-frozen n = 1..7 and scratch for both halves); {n_bases} bases, "
        f"{n_dependent} jobs that need a base.",
        "",
        f"Durations: from the paper's K20 step costs (1.77 s/iter all-trainable; frozen n = 1..7 costs "
        f"{ratios} of a base), 450k iterations, test passes left out. Fine-tuned (+) and scratch = a "
        f"base; random-frozen = frozen of the same n. Hours below are hours of one H100 with a base = "
        f"{base_hours * 60:.0f} min (DESIGN.md); multiply by {K20_BASE_HOURS / base_hours:.0f} for K20 "
        f"hours (a base = {K20_BASE_HOURS:.0f} K20 hours).",
        "",
        "Schedulers: **dependency** starts any job whose base is done on a free GPU (bases first, then "
        "longest first); **two-phase** trains all bases, waits at a barrier, then runs everything else "
        "longest first; **two-phase, controls in phase 1** lets the random-frozen and scratch controls "
        "(which need no base) run beside the bases; **own-base** shares nothing: every transfer trains "
        "its own base first (duration = base + transfer; the 10 base jobs still run).",
        "",
        "Reading: sharing each base among its 28 transfers halves the GPU-hours (own-base ≈ 2×). The "
        "barrier costs time only through GPUs left idle while the bases train: 10 bases on 64 GPUs "
        "leave 54 idle for a base's duration unless other work fills them. Here every base has the "
        "same length and starts at t = 0, and the 80 controls are enough to fill the idle GPUs, so a "
        "barrier with the controls moved into phase 1 ties the dependency scheduler. The dependency "
        "scheduler pulls ahead when that is not so: bases that finish at different times (retried or "
        "preempted bases, a grid extended while it runs, bases of different lengths) or too little "
        "base-free work. This simulation models neither.",
        "",
        "| GPUs | scheduler | makespan (h) | busy GPU-h | reserved GPU-h (K × makespan) | utilisation "
        "| makespan / dependency | busy GPU-h / dependency |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['scheduler']} | {r['makespan_h']:.1f} | {r['gpu_hours']:.0f} "
                     f"| {r['reserved_gpu_hours']:.0f} | {r['utilisation']:.1%} "
                     f"| {r['makespan_ratio']:.2f} | {r['gpu_hours_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def write_results_section(path: Path, section: str) -> None:
    """Replace this script's section of RESULTS.md (or append it), leaving other sections alone."""
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(rf"^{re.escape(RESULTS_SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64], help="cluster sizes K to compare")
    parser.add_argument("--base-hours", type=float, default=H100_BASE_HOURS,
                        help="hours of one base net on one GPU (default: 80 min, one H100)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="RESULTS.md to update")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.base_hours <= 0:
        parser.error(f"--base-hours={args.base_hours}: must be positive")

    jobs = paper_grid(args.base_hours)
    command = "python benchmarks/schedule_sim.py" + (" " + " ".join(argv) if argv else "")
    section = results_markdown(compare(jobs, args.gpus), jobs, args.base_hours, command)
    print(section)
    if not args.no_write:
        write_results_section(args.results, section)
        print(f"wrote section {RESULTS_SECTION!r} of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
