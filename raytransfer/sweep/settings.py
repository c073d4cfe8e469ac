"""How a sweep's jobs run, as typed settings: the runner builds them from the command line (argparse stops
there), and Ray's start-up, the trial plan, the storage checks, the Tuner and each trial read them.

None of it is part of a job's key: the same jobs run one net a trial or sixteen, on one GPU or under DDP.

    run = RunSettings.from_args(args, storage)      # the driver's
    trial = TrialSettings(storage, "process", ...)  # what every trial is told (Tune's constants)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class RunSettings:
    """The driver's settings of how jobs run."""
    storage: str                              # job store, weights, Tune's state: a path or s3://...
    address: str | None = None                # a cluster to join (None: start a local Ray)
    num_cpus: int | None = None               # CPUs of a local Ray (None: all)
    dashboard: bool = True                    # start the dashboard (local Ray)
    gpus_per_trial: float | None = None       # per worker (None: 1 where the cluster has GPUs, else 0)
    workers_per_trial: int = 1                # Ray Train DDP workers of a trial
    cpus_per_trial: float | None = None       # per worker (None: from the node types)
    host: str = "auto"                        # process | train | auto
    max_failures: int = 2                     # retries of a trial after its first attempt
    checkpoint_minutes: float = 10.0          # training minutes between a trial's checkpoints
    max_concurrent: int | None = None         # most trials at once (None: what the cluster holds)
    cohort_size: int | None = None            # most jobs a trial trains from one stream (None: no cap)
    resume: bool = False                      # continue the interrupted sweep (Tuner.restore)

    @classmethod
    def from_args(cls, args, storage: str) -> "RunSettings":
        return cls(storage, address=args.address, num_cpus=args.num_cpus, dashboard=not args.no_dashboard,
                   gpus_per_trial=args.gpus_per_trial, workers_per_trial=args.workers_per_trial,
                   cpus_per_trial=args.cpus_per_trial, host=args.host, max_failures=args.max_failures,
                   checkpoint_minutes=args.checkpoint_minutes, max_concurrent=args.max_concurrent,
                   cohort_size=args.cohort_size or None, resume=args.resume)

    def with_cpus(self, cpus_per_trial: float) -> "RunSettings":
        return replace(self, cpus_per_trial=cpus_per_trial)


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a sweep is told (Tune's constants, as a plain dict: `to_config`)."""
    storage: str
    host: str                                 # "process": the trial's own process; "train": Ray Train workers
    cpus_per_trial: float
    gpus_per_trial: float                     # per worker
    workers_per_trial: int
    checkpoint_minutes: float
    registry: str                             # the weights registry actor's name

    def to_config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> "TrialSettings":
        return cls(**config["trial"])
