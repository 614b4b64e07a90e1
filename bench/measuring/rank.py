"""One rank of a sharded measurement, started by torchrun (bench.measuring.sharded.launch): measures its part of the
run and writes its raw figures, or why it failed, to its own file."""

from __future__ import annotations

import os

PARENT = os.getppid()  # torchrun's agent, read before anything else can outlive it

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.measuring.runner import _die_with_parent, failure  # noqa: E402 - light: no torch
from bench.measuring.sharded import RANK_FILE  # noqa: E402
from qlora.config import RunConfig  # noqa: E402


def _rank_main(payload_path: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from bench.measuring.measure import measure_once

    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    payload = json.loads(Path(payload_path).read_text())
    cfg = RunConfig.from_dict(payload["config"])
    ok = False
    try:
        if cfg.device == "cuda":
            torch.cuda.set_device(local)
            cfg = replace(cfg, device=f"cuda:{local}")
        dist.init_process_group(backend="nccl" if cfg.device.startswith("cuda") else "gloo")
        answer = {"result": {**measure_once(cfg, budget=payload.get("budget"), seed_offset=rank), "rank": rank}}
        ok = True
    except BaseException as e:  # noqa: BLE001 - every failure of a rank is a result, reported to the launcher
        answer = {"failure": {**failure(e), "at": time.time()}}  # when: the launcher names the first to fail
    try:
        text = json.dumps(answer, allow_nan=False)
    except ValueError as e:  # NaN or infinity in the figures: not valid JSON, so not a record either
        ok, text = False, json.dumps({"failure": {"kind": "error", "at": time.time(),
                                                  "message": f"the rank's result is not valid JSON: {e}"}})
    path = Path(out_dir) / RANK_FILE.format(rank)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if ok:
            dist.barrier()  # no rank tears the group down while another is still in a collective
    finally:
        # a failed rank exits non-zero at once, so torchrun stops the others instead of leaving them in a
        # collective; no rank goes through interpreter teardown, where a process group's destructor can hang
        os._exit(0 if ok else 1)


if __name__ == "__main__":
    _die_with_parent(PARENT)  # before torch: ranks run in sessions of their own, so only this takes them down
    _rank_main(*sys.argv[1:3])
