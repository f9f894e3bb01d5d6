"""Where a process trains and predicts: ``training.device`` (``auto | cpu | cuda``) resolved
to a ``torch.device``, and the settings that keep CUDA training exact.

``auto`` picks CUDA when this process may use a GPU: torch sees one and, inside a Ray
worker, Ray granted it one (Ray's accelerator ids, handed in by the Ray side through
:func:`declare_ray_gpus`: this package never imports Ray). A process Ray gave no GPU
trains on CPU even on a GPU machine, so workers never share a GPU they did not reserve.
``cuda`` where no GPU can be used is a :class:`DeviceError` naming the setting and what to
change, raised before any training starts.

Exactness on CUDA (docs/gpu.md): a retrain equals the training from scratch bit for bit
only when every kernel is deterministic. :func:`configure_determinism` turns on
``torch.use_deterministic_algorithms(True)`` (an op without a deterministic CUDA kernel then
raises instead of silently differing), sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS
reads it when its handle is created, i.e. at the first matmul) and turns cuDNN's
autotuner off. Seeds are unchanged: initial weights are drawn on the CPU generator and
moved, batch orders come from numpy, so the same run seeds both devices the same way.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

DeviceSetting = Literal["auto", "cpu", "cuda"]
DEVICES = ("auto", "cpu", "cuda")
CUBLAS_WORKSPACE = ":4096:8"  # the value torch's reproducibility notes require for cuBLAS

# GPU ids Ray granted this process; None: not declared (no Ray, or a caller that did not
# say), then ``auto`` trusts torch alone.
_ray_gpus: list[str] | None = None


class DeviceError(ValueError):
    """``training.device`` asks for a device this process cannot use."""


def declare_ray_gpus(gpu_ids) -> None:
    """Record the GPU ids Ray assigned to this worker (``ray.get_runtime_context()
    .get_accelerator_ids()["GPU"]``; empty when it asked for none). Called by the Ray side
    (Train workers, shard actors, Serve replicas) before anything resolves a device."""
    global _ray_gpus
    _ray_gpus = [str(g) for g in gpu_ids]


def ray_gpus() -> list[str] | None:
    return None if _ray_gpus is None else list(_ray_gpus)


def cuda_usable() -> tuple[bool, str]:
    """(usable, why not): torch has CUDA and a device, and Ray (if it said) granted one."""
    if not torch.cuda.is_available():
        build = torch.version.cuda
        why = (
            f"torch {torch.__version__} is a CPU-only build"
            if build is None
            else f"torch {torch.__version__} (CUDA {build}) sees no GPU"
        )
        return False, why
    if _ray_gpus is not None and not _ray_gpus:
        return False, (
            "Ray gave this worker no GPU (set resources.gpus_per_worker, or "
            "serving.gpus_per_replica for serving, above 0)"
        )
    return True, ""


def resolve_device(setting: str = "auto") -> torch.device:
    """The device ``training.device`` names for this process; CUDA is set up exactly
    (:func:`configure_determinism`) before it is returned."""
    if setting not in DEVICES:
        raise DeviceError(f"training.device must be one of {', '.join(DEVICES)}; got {setting!r}")
    if setting == "cpu":
        return torch.device("cpu")
    usable, why = cuda_usable()
    if not usable:
        if setting == "cuda":
            raise DeviceError(
                f"training.device is 'cuda' but {why}; use training.device=auto (CUDA where "
                "a GPU is granted, else CPU) or cpu"
            )
        return torch.device("cpu")
    dev = torch.device("cuda", torch.cuda.current_device())
    configure_determinism(dev)
    return dev


def usable_device(setting: str = "auto") -> torch.device:
    """Where work that no exactness depends on runs: predictions (Serve replicas) and S3T's
    one-off backbone pre-training on the Train driver. CPU when ``training.device`` is
    ``cpu``, else what ``auto`` resolves to (a GPU this process may use, else the CPU):
    never an error, since a run trained on CUDA may serve from CPU-only replicas."""
    if setting not in DEVICES:
        raise DeviceError(f"training.device must be one of {', '.join(DEVICES)}; got {setting!r}")
    return resolve_device("cpu" if setting == "cpu" else "auto")


def configure_determinism(device: torch.device) -> None:
    """Deterministic kernels for ``device`` (a no-op for CPU, whose kernels are already
    deterministic for a fixed thread count). Idempotent."""
    if device.type != "cuda":
        return
    # Must precede cuBLAS's handle creation (the first matmul); setdefault keeps a value the
    # user chose (":16:8" is the other one torch accepts).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False  # the autotuner may pick different kernels per run
    # TF32 matmuls are deterministic but lose precision run to run of *settings*; keep fp32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def module_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (CPU for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict detached, contiguous and on the CPU: what checkpoints store, so a
    snapshot saved on one device loads on any."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
