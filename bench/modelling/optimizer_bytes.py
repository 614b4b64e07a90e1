"""Optimizer memory in the analytical model (bench.modelling.estimate): the state an optimizer holds between steps,
and the temporaries of its step, by optimizer and AdamW implementation (`st`: estimate.Static, the trainable
tensors). Sources as in estimate.py: [bnb] bitsandbytes
0.50's layouts, [torch] torch's AdamW implementations, [ledger] this project's measurements.
"""

from __future__ import annotations

import math

from qlora.config import RunConfig


def optimizer_state(cfg: RunConfig, st, device_type: str) -> int:
    """AdamW moments (+ fp32 masters under mixed) or bitsandbytes' 8-bit or paged 32-bit state, for the trainable
    tensors. [bnb] 32-bit optimizers keep both moments in fp32 whatever the parameters' dtype."""
    n = sum(st.trainable)
    # AdamW keeps an fp32 step counter per tensor: on the CPU (so device memory only on a CPU run), except fused
    # AdamW's, which live on the parameters' device
    on_device = device_type == "cpu" or (cfg.optimizer == "adamw" and adamw_impl(cfg, device_type) == "fused")
    steps = 4 * len(st.trainable) if on_device else 0
    master = 4 * n if cfg.precision == "mixed" else 0
    if cfg.optimizer == "adamw":
        return 2 * st.moment_bytes(cfg) * n + master + steps
    if cfg.optimizer == "paged_adamw32bit":
        return 2 * 4 * n + master
    eight = sum(2 * k + 2 * 4 * math.ceil(k / 256) if k >= 4096 else 8 * k for k in st.trainable)
    # each optimizer holds its own quantile maps, made for its first tensor of 4096 elements or more
    optimizers = sum(k >= 4096 for k in st.trainable) if cfg.optimizer_in_backward else 1
    return eight + 2 * 256 * 4 * optimizers + master


def adamw_impl(cfg: RunConfig, device_type: str) -> str:
    """The AdamW implementation a step runs: the config's, or torch's default for the device (for-loop on CPU,
    foreach on CUDA; qlora.optim.implementation reads the same off a real optimizer)."""
    if cfg.adamw_impl != "default":
        return cfg.adamw_impl
    return "for-loop" if device_type == "cpu" else "foreach"


def optimizer_temporaries(cfg: RunConfig, st, device_type: str) -> int:
    """[torch][ledger] Temporaries of the optimizer step, by AdamW implementation: the for-loop holds two the size of
    the largest trainable tensor, foreach one copy of all of them, fused none (it updates in place). These are bytes,
    not device behaviour: the ledger measures them on CPU (tests/test_estimate.py). Mixed precision first upcasts
    every gradient to fp32 for the masters. bitsandbytes' 8-bit step works in place."""
    n = sum(st.trainable)
    moment = st.moment_bytes(cfg)
    extra = 4 * n if cfg.precision == "mixed" else 0
    if cfg.optimizer != "adamw":
        return extra
    scratch = {"for-loop": 2 * max(st.trainable) * moment, "foreach": n * moment, "fused": 0}
    return extra + scratch[adamw_impl(cfg, device_type)]
