"""Before a report is rendered: the estimate records it sets beside its inputs (bench.modelling.records.derived),
made here, so that `qlora-bench report` reads records only and imports no estimator.

    qlora-bench derive RESULTS... --out FILE    the estimates a report of RESULTS needs, into FILE
    qlora-bench report RESULTS... FILE --out DIR

The main job (`qlora-bench bench`) and the GPU smoke come through `make`: OUT/derived-estimates.jsonl beside the
results, then the report of OUT in OUT/report/.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.measuring import record
from bench.modelling.records import derived
from bench.render import report


def derive(inputs: list[str], file: Path, log=lambda line: None) -> tuple[list[dict], list[dict]]:
    """Read the records of `inputs`, derive the estimates to set beside them (reusing FILE's earlier ones where their
    figures are unchanged, so a regenerated report is identical) and write them to FILE. Returns (records,
    derived estimates)."""
    file = Path(file)
    previous = record.read(file) if file.is_file() else []
    earlier = {r["id"] for r in previous}  # FILE among the inputs (or in a folder of them) is not an input of itself
    records = [r for r in report.load(inputs) if r["id"] not in earlier]
    extra = derived(records, previous, log=log)
    record.write_atomic(file, "".join(json.dumps(r, allow_nan=False) + "\n" for r in extra))
    return records, extra


def make(folder: Path, log=lambda line: None) -> tuple[list[dict], list[dict], list[str]]:
    """The derived estimates of FOLDER's records into FOLDER/derived-estimates.jsonl, then FOLDER's report in
    FOLDER/report/. Returns (records, derived estimates, file names written)."""
    records, extra = derive([str(folder)], folder / report.DERIVED, log=log)
    files = report.build(report.load([str(folder)]), folder / "report", [str(folder)])
    return records, extra, files
