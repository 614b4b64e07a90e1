"""DeepSpeed's own ZeRO memory estimators, set beside ours for comparison where deepspeed imports (optional: it is
not a dependency; `pip install --no-build-isolation deepspeed==0.19.8` with its requirements imports on a CPU).

What they count (deepspeed/runtime/zero/stage3.py and stage_1_and_2.py, `estimate_zero{2,3}_model_states_mem_needs`
with no offload): model states only, per GPU, for mixed-precision Adam, 18 bytes per parameter over the GPUs
(16-bit and 32-bit gradients, 32-bit master parameters, two 32-bit moments) plus, for ZeRO-2, every 16-bit
parameter (2 bytes each, unsharded) and, for ZeRO-3, four bytes per parameter of the largest layer. They take a
parameter count: every parameter counts as trained (frozen LoRA bases too, DeepSpeed #5304), there are no
activations, no gathered units beyond that layer, no temporaries, and a 4-bit model's packed storage would be
counted as parameters. We pass the model's parameter count and its largest tensor's (the embedding or lm_head).
"""

from __future__ import annotations


def zero_model_states(arch, world_size: int) -> dict | None:
    """DeepSpeed's per-GPU model-state bytes for ZeRO-2 and ZeRO-3 on `world_size` GPUs of one node, or None where
    deepspeed does not import."""
    try:
        import deepspeed
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except Exception:  # noqa: BLE001 - not installed, or its import fails on this machine: no comparison
        return None
    total, largest = sum(arch.param_numels), max(arch.param_numels)
    zero3 = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=world_size, num_nodes=1,
                                                  cpu_offload=False, cpu_offload_params=False)[1]  # (cpu, gpu, layer)
    _, zero2 = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=world_size, num_nodes=1,
                                                     cpu_offload=False)
    return {"version": deepspeed.__version__, "zero2_bytes": zero2, "zero3_bytes": zero3, "parameters": total,
            "largest_layer_parameters": largest}
