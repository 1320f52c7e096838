"""Results output: results.json, results.csv (summary + per-sequence + per-object rows) and a
terminal table."""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tcore.eval.io import write_csv, write_json
from tcore.preprocess.files import check_output_path, make_output_directory
from tcore.preprocess.locks import process_alive

# What a run puts into OUTPUT: its folders (`--visualize` the second), then its result files.
RUN_FOLDERS = ("predictions", "visualize")
RESULT_FILES = ("results.csv", "results.json")   # results.json last: it says the run is whole
STAGING_PREFIX = ".eval-run-"


@contextmanager
def staged_run(output_dir):
    """The folder a run writes everything into (predictions/, visualize/, results.json and
    .csv), inside OUTPUT; when the run finishes, they replace the earlier run's, so no file of
    an earlier run stays beside this run's results; when it fails the folder is removed and
    the earlier run's results stay whole. Made at the start, so an OUTPUT that cannot be
    written is found before the first video is propagated. One run per OUTPUT: a run over
    a subset of the videos replaces a run over all of them."""
    output = check_output_path(output_dir, f"--output {output_dir}")   # before any lookup below
    for name in RUN_FOLDERS:
        if (output / name).is_symlink():
            raise ValueError(f"{output / name}: a symbolic link; a finished run replaces this "
                             "folder, so give an --output where it is a plain folder, or none")
    for name in RESULT_FILES:
        if (output / name).is_dir():
            raise ValueError(f"{output / name}: a folder, where this run writes its {name}")
    make_output_directory(output, f"--output {output}")
    remove_abandoned_stagings(output)
    staging = Path(tempfile.mkdtemp(
        prefix=f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=output))
    try:
        yield staging
        _move_into_place(output, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_abandoned_stagings(output: Path) -> None:
    """Staging folders of runs on this host whose process is gone (killed: kill -9 leaves
    them); another host's, or a live run's, are left alone."""
    own = re.compile(re.escape(f"{STAGING_PREFIX}{socket.gethostname()}-") + r"(\d+)-[^-]+")
    for folder in output.glob(f"{STAGING_PREFIX}*"):
        match = own.fullmatch(folder.name)
        if match and not process_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def _move_into_place(output: Path, staging: Path) -> None:
    """The run's folders, then its result files; the earlier run's folders go into the
    staging folder (removed with it). A folder that cannot be moved puts the earlier ones
    back before the error is raised."""
    replaced = []
    try:
        for name in RUN_FOLDERS:
            earlier, new = output / name, staging / name
            if earlier.exists():
                earlier.rename(staging / f"{name}.earlier")
                replaced.append(name)
            if new.exists():
                new.rename(earlier)
    except OSError as error:
        for back in replaced:
            if (output / back).exists():
                (output / back).rename(staging / f"{back}.failed")
            (staging / f"{back}.earlier").rename(output / back)
        raise ValueError(f"{output}: cannot move this run's {name}/ into place "
                         f"({error.strerror or error}); the earlier run's results are "
                         "kept") from error
    for name in RESULT_FILES:
        if (staging / name).exists():
            os.replace(staging / name, output / name)


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
