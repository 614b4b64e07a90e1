"""GPU catalog and fit planning: does an estimated (or measured) peak fit on a card, and how far can it be pushed.

Capacities are the totals `nvidia-smi` reports for each card (MiB). What a training process can use is less:
- the CUDA context (driver, kernels, cuBLAS workspace) takes about 0.5 GiB that no tensor accounting sees;
- the caching allocator rounds blocks and fragments, so reserved memory runs ahead of live tensors; we keep 5% of
  the peak in reserve.
Both are assumptions, not measurements: no GPU record exists yet. A CUDA record carries what calibrates them
(`cuda_total_bytes` and `cuda_free_step_start` from mem_get_info, `nvml_process_used` less `cuda_max_reserved` for
the context, `cuda_max_reserved` over `cuda_max_allocated` for the reserve); `python -m bench.running.gpu_smoke`
reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.schema import MiB
from qlora.config import ConfigError

CUDA_CONTEXT_BYTES = 512 * MiB
ALLOCATOR_RESERVE = 0.05


@dataclass(frozen=True)
class GPU:
    name: str
    label: str
    total_bytes: int


CATALOG = {g.name: g for g in (
    GPU("a100-40gb", "NVIDIA A100 40GB", 40_960 * MiB),
    GPU("a100-80gb", "NVIDIA A100 80GB", 81_920 * MiB),
    GPU("h100-80gb", "NVIDIA H100 80GB", 81_559 * MiB),
    GPU("h200", "NVIDIA H200 141GB", 143_771 * MiB),
    GPU("rtx4090", "NVIDIA GeForce RTX 4090 24GB", 24_564 * MiB),
    GPU("rtx3090", "NVIDIA GeForce RTX 3090 24GB", 24_576 * MiB),
    GPU("l4", "NVIDIA L4 24GB", 23_034 * MiB),
    GPU("a10g", "NVIDIA A10G 24GB", 23_028 * MiB),
    GPU("t4", "NVIDIA T4 16GB", 15_360 * MiB),
)}


def lookup(name: str) -> GPU:
    """The catalog entry for `name` (case-insensitive), or `this`: the card this machine has, with the capacity
    CUDA reports for it. Raises ConfigError naming the unknown value."""
    key = name.strip().lower()
    if key == "this" or key.startswith("this:"):
        index = key.partition(":")[2] or "0"
        if not index.isdigit():
            raise ConfigError(f"--gpu {name!r}: this or this:N, with N a CUDA device index")
        return this_device(int(index))
    if key not in CATALOG:
        raise ConfigError(f"unknown GPU {name!r}; known: {', '.join(CATALOG)}, or this (the card here)")
    return CATALOG[key]


def this_device(index: int = 0) -> GPU:
    """CUDA device `index` as a catalog entry whose capacity is what CUDA itself reports (mem_get_info's total),
    not a marketing figure. Raises ConfigError without CUDA."""
    import torch

    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise ConfigError(f"--gpu this{f':{index}' if index else ''}: no such CUDA device on this machine")
    _, total = torch.cuda.mem_get_info(index)
    return GPU("this", torch.cuda.get_device_name(index), int(total))


def needed(peak_bytes: int) -> int:
    """Device memory a run with this tensor peak needs: peak, allocator reserve, CUDA context."""
    return int(peak_bytes * (1 + ALLOCATOR_RESERVE)) + CUDA_CONTEXT_BYTES


def headroom(gpu: GPU, peak_bytes: int) -> int:
    """Bytes left on the card (negative: short by that much)."""
    return gpu.total_bytes - needed(peak_bytes)


def on_card(gpu: GPU, peak_bytes: int) -> dict:
    """A run with this tensor peak on `gpu`: headroom (negative: short by that much), how many such cards its
    memory needs when the state is sharded across them, and how many such runs fit side by side on one."""
    return {"headroom_bytes": headroom(gpu, peak_bytes), "cards_needed": -(-needed(peak_bytes) // gpu.total_bytes),
            "trials": trials(gpu, peak_bytes)}


def trials(gpu: GPU, peak_bytes: int) -> int:
    """How many such runs fit side by side on one card, each with its own CUDA context (separate processes)."""
    return max(0, gpu.total_bytes // needed(peak_bytes))
