"""Before a report is rendered: the estimate records it sets beside its inputs (bench.modelling.records.derived),
made here and kept in the report folder, so that the render layer reads records only.

`qlora-bench report` and the main job (`qlora-bench bench`) both come through `make`.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.measuring import record
from bench.modelling.records import derived
from bench.render import report


def make(inputs: list[str], out: Path, log=lambda line: None) -> tuple[list[dict], list[dict], list[str]]:
    """Read the records of `inputs`, derive the estimates to set beside them (reusing OUT's earlier ones where their
    figures are unchanged, so a regenerated report is identical), write them to OUT/derived-estimates.jsonl and
    render the report into OUT. Returns (records, derived estimates, file names written)."""
    records = report.load(inputs)
    earlier = out / report.DERIVED
    previous = record.read(earlier) if earlier.is_file() else []
    extra = derived(records, previous, log=log)
    record.write_atomic(earlier, "".join(json.dumps(r, allow_nan=False) + "\n" for r in extra))
    files = report.build(records, out, inputs, extra)
    return records, extra, [*files, report.DERIVED]
