"""What runs pipelines.lib.train_worker.train_loop: its rank and world size, its device, the
checkpoint it restores and where its reports (metrics and a checkpoint folder) go. `TrainSession`
is Ray Train's, on each worker of a group; `TrialSession` is one worker inside a Ray Tune trial's own
process (pipelines.tune, one worker per trial)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pipelines.lib import checkpoints as ckpt
from pipelines.lib import locations

if TYPE_CHECKING:
    from pipelines.lib.train_worker import TrainJob


class TrainSession:
    """What train_loop needs from what runs it, as Ray Train gives it to each worker of a group:
    rank and world size, the device, the checkpoint to restore, and where reports go."""

    def __init__(self):
        import ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self, gpu: bool) -> torch.device:
        import ray.train.torch
        return ray.train.torch.get_device() if gpu else torch.device("cpu")

    def registered(self, job: TrainJob) -> str | None:
        """The location of the checkpoint Ray Train restores this attempt from, if any."""
        import ray.train
        found = ray.train.get_checkpoint()
        if found is None:
            return None
        return locations.from_fs_path(job.run_uri or "", found.path) if job.run_uri else found.path

    def report(self, job: TrainJob, metrics: dict, folder: str, name: str) -> None:
        """Ray Train copies `folder` into the run's storage as `name` and keeps the newest few."""
        import ray.train
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)


class TrialSession:
    """One worker in the process of a Ray Tune trial (pipelines.tune, one worker per trial): no Ray
    Train group, so no controller and worker processes to start per trial. Checkpoints go straight
    to the trial's run folder (the newest `keep` stay), metrics to Tune; a restarted trial resumes
    from the newest complete checkpoint there."""
    rank, world = 0, 1

    def __init__(self, keep: int = 1):
        self.keep = keep

    def device(self, gpu: bool) -> torch.device:
        return torch.device("cuda") if gpu else torch.device("cpu")   # Ray set CUDA_VISIBLE_DEVICES

    def registered(self, job: TrainJob) -> str | None:
        return None

    def report(self, job: TrainJob, metrics: dict, folder: str, name: str) -> None:
        from ray import tune
        target = locations.join(job.run_uri, name)
        locations.upload(folder, target)
        for old in ckpt.candidates(job.run_uri)[self.keep:]:
            locations.delete(old)
        tune.report({**metrics, "checkpoint_path": target})
