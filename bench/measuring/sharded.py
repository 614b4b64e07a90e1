"""Sharded training measured under torchrun: one process per rank, the memory ledger on every rank.

`launch(cfg)` runs in an isolated run's process (bench.measuring.runner) and starts `torch.distributed.run` with
cfg.world_size ranks of bench.measuring.rank; each builds the model, shards it (`wrap`), runs measure_once's steps
and writes its raw figures to its own file. A rank that fails writes why and exits non-zero, so torchrun stops the
others (they would wait forever in a collective); a rank killed outright writes nothing and is named as such.
torchrun is in the run's process group, its ranks in sessions of their own: each rank asks the kernel, before any
import, to kill it when its parent (torchrun's agent) dies, so a time-out or the caller's death, which kill the
agent, take every rank with it.

Sharding (RunConfig.shard), as users run it with FSDP2 (torch.distributed.fsdp.fully_shard):
- fsdp: fully_shard on every decoder layer, then on the root (embeddings, final norm, lm_head, and anything else).
  Each parameter is split on its first dimension into world_size chunks (the last padded), its gradient is
  reduce-scattered into the same layout and the optimizer state follows the shards. A unit's parameters are
  all-gathered for its forward, freed after it, and gathered again for its backward; the root's stay gathered from
  its forward to the end of backward (FSDP2's own heuristic).
- fsdp-grad-op: the same with reshard_after_forward=False: every unit stays gathered from its forward to its backward.
Frozen parameters (LoRA's base) are sharded too and have no gradient. Buffers (rotary frequencies) are replicated.

The gathered parameters live in buffers FSDP keeps and resizes (storage.resize_) between 0 and their full size;
`wrap` gathers and frees every unit once so the buffers exist before any measured step, and the ledger counts them as
`weights` (their bytes at the peak also as `gathered_bytes`). On CPU the collectives run over gloo, on CUDA over NCCL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from qlora.config import ConfigError, RunConfig

MEASURED_SHARDS = ("fsdp", "fsdp-grad-op")
RANK_FILE = "rank{}.json"


def check(cfg: RunConfig) -> None:
    """Refuse what this harness cannot measure sharded, with the value named."""
    if cfg.shard not in MEASURED_SHARDS:
        raise ConfigError(f"shard {cfg.shard!r} is estimated only (qlora-bench estimate --gpus {cfg.world_size} "
                          f"--shard {cfg.shard}); measured sharding: {', '.join(MEASURED_SHARDS)}")
    if cfg.quantized:
        raise ConfigError(f"method qlora with shard {cfg.shard}: FSDP2 on this stack (torch 2.13, bitsandbytes 0.50) "
                          "turns each 4-bit weight into a DTensor without its quant_state (AttributeError: 'DTensor' "
                          "object has no attribute 'quant_state'); estimate it instead: qlora-bench estimate MODEL "
                          f"--method qlora --gpus {cfg.world_size} --shard {cfg.shard}")
    if cfg.device.startswith("cuda:"):
        raise ConfigError(f"device {cfg.device!r}: a sharded run takes one CUDA device per rank; use device cuda")


# ---- inside a rank (bench.measuring.rank) ----------------------------------------------------------------------


def wrap(model, cfg: RunConfig):
    """Shard `model` as cfg.shard says (see the module's docstring). Returns the sharded model and a function that
    lists the storages of its gathered-parameter buffers (for the ledger's `gathered`)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from qlora import models

    reshard = cfg.shard == "fsdp"
    for layer in models.layers_of(model):
        fully_shard(layer, reshard_after_forward=reshard)
    # the root as users write it: FSDP2's default keeps the root gathered from forward to backward
    fully_shard(model, **({} if reshard else {"reshard_after_forward": False}))
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:  # the all-gather buffers are created on a unit's first gather: make them exist now, one unit
        unit.unshard()  # at a time (never the whole model gathered at once)
        unit.reshard()
    return model, lambda: gathered_storages(units)


def gathered_storages(units) -> list:
    """The storages FSDP all-gathers each unit's parameters into (and the unsharded parameters that view them)."""
    out = []
    for unit in units:
        group = unit._get_fsdp_state()._fsdp_param_group  # private in torch 2.13: no public accessor exists
        for param in group.fsdp_params if group is not None else ():
            out += [t.untyped_storage() for t in param.all_gather_outputs]
            if hasattr(param, "_unsharded_param"):
                out.append(param._unsharded_param.untyped_storage())
    return out


# ---- the launcher, in an isolated run's process ----------------------------------------------------------------


def launch(cfg: RunConfig, budget: int | None = None) -> dict:
    """Measure cfg on cfg.world_size ranks under torchrun. Returns {"ranks": [raw figures of rank 0, 1, ...]}.
    Raises RunFailed naming the first rank that failed (oom if any rank ran out of memory)."""
    from bench.measuring.runner import RunFailed, death_by_signal, last_line, oom_kill_counts

    check(cfg)
    with tempfile.TemporaryDirectory(prefix="qlora-bench-ranks-") as tmp:
        payload = Path(tmp) / "payload.json"
        payload.write_text(json.dumps({"config": cfg.to_dict(), "budget": budget}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(cfg.world_size), "--max-restarts", "0",
               "-m", "bench.measuring.rank", str(payload), tmp]
        before = oom_kill_counts()
        # each rank dies with its parent, torchrun's agent (whose pid is not known before it starts)
        env = {k: v for k, v in os.environ.items() if k != "QLORA_BENCH_PARENT"}
        # torchrun's own chatter and every rank's output go to stderr (this process's output is the runner's pipe)
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, env=env, text=True, errors="replace")
        sys.stderr.write(proc.stderr[-20000:])
        answers = {}
        for r in range(cfg.world_size):
            f = Path(tmp) / RANK_FILE.format(r)
            if f.is_file():
                answers[r] = json.loads(f.read_text())
    failed = {r: a["failure"] for r, a in answers.items() if "failure" in a}
    config = next((why for why in failed.values() if why["kind"] == "config"), None)
    if config is not None:
        raise ConfigError(config["message"])
    missing = [r for r in range(cfg.world_size) if r not in answers]
    if missing:  # a rank killed outright is the cause; the others' failures (a peer gone from a collective) follow
        evidence = death_by_signal(-9, before, "") if proc.returncode else None
        if evidence is not None and evidence.status == "oom":
            raise RunFailed("oom", f"rank {missing[0]} of {cfg.world_size}: {evidence}")
        last = last_line(_rank_error(proc.stderr, missing[0]) or proc.stderr) or f"exit code {proc.returncode}"
        raise RunFailed("error", f"rank {missing[0]} of {cfg.world_size} ended without a result (torchrun exit "
                                 f"code {proc.returncode}): {last[:300]}")
    if failed:  # the first to fail (the others may only have lost it as a peer); an out-of-memory before all else
        r, why = min(failed.items(), key=lambda kv: (kv[1]["kind"] != "oom", kv[1].get("at", 0), kv[0]))
        raise RunFailed(why["kind"], f"rank {r} of {cfg.world_size}: {why['message']}", **why.get("extra", {}))
    return {"ranks": [answers[r]["result"] for r in range(cfg.world_size)]}


def _rank_error(text: str, rank: int) -> str | None:
    """torchrun's report of how a rank ended: the block of its failure list (numbered by position, not rank)
    whose `rank      : N (local_rank: ...)` line is this rank's, if it gave one."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("rank") and line.split(":", 1)[-1].strip().startswith(f"{rank} ("):
            block = " ".join(x.strip() for x in lines[max(0, i - 3):i + 4])
            if "exitcode" in block:
                return block
    return None
