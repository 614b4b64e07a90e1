"""Optimizers: torch AdamW, bitsandbytes' 8-bit and paged (8- and 32-bit) AdamW, optionally over fp32 masters."""

from __future__ import annotations

import torch
from torch import nn

from qlora.config import ConfigError, RunConfig

# RunConfig.adamw_impl -> torch.optim.AdamW's arguments
ADAMW_IMPL = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}


def _inner(cfg: RunConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    lr = cfg.effective_lr
    if cfg.optimizer == "adamw":
        # weight_decay=0: decay on LoRA factors is not what the QLoRA recipe does, and it keeps methods comparable.
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **ADAMW_IMPL[cfg.adamw_impl])
    import bitsandbytes as bnb

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw32bit": bnb.optim.PagedAdamW32bit}[cfg.optimizer]
    return cls(params, lr=lr, weight_decay=0.0)


class MasterWeightOptimizer:
    """Mixed precision: the model keeps bf16 parameters, the optimizer updates fp32 master copies of them.

    Gradients arrive in bf16 on the model's parameters, are upcast onto the masters, and the updated masters are
    copied back. The masters are part of the optimizer's memory (DESIGN.md, category `optimizer`).
    """

    def __init__(self, cfg: RunConfig, params: list[nn.Parameter]):
        self.params = params
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in params]
        self.inner = _inner(cfg, self.masters)

    @property
    def state(self):
        return self.inner.state

    @property
    def param_groups(self):
        return self.inner.param_groups

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for p, m in zip(self.params, self.masters, strict=True):
            p.copy_(m)
            m.grad = None  # free the fp32 gradient copy at once

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_tensors(self) -> list[torch.Tensor]:
        return self.masters + optimizer_state_tensors(self.inner)


class InBackwardOptimizer:
    """The optimizer step in backward (RunConfig.optimizer_in_backward; torchtune's optimizer_in_bwd): one optimizer
    of the configured kind per trainable tensor, stepped by a post-accumulate-grad hook as soon as that tensor's
    gradient is complete, which then frees the gradient. No step ever holds every gradient; `step` and `zero_grad`
    are no-ops. `on_grad(p)`, when set (the memory ledger), sees each gradient just before its step."""

    def __init__(self, cfg: RunConfig, params: list[nn.Parameter]):
        self.params = params
        self.optimizers = [_inner(cfg, [p]) for p in params]
        self.on_grad = None
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(opt))
                       for p, opt in zip(params, self.optimizers, strict=True)]

    def _hook(self, opt):
        def step(p: torch.Tensor) -> None:  # must return None
            if self.on_grad is not None:
                self.on_grad(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:  # a backward that raised may have left some
            p.grad = None

    def remove(self) -> None:
        """Take the hooks off the parameters (another optimizer may follow this one on the same model)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def make_optimizer(cfg: RunConfig, model: nn.Module):
    """The optimizer cfg asks for over the model's trainable parameters. Raises ConfigError if unsupported here."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"method {cfg.method!r} left no trainable parameters in {cfg.model}")
    if cfg.optimizer != "adamw" and params[0].device.type not in ("cuda", "cpu", "xpu"):
        raise ConfigError(f"optimizer {cfg.optimizer} is not supported on device {params[0].device.type}")
    if cfg.optimizer_in_backward:
        return InBackwardOptimizer(cfg, params)
    if cfg.precision == "mixed":
        return MasterWeightOptimizer(cfg, params)
    return _inner(cfg, params)


def implementation(opt) -> str:
    """Which AdamW implementation a step of `opt` runs: "fused", "foreach" or "for-loop" for torch's AdamW (left to
    torch, it picks foreach on CUDA and the for-loop on CPU, and foreach allocates temporaries as large as all the
    parameters it updates: the peak depends on it), "bitsandbytes" for the 8-bit and paged ones."""
    inner = opt.inner if isinstance(opt, MasterWeightOptimizer) else opt
    if isinstance(opt, InBackwardOptimizer):
        inner = opt.optimizers[0]
    if not isinstance(inner, torch.optim.AdamW):
        return "bitsandbytes"
    if inner.defaults.get("fused"):
        return "fused"
    foreach = inner.defaults.get("foreach")
    if foreach is None:  # torch decides per step from the parameters' devices, as its own step() does
        from torch.optim.optimizer import _default_to_fused_or_foreach

        params = [p for g in inner.param_groups for p in g["params"]]
        foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]
    return "foreach" if foreach else "for-loop"


def optimizer_state_tensors(opt) -> list[torch.Tensor]:
    """Every tensor the optimizer holds as state (moments, 8-bit quantisation constants, fp32 masters)."""
    if isinstance(opt, MasterWeightOptimizer):
        return opt.state_tensors()
    if isinstance(opt, InBackwardOptimizer):
        return [t for inner in opt.optimizers for t in optimizer_state_tensors(inner)]
    out = []
    for state in opt.state.values():
        out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out
