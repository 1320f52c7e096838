"""Results output: results.json, results.csv (summary + per-sequence + per-object rows) and a
terminal table."""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tcore.eval.io import write_csv, write_json

# The folders a run writes beside results.json (`--visualize` the second).
RUN_FOLDERS = ("predictions", "visualize")


@contextmanager
def staged_run_folders(output_dir):
    """Where a run writes its predictions and overlay strips: a fresh folder inside OUTPUT.
    When the run finishes its folders replace the earlier run's (so no file of an earlier
    run stays beside this run's results); when it fails the folder is removed and the earlier
    run's results stay whole. Made at the start, so an OUTPUT that cannot be written is
    found before the first video is propagated."""
    output = Path(output_dir)
    try:
        output.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".eval-run-", dir=output))
    except OSError as error:
        raise ValueError(f"{output}: cannot write the results there "
                         f"({error.strerror or error})") from error
    try:
        yield staging
        _replace_run_folders(output, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_run_folders(output: Path, staging: Path) -> None:
    for name in RUN_FOLDERS:
        earlier, new = output / name, staging / name
        if earlier.exists():
            earlier.rename(staging / f"{name}.earlier")   # removed with the staging folder
        if new.exists():
            new.rename(earlier)


def csv_rows(results: dict) -> list[dict]:
    """One 'summary' row, then 'sequence', 'object' and 'class' rows (a `level` column says
    which)."""
    rows = [{"level": "summary", "name": "all", **results.get("summary", {})}]
    for row in results.get("per_sequence", []):
        rows.append({"level": "sequence", "name": row.get("sequence", row.get("name")), **row})
    for row in results.get("per_object", []):
        rows.append({"level": "object", **row})
    for row in results.get("per_class", []):
        rows.append({"level": "class", **row})
    return rows


def write_results(output_dir, results: dict) -> None:
    """Write OUTPUT/results.json and OUTPUT/results.csv (atomically)."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "results.json", results)
    write_csv(output / "results.csv", csv_rows(results))


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4f}"
    return str(value)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain-text table of `rows` restricted to `columns`."""
    cells = [[_cell(row.get(col, "")) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    line = "  ".join(col.ljust(w) for col, w in zip(columns, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([line, rule, *body])


def summary_table(results: dict) -> str:
    """Per-sequence table followed by the summary line, as printed by `tcore eval`."""
    summary = results.get("summary", {})
    seq_rows = results.get("per_sequence", [])
    parts = []
    if seq_rows:
        columns = [c for c in seq_rows[0] if c not in ("level",)]
        parts.append(format_table(seq_rows, columns))
    parts.append(format_table([summary], list(summary)))
    return "\n\n".join(parts)
