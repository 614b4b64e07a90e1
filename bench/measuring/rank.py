"""One rank of a sharded measurement, started by torchrun (bench.measuring.sharded.launch): measures its part of the
run and writes its raw figures, or why it failed, to its own file."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from bench.measuring.sharded import RANK_FILE
from qlora.config import RunConfig


def _rank_main(payload_path: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from bench.measuring.measure import measure_once
    from bench.measuring.runner import _die_with_parent, failure

    _die_with_parent()
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
        answer = {"failure": failure(e)}
    path = Path(out_dir) / RANK_FILE.format(rank)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(answer, allow_nan=False))
    os.replace(tmp, path)
    sys.stdout.flush()
    sys.stderr.flush()
    if ok:
        dist.barrier()  # no rank tears the group down while another is still in a collective
    # a failed rank exits non-zero at once, so torchrun stops the others instead of leaving them in a collective
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    _rank_main(*sys.argv[1:3])
