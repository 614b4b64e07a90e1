"""A live-tensor ledger: every storage created and freed during a training step, the peak, and what it held.

A `TorchDispatchMode` sees every op's outputs; each new storage gets a record, and a weakref finaliser on its
`UntypedStorage` (whose identity is stable across views) fires when the memory is really freed, autograd's saved
tensors included. At the peak the live records are sorted into DESIGN.md's categories, which sum to `peak`.

Sharded training (FSDP2): a DTensor is a wrapper whose memory is its local shard, so the ledger follows the local
tensor; FSDP frees and re-allocates the unsharded (gathered) parameters by resizing their storages in place
(`UntypedStorage.resize_`), which no op reports, so while a ledger is active `resize_` is watched: a storage resized
ends its record and, at a new size above zero, starts another. Storages named in `gathered` (the sharding wrapper's
all-gather buffers) are parameters: category `weights`, and reported apart as `gathered_bytes`.

Blind spots (cross-check with the device probes): memory allocated inside a kernel or custom op (bitsandbytes'
gemm_4bit dequantises a whole weight internally; gloo's own staging buffers), and tensors not produced by an op (a
few tiny scalars). Under a Python dispatch mode `torch.compile` runs eager code. bitsandbytes' paged optimizer state is
CUDA managed memory that torch sees as CPU tensors (`is_paged`): on CUDA the ledger counts it under `optimizer` and
reports it apart (`paged_bytes`), since torch's allocator figures never include it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench.schema import CATEGORIES, STATIC, GiB
from qlora import quantize
from qlora.optim import optimizer_state_tensors

TIMELINE_POINTS = 300


class BudgetExceeded(MemoryError):
    """Live tensors went over the budget a run was given (`--budget-gib`): an out-of-memory at that capacity."""

    def __init__(self, live: int, budget: int):
        super().__init__(f"live tensors reached {live / GiB:.4g} GiB, over the budget of {budget / GiB:.4g} GiB")
        self.live, self.budget = live, budget


@dataclass
class Rec:
    """One storage's life: bytes, when it was born and died (event numbers), and what it turned out to be."""

    nbytes: int
    born: int
    died: int | None = None
    tag: str | None = None  # a static category, once the tensor is known to be one
    saved: bool = False  # kept by autograd for backward
    paged: bool = False  # CUDA managed memory (bitsandbytes' paged optimizer state), which the allocator never sees
    recomputed: bool = False  # created by activation checkpointing's recomputation during backward
    gathered: bool = False  # an all-gathered (unsharded) parameter buffer of a sharded model

    @property
    def category(self) -> str:
        if self.tag is not None:
            return self.tag
        if self.saved or self.recomputed:
            return "activations"
        return "other"


def _paged(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and bool(getattr(t, "is_paged", False))


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage holds t's memory: a DTensor's local shard (its own storage is a global-sized
    wrapper that holds nothing), else t."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t


def static_tensors(model: nn.Module, optimizer=None) -> dict[str, list[torch.Tensor]]:
    """The tensors of each static category, from the model and optimizer as they are now."""
    out: dict[str, list[torch.Tensor]] = {c: [] for c in STATIC}
    for name, p in model.named_parameters():
        out["adapter" if "lora_" in name else "weights"].append(p)
        if p.grad is not None:
            out["gradients"].append(p.grad)
    out["weights"] += list(model.buffers())
    for m in quantize.linear4bit_modules(model).values():
        out["quant_state"] += quantize.quant_state_tensors(m)
    if optimizer is not None:
        out["optimizer"] += optimizer_state_tensors(optimizer)
    return out


class Ledger(TorchDispatchMode):
    """Follows storages on one device through a step. Use as a context manager around the step; call `tag()` after
    backward and after the optimizer step so gradients and new optimizer state are known, and `phase()` as the
    step moves on. Results: `peak`, `categories()`, `peak_at`, `timeline()`."""

    def __init__(self, model: nn.Module, optimizer, device: torch.device | str, budget: int | None = None,
                 gathered=()):
        super().__init__()
        self.gathered = {id(st) for st in gathered}  # storages of the sharding wrapper's unsharded parameters
        self.budget = budget
        self.model, self.optimizer = model, optimizer
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.records: dict[int, Rec] = {}  # live, by storage identity
        self.all: list[Rec] = []
        self.events = 0
        self.current = 0
        self.peak = 0
        self.peak_live: list[Rec] = []
        self.peak_at: dict = {}
        self._dirty = False
        self.phases: list[tuple[int, str]] = []
        self._phase = "start"
        self._modules: list[str] = []
        self._op = None  # the op running now (an OpOverload: named only at a new peak, str() costs on every op)
        self._names = {id(m): n or "model" for n, m in model.named_modules()}
        self._hooks = []
        self._finalizers: list[weakref.finalize] = []
        self._watched: set[int] = set()  # storage ids with a finaliser
        self._resize = None

    # ---- what is live --------------------------------------------------------------------------------------
    def _follows(self, t) -> bool:
        """Whether t's memory is this device's: its own tensors, and on CUDA bitsandbytes' paged optimizer state,
        which is CUDA managed memory that torch sees as a CPU tensor flagged `is_paged`."""
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return False
        return t.device == self.device or (self.device.type == "cuda" and _paged(t))

    def _track(self, t: torch.Tensor, tag: str | None = None) -> Rec | None:
        t = _local(t)
        if not self._follows(t):
            return None
        st = t.untyped_storage()
        rec = self.records.get(id(st))
        if rec is None:
            rec = self._born(st, paged=t.device != self.device)
        if tag is not None and rec.tag is None:
            rec.tag = tag
        return rec

    def _born(self, st, paged: bool = False, like: Rec | None = None) -> Rec:
        """A new record for storage `st` (`like`: the record it replaces after a resize, whose kind it keeps)."""
        key = id(st)
        self.events += 1
        gathered = key in self.gathered
        rec = Rec(st.nbytes(), self.events, recomputed=self._in_recompute(), paged=paged, gathered=gathered,
                  tag="weights" if gathered else None)
        if like is not None:
            rec.tag, rec.saved, rec.paged = like.tag, like.saved, like.paged
        self.records[key] = rec
        self.all.append(rec)
        if key not in self._watched:
            self._watched.add(key)
            self._finalizers.append(weakref.finalize(st, self._gone, key))
        self.current += rec.nbytes
        if self.budget is not None and self.current > self.budget:
            raise BudgetExceeded(self.current, self.budget)
        if self.current > self.peak:
            self.peak = self.current
            self._dirty = True
            node = torch._C._current_autograd_node()  # in backward: the gradient function running now
            self.peak_at = {"phase": self._phase, "module": self._modules[-1] if self._modules else None,
                            "op": None if self._op is None else str(self._op),
                            "grad_fn": node.name() if node is not None else None,
                            "event": self.events}
        return rec

    def _resized(self, st) -> None:
        """After `st.resize_(n)`: the old size's record ends, a new one starts at n bytes (none at 0)."""
        key = id(st)
        old = self.records.get(key)
        if old is not None and old.nbytes == st.nbytes():
            return
        if old is not None:
            self._freed(key)
        if st.nbytes() > 0 and st.device == self.device:
            self._born(st, like=old)

    def _gone(self, key: int) -> None:
        """A followed storage was freed (its id may now be reused by another)."""
        self._watched.discard(key)
        self._freed(key)

    def _freed(self, key: int) -> None:
        rec = self.records.pop(key, None)
        if rec is None:
            return
        if self._dirty:  # the first free after a new maximum: what is live now is what was live at the peak
            self.peak_live = list(self.records.values()) + [rec]
            self._dirty = False
        self.events += 1
        rec.died = self.events
        self.current -= rec.nbytes

    def tag(self) -> None:
        """Register the model's and optimizer's tensors as they are now (weights, grads, optimizer state)."""
        for category, tensors in static_tensors(self.model, self.optimizer).items():
            for t in tensors:
                self._track(t, category)

    def phase(self, name: str) -> None:
        if name in ("optimizer", "end"):
            self.tag()  # gradients exist now; optimizer state after the step
        self.phases.append((self.events, name))
        self._phase = name

    def _in_recompute(self) -> bool:
        return self._phase == "backward" and bool(self._modules)

    # ---- dispatch and hooks --------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._op = func
        if isinstance(out, torch.Tensor):  # most ops: skip flattening
            self._track(out)
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _enter_module(self, module, args) -> None:
        name = self._names.get(id(module))
        if name is not None:  # the hooks are global: modules outside the model are not on the stack
            self._modules.append(name)

    def _leave_module(self, module, args, output) -> None:  # must return None, or it replaces the output
        if id(module) in self._names:
            self._modules.pop()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        rec = self._track(t)
        if rec is not None:
            rec.saved = True
        return t

    def __enter__(self):
        self.tag()
        self.start_bytes = self.current  # live at the start: the model, optimizer state, leftover grads
        self.phases.append((self.events, "start"))
        # Two global hooks, not two per module: registering ~200 hooks each step cost more than the bookkeeping.
        # always_call: checkpointing stops a recomputation early by raising inside forward; the stack must pop
        self._hooks = [register_module_forward_pre_hook(self._enter_module),
                       register_module_forward_hook(self._leave_module, always_call=True)]
        self._saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saved.__enter__()
        resize, ledger = torch.UntypedStorage.resize_, self

        def watched_resize(st, size):  # FSDP frees and re-gathers parameters this way; no op reports it
            out = resize(st, size)
            ledger._resized(st)
            return out

        self._resize = resize
        torch.UntypedStorage.resize_ = watched_resize
        if hasattr(self.optimizer, "on_grad"):  # the step in backward frees each gradient before `tag` could see it
            self.optimizer.on_grad = self._gradient
        return super().__enter__()

    def _gradient(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._track(p.grad, "gradients")

    def __exit__(self, *exc):
        super().__exit__(*exc)
        torch.UntypedStorage.resize_ = self._resize
        if hasattr(self.optimizer, "on_grad"):
            self.optimizer.on_grad = None
        self._saved.__exit__(*exc)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.tag()
        if self._dirty:
            self.peak_live = list(self.records.values())
            self._dirty = False
        for f in self._finalizers:  # stop following: the model's storages outlive this ledger
            f.detach()
        self._finalizers.clear()

    # ---- results ----------------------------------------------------------------------------------------------
    def categories(self) -> dict[str, int]:
        """Bytes per category among the storages live at the peak; they sum to `peak`."""
        out = dict.fromkeys(CATEGORIES, 0)
        for rec in self.peak_live:
            out[rec.category] += rec.nbytes
        out["peak"] = sum(out.values())
        return out

    def paged_bytes(self) -> int:
        """Bytes among the storages live at the peak that are CUDA managed memory (paged optimizer state): counted
        in their category, but invisible to torch's caching allocator (cuda_max_allocated)."""
        return sum(rec.nbytes for rec in self.peak_live if rec.paged)

    def gathered_bytes(self) -> int:
        """Bytes among the storages live at the peak that are all-gathered (unsharded) parameters of a sharded
        model: counted under `weights`, beside the rank's own shard."""
        return sum(rec.nbytes for rec in self.peak_live if rec.gathered)

    def categories_at(self, phase: str) -> dict[str, int]:
        """Bytes per category live as the step entered `phase` (e.g. "optimizer": all gradients exist)."""
        event = next(e for e, p in self.phases if p == phase)
        out = dict.fromkeys(CATEGORIES, 0)
        for rec in self.all:
            if rec.born <= event and (rec.died is None or rec.died > event):
                out[rec.category] += rec.nbytes
        out["total"] = sum(out.values())
        return out

    def timeline(self, points: int = TIMELINE_POINTS) -> dict:
        """Live bytes by category over the step at up to `points` moments (each bucket's highest point)."""
        end = self.events + 1
        delta = np.zeros((len(CATEGORIES), end + 1), dtype=np.int64)
        for rec in self.all:
            c = CATEGORIES.index(rec.category)
            delta[c, rec.born] += rec.nbytes
            delta[c, rec.died if rec.died is not None else end] -= rec.nbytes
        live = np.cumsum(delta, axis=1)[:, :end]
        total = live.sum(axis=0)
        edges = np.linspace(0, end, min(points, end) + 1).astype(int)
        idx = [int(lo + np.argmax(total[lo:hi])) for lo, hi in zip(edges[:-1], edges[1:], strict=True) if hi > lo]
        return {
            "event": idx,
            "bytes": {c: live[i, idx].tolist() for i, c in enumerate(CATEGORIES)},
            "phases": [{"event": e, "phase": p} for e, p in self.phases],
        }
