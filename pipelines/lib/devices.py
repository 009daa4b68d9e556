"""One device option for every stage that runs a model: `--device auto|cpu|cuda|cuda:N`.

- `cpu` / `cuda` / `cuda:N`: that device; `cuda` when the process sees no CUDA device is an error
  naming the stage (never a silent fall-back to the CPU).
- `auto` (the default): CUDA where the process has a GPU, else the CPU. Inside a Ray actor or
  worker that means "where Ray gave it a GPU": Ray hides every GPU from a task that reserved none
  (CUDA_VISIBLE_DEVICES=""), so an actor without a GPU resolves `auto` to the CPU.

Stages on Ray (segment's actors, train's and tune's workers) reserve one GPU per actor/worker
when the device is `cuda…`, or when it is `auto` and the cluster has GPUs. `--gpu` stays as an
alias of `--device cuda`.
"""
from __future__ import annotations

import argparse
import re

CHOICES = "auto, cpu, cuda or cuda:N"


class DeviceError(ValueError):
    pass


def add_argument(p: argparse.ArgumentParser, *, what: str = "the model") -> None:
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help=f"where {what} runs: {CHOICES} (default auto: CUDA where this process, actor or worker "
                        f"has a GPU)")
    p.add_argument("--gpu", dest="device", action="store_const", const="cuda", help="alias of --device cuda")


def check(flag: str, stage: str) -> str:
    """The flag if it names a device kind this project runs on; DeviceError naming the stage otherwise."""
    flag = str(flag).strip().lower()
    if flag in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", flag):
        return flag
    raise DeviceError(f"{stage}: --device {flag!r} is not a device this project runs on: choose {CHOICES}")


def reserves_gpu(flag: str, stage: str, *, joined: bool) -> bool:
    """Whether a stage on Ray reserves one GPU per actor/worker (call after Ray is initialised).
    `joined`: the stage joined a cluster (an autoscaler may add GPU nodes when asked) rather than
    starting a local instance, where asking for a GPU it does not have would wait forever."""
    flag = check(flag, stage)
    if flag == "cpu":
        return False
    import ray
    gpus = ray.cluster_resources().get("GPU", 0)
    if flag == "auto":
        return gpus > 0
    if gpus == 0:
        if not joined:
            raise DeviceError(f"{stage}: --device {flag}: the local Ray instance has no GPU (torch sees "
                              f"{_visible_cuda()} CUDA device(s)); use --device cpu or auto")
        print(f"{stage}: --device {flag}: the cluster has no GPU yet; waiting for the autoscaler to add one",
              flush=True)
    return True


def _visible_cuda() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve(flag: str, stage: str):
    """The torch.device to create tensors on, in the process that runs the model."""
    import torch
    flag = check(flag, stage)
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if flag.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"{stage}: --device {flag}: no CUDA device is visible to this process "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}; inside Ray, "
                              f"only actors/workers that reserved a GPU see one)")
        index = int(flag.split(":")[1]) if ":" in flag else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"{stage}: --device {flag}: this process sees {torch.cuda.device_count()} CUDA "
                              f"device(s)")
    return torch.device(flag)
