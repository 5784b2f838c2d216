"""A results cache: everything the report needs to redraw every table and figure without training, a
model, a GPU or Snakemake (docs/results-and-caches.md, "Regenerate tables and figures from a cache").

    CACHE/report_settings.json     the report rule's settings (its --cfg, StudyPlan.report_settings(); trace.settings.ReportJob)
    CACHE/aggregate/evals.csv, training_curves.csv, credit_maps.csv, teacher_gap.csv   as `python -m trace aggregate` writes them
    CACHE/aggregate/calibration.csv   the same, optional: caches from before it existed have none (and no calibration
                                      table or figure)
    CACHE/tables/, CACHE/figures/  what `python -m trace redraw CACHE` draws from the two above

`python -m trace export-cache` (the export_cache rule) writes one from results/aggregate/; the committed
caches live in results/shipped/<study>/.

The opd_family ablation's cache (trace/opd_family.py) has its own layout:

    CACHE/family_settings.json     the opd_family rule's settings (trace.settings.FamilyJob)
    CACHE/aggregate/evals.csv, training_curves.csv, calibration.csv   as `python -m trace opd-family` writes them
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from trace import opd_family
from trace.report import read_aggregate_csv, write_tables_and_figures
from trace.settings import FamilyJob, ReportJob

SETTINGS = "report_settings.json"
FAMILY_SETTINGS, FAMILY_AGGREGATE_FILES = "family_settings.json", ("evals.csv", "training_curves.csv", "calibration.csv")
AGGREGATE_FILES = ("evals.csv", "training_curves.csv", "credit_maps.csv", "teacher_gap.csv")
OPTIONAL_AGGREGATE_FILES = ("calibration.csv",)  # copied and drawn where present
DRAWN = ("tables", "figures")
LAYOUT = (f"a cache folder holds {SETTINGS} and aggregate/{{{','.join(AGGREGATE_FILES)}}} "
          f"(and optionally {', '.join(OPTIONAL_AGGREGATE_FILES)})")


def export_cache(job: ReportJob, aggregate_dir: Path, cache_dir: Path) -> None:
    """The aggregate CSVs and the report settings into cache_dir, then its tables and figures redrawn from
    the cache alone (the previous ones removed first, so nothing stale stays in it)."""
    job = ReportJob.from_mapping(job)
    sources = [aggregate_dir / name for name in AGGREGATE_FILES]
    if missing := [str(path) for path in sources if not path.is_file()]:
        raise FileNotFoundError(f"aggregate file(s) {', '.join(missing)} do not exist (python -m trace aggregate)")
    (cache_dir / "aggregate").mkdir(parents=True, exist_ok=True)
    for name in OPTIONAL_AGGREGATE_FILES:  # not left over from an earlier export when this aggregate has none
        (cache_dir / "aggregate" / name).unlink(missing_ok=True)
    sources += [path for path in (aggregate_dir / name for name in OPTIONAL_AGGREGATE_FILES) if path.is_file()]
    for source in sources:
        shutil.copyfile(source, cache_dir / "aggregate" / source.name)
    (cache_dir / SETTINGS).write_text(json.dumps(job.to_dict(), sort_keys=True, indent=2) + "\n")
    for name in DRAWN:
        shutil.rmtree(cache_dir / name, ignore_errors=True)
    redraw(cache_dir)


def read_settings(cache_dir: Path, name: str = SETTINGS, kind=ReportJob):
    """The cache's report (or family) settings, checked against the schema (one line naming the file and key)."""
    path = cache_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {LAYOUT}")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    return kind.from_mapping(values, str(path))


def export_family_cache(job: FamilyJob, aggregate_dir: Path, cache_dir: Path) -> None:
    """The opd_family aggregate and settings into cache_dir, its table and figure redrawn there."""
    job = FamilyJob.from_mapping(job)
    (cache_dir / "aggregate").mkdir(parents=True, exist_ok=True)
    for name in FAMILY_AGGREGATE_FILES:
        shutil.copyfile(aggregate_dir / name, cache_dir / "aggregate" / name)
    (cache_dir / FAMILY_SETTINGS).write_text(json.dumps(job.to_dict(), sort_keys=True, indent=2) + "\n")
    redraw(cache_dir)


def _redraw_family(cache_dir: Path, out_dir: Path) -> Path:
    job = read_settings(cache_dir, FAMILY_SETTINGS, FamilyJob)
    for name in FAMILY_AGGREGATE_FILES:
        if not (cache_dir / "aggregate" / name).is_file():
            raise FileNotFoundError(f"{cache_dir / 'aggregate' / name} does not exist: an opd_family cache holds "
                                    f"{FAMILY_SETTINGS} and aggregate/{{{','.join(FAMILY_AGGREGATE_FILES)}}}")
        read_aggregate_csv(cache_dir / "aggregate" / name)
    opd_family.write_table_and_figure(job, cache_dir / "aggregate", out_dir)
    return out_dir


def redraw(cache_dir: Path, out_dir: Path | None = None) -> Path:
    """Every table and figure from the cache alone into out_dir (default: the cache itself); returns out_dir."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise FileNotFoundError(f"cache folder {cache_dir} does not exist")
    if (cache_dir / FAMILY_SETTINGS).is_file():  # an opd_family cache
        return _redraw_family(cache_dir, cache_dir if out_dir is None else Path(out_dir))
    cfg = read_settings(cache_dir)
    for name in AGGREGATE_FILES:  # credit_maps.csv too: a cache is exactly what the aggregate wrote
        if not (cache_dir / "aggregate" / name).is_file():
            raise FileNotFoundError(f"{cache_dir / 'aggregate' / name} does not exist: {LAYOUT}")
        # every row checked before anything is drawn: a bad CSV leaves the tables already there untouched
        read_aggregate_csv(cache_dir / "aggregate" / name, keep_default_na=name != "credit_maps.csv")
    for name in OPTIONAL_AGGREGATE_FILES:
        if (cache_dir / "aggregate" / name).is_file():
            read_aggregate_csv(cache_dir / "aggregate" / name)
    out_dir = cache_dir if out_dir is None else Path(out_dir)
    write_tables_and_figures(cfg, cache_dir / "aggregate", out_dir)
    return out_dir
