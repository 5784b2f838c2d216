"""Results shipped as a cache (aggregate CSVs + the report's settings) and redrawn with one command, without
training: `python -m trace export-cache` writes one, `python -m trace redraw CACHE` redraws it anywhere,
deterministically; the committed caches under results/shipped/ redraw to their committed tables."""
import json
import logging
import shutil

import pandas as pd
import pytest

from conftest import REPO_ROOT
from test_calibration import AGREE_RIGHT, AGREE_WRONG, HAND, rows_of
from test_report_paper import CFG, cells, probe, step, write_eval, write_metrics
from trace.cache import AGGREGATE_FILES, OPTIONAL_AGGREGATE_FILES, SETTINGS, redraw
from trace.cli import main
from trace.report import aggregate

SHIPPED = REPO_ROOT / "results" / "shipped"
TABLES = {f"{name}.{ext}" for name in ("main_results", "vs_grpo", "mechanism", "annotator_tiers", "mask_localisation",
                                       "paper_figure_numbers", "teacher_gap", "calibration") for ext in ("md", "csv")} | {
    "main_results_vs_paper.csv"}
FIGURES = {f"{name}.png" for name in ("training_curves", "fig1a_entropy", "validation_curves", "fig8_dynamics",
                                      "fig6_credit_map", "annotator_tiers", "mask_localisation", "calibration")}


def shipped_caches():
    return sorted(path.parent for path in SHIPPED.glob(f"*/{SETTINGS}"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache exported by the CLI from a small aggregate written by the real aggregate code (2 seeds of
    grpo and trace_fkl on one model, so vs_grpo pairs them)."""
    root = tmp_path_factory.mktemp("cache")
    results = root / "results"
    write_eval(results, "big", "base", cells(60, 60, 80, 90, 60))
    for seed, shift in ((0, 0), (1, 4)):
        write_eval(results, "big", f"grpo-seed{seed}", cells(70 + shift, 70, 90, 95, 55))
        write_eval(results, "big", f"trace_fkl-seed{seed}", cells(73 + 2 * shift, 73, 93, 98, 58))
        write_metrics(results, "big", "grpo", [step(0, **probe(1.1, 0.05, [0.1, 0.1, 0.2, 0.2], [0, 1, 1, 0])),
                                               step(1, **{"val/mean_at_k": 0.4})], seed=seed)
        write_metrics(results, "big", "trace_fkl", [step(0, lam=0.5, **probe(6.0, 0.2, [0.0, 0.6, 0.6, 0.1],
                                                                             [0, 1, 1, 0])), step(1)], seed=seed)
    write_eval(results, "big", "trace_fkl@self-seed0", cells(71, 71, 91, 96, 56))
    write_metrics(results, "big", "trace_fkl@self", [step(0, lam=0.5), step(1)])
    write_eval(results, "small", "base", cells(50, 50, 50, 50, 50))
    write_eval(results, "small", "grpo-seed0", cells(55, 55, 55, 55, 55))
    write_eval(results, "small", "random25-seed0", cells(52, 52, 52, 52, 52))
    write_metrics(results, "small", "random25", [step(0, lam=0.5), step(1)])
    # samples logs beside a few results (as an evaluation from before issue 23 leaves them): their calibration
    for model, policy, problems in [("big", "base", HAND), ("big", "grpo-seed0", AGREE_RIGHT),
                                    ("big", "grpo-seed1", HAND), ("big", "trace_fkl-seed0", AGREE_WRONG),
                                    ("small", "base", HAND + AGREE_WRONG)]:
        (results / "eval" / model / policy / "math500.samples.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in rows_of(problems)))
    aggregate({"benchmarks": CFG["benchmarks"]}, sorted(results.glob("eval/*/*/*.json")),
              sorted(results.glob("train/*/*/seed*/metrics.jsonl")), results / "aggregate")
    cache = root / "cache" / "paper"
    main(["export-cache", "--cfg", json.dumps(CFG, sort_keys=True), "--aggregate-dir", str(results / "aggregate"),
          "--out-dir", str(cache)])
    return cache


def _files(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_export_writes_settings_aggregate_tables_and_figures(cache):
    # the report rule's --cfg, with the schema's default calibration bins; every ablation named (opd_family: null, its
    # table has its own rule and cache)
    assert json.loads((cache / SETTINGS).read_text()) == {**CFG, "calibration_bins": 10,
                                                          "ablations": {**CFG["ablations"], "opd_family": None}}
    aggregate_dir = cache.parent.parent / "results" / "aggregate"
    assert _files(cache / "aggregate") == {name: (aggregate_dir / name).read_bytes()
                                           for name in (*AGGREGATE_FILES, *OPTIONAL_AGGREGATE_FILES)}
    assert set(_files(cache / "tables")) == TABLES
    assert set(_files(cache / "figures")) == FIGURES
    assert all(len(data) > 1000 for data in _files(cache / "figures").values())


def test_two_redraws_give_byte_identical_tables_and_figures(cache, tmp_path):
    main(["redraw", str(cache), "--out-dir", str(tmp_path / "a")])
    main(["redraw", str(cache), "--out-dir", str(tmp_path / "b")])
    for kind in ("tables", "figures"):
        first, second = _files(tmp_path / "a" / kind), _files(tmp_path / "b" / kind)
        assert first == second, kind  # PNGs too: no version or date in their metadata
        assert first == _files(cache / kind), kind  # and the same as the export drew into the cache
    assert not (tmp_path / "a" / "aggregate").exists()  # only tables/ and figures/ are written


def test_redraw_defaults_to_the_cache_folder(cache, tmp_path):
    copy = shutil.copytree(cache, tmp_path / "copy", ignore=shutil.ignore_patterns("tables", "figures"))
    main(["redraw", str(copy)])
    assert _files(copy / "tables") == _files(cache / "tables")
    assert set(_files(copy / "figures")) == FIGURES


def _break_settings(cache):
    (cache / SETTINGS).write_text("{benchmarks: ")


def _settings_without_benchmarks(cache):
    (cache / SETTINGS).write_text(json.dumps({"methods": ["grpo"]}))


def _evals_without_a_column(cache):
    path = cache / "aggregate" / "evals.csv"
    pd.read_csv(path).drop(columns="ci_high").to_csv(path, index=False)


def _evals_row_without_a_middle_field(cache):
    """Line 3 loses its benchmark: read naively, its values would shift one column left (k under column)."""
    path = cache / "aggregate" / "evals.csv"
    lines = path.read_text().splitlines()
    fields = lines[2].split(",")
    lines[2] = ",".join(fields[:3] + fields[4:])
    path.write_text("\n".join(lines) + "\n")


def _curves_step_as_text(cache):
    path = cache / "aggregate" / "training_curves.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    fields = lines[4].split(",")
    fields[header.index("step")] = "ten"
    lines[4] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("damage, named, message", [
    (lambda cache: shutil.rmtree(cache), "", "does not exist"),
    (lambda cache: (cache / SETTINGS).unlink(), SETTINGS, "does not exist"),
    (_break_settings, SETTINGS, "not valid JSON"),
    (_settings_without_benchmarks, SETTINGS, "'benchmarks'"),
    (lambda cache: (cache / "aggregate" / "credit_maps.csv").unlink(), "aggregate/credit_maps.csv", "does not exist"),
    (lambda cache: (cache / "aggregate" / "training_curves.csv").write_text(""), "aggregate/training_curves.csv",
     "not a readable CSV"),
    (_evals_without_a_column, "aggregate/evals.csv", "lacks the column(s) ci_high"),
    (_evals_row_without_a_middle_field, "aggregate/evals.csv", "evals.csv line 3: 10 fields, the header has 11"),
    (_curves_step_as_text, "aggregate/training_curves.csv", "training_curves.csv line 5: column step = 'ten' is not "
                                                             "a number"),
], ids=["no-folder", "no-settings", "bad-json", "no-benchmarks", "no-credit-maps", "empty-curves", "no-ci-column",
        "short-row", "text-step"])
def test_a_missing_or_malformed_cache_is_one_line_naming_the_file(cache, tmp_path, caplog, damage, named, message):
    copy = shutil.copytree(cache, tmp_path / "copy")
    damage(copy)
    with caplog.at_level(logging.ERROR, logger="trace"), pytest.raises(SystemExit) as exit_:
        main(["redraw", str(copy), "--out-dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    [error] = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert "\n" not in error and message in error and str(copy / named).rstrip("/") in error, error
    assert not (tmp_path / "out").exists()  # checked before anything is drawn


def test_shipped_caches_redraw_to_their_committed_tables(tmp_path):
    caches = shipped_caches()
    assert caches, (f"no shipped cache: expected results/shipped/<study>/{SETTINGS} with aggregate/, tables/ and "
                    "figures/ (snakemake export_cache, then copy results/cache/<study> there)")
    for shipped in caches:
        out = redraw(shipped, tmp_path / shipped.name)
        committed = _files(shipped / "tables")
        assert committed, f"{shipped}/tables is empty"
        redrawn = _files(out / "tables")
        assert set(redrawn) == set(committed), f"{shipped}/tables: the redraw writes {sorted(redrawn)}"
        for name, data in committed.items():
            assert redrawn[name] == data, f"{shipped}/tables/{name} differs from its redraw (re-export the cache)"
        for name in _files(shipped / "figures"):
            assert (out / "figures" / name).stat().st_size > 0, f"{shipped}/figures/{name} is not redrawn"


@pytest.mark.parametrize("doc, cache, table", [("README.md", "toy", "main_results"),
                                               ("docs/results-and-caches.md", "toy", "main_results"),
                                               ("docs/results-and-caches.md", "toy", "teacher_gap"),
                                               ("docs/results-and-caches.md", "toy-seeds3-small", "main_results")])
def test_the_docs_show_the_shipped_tables(doc, cache, table):
    """The README's and the results page's default-study tables are the shipped caches', not hand-copied older ones."""
    rows = [line for line in (REPO_ROOT / "results" / "shipped" / cache / "tables" / f"{table}.md")
            .read_text().splitlines() if line.startswith("|")]
    shown = (REPO_ROOT / doc).read_text().splitlines()
    assert rows and all(line in shown for line in rows), f"re-copy results/shipped/{cache}/tables/{table}.md into {doc}"


def test_the_shipped_teacher_check_passes_on_both_toy_bases():
    """Issue 19's bar: label and reference teachers better than the student at first-error tokens, CI > 0."""
    import pandas as pd

    gaps = pd.read_csv(REPO_ROOT / "results" / "shipped" / "toy" / "aggregate" / "teacher_gap.csv")
    assert set(zip(gaps["model"], gaps["context"])) == {(m, c) for m in ("toy-large", "toy-small")
                                                          for c in ("label", "reference")}
    assert (gaps["verdict"] == "better").all() and (gaps["first_error_correct_ci_low"] > 0).all()
    assert (gaps["accuracy_teacher_prompt_mean"] > gaps["accuracy_plain_mean"]).all()


PAPER_SMOKE_CACHE = REPO_ROOT / "tests" / "data" / "paper_smoke_cache"  # a real paper smoke's aggregate (README there)


def _redraw_checking_figures(cache_dir, out_dir, monkeypatch) -> dict:
    """Redraw a cache; {figure name: what of it texts_outside_canvas finds past the canvas} as written."""
    from trace import report

    cut, save = {}, report._save

    def checking_save(plt, fig, path):
        report.fit_titles(fig)  # what _save does first: the figure as it is written
        cut[path.name] = report.texts_outside_canvas(fig)
        save(plt, fig, path)

    monkeypatch.setattr(report, "_save", checking_save)
    redraw(cache_dir, out_dir)
    return cut


@pytest.mark.parametrize("cache_dir", [*shipped_caches(), PAPER_SMOKE_CACHE], ids=lambda path: path.name)
def test_no_figure_text_is_cut_off(cache_dir, tmp_path, monkeypatch, caplog):
    """Every figure redrawn from the shipped caches and from the paper smoke's (its long model names:
    'qwen3-1.7b-smoke: SRPO weight mean exp(−β·H_teacher)' once ran past the right edge) has its titles,
    labels and legends inside the canvas."""
    with caplog.at_level(logging.WARNING, logger="trace.report"):
        cut = _redraw_checking_figures(cache_dir, tmp_path / "out", monkeypatch)
    assert set(cut) == {path.name for path in (tmp_path / "out" / "figures").iterdir()} and len(cut) >= 5
    assert {name: sides for name, sides in cut.items() if sides} == {}
    assert not [r.getMessage() for r in caplog.records if "past the canvas" in r.getMessage()]


def test_no_figure_text_is_cut_off_in_the_paper_like_cache(cache, tmp_path, monkeypatch):
    cut = _redraw_checking_figures(cache, tmp_path / "out", monkeypatch)
    assert set(cut) == FIGURES and {name: sides for name, sides in cut.items() if sides} == {}


def test_a_title_wider_than_its_panel_is_wrapped_inside_the_canvas():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trace.report import fit_titles, texts_outside_canvas

    fig, axes = plt.subplots(1, 2, figsize=(6, 2))
    axes[0].set_title("fits", fontsize=9)
    axes[1].set_title("a-rather-long-model-name: a panel title much wider than its panel", fontsize=9)
    fig.tight_layout()
    assert texts_outside_canvas(fig)  # past the right edge as drawn
    fit_titles(fig)
    assert texts_outside_canvas(fig) == [] and axes[0].get_title() == "fits"
    lines = axes[1].get_title().splitlines()
    assert lines[0] == "a-rather-long-model-name:" and len(lines) >= 2  # the name kept whole on its own line
    renderer = fig.canvas.get_renderer()
    assert axes[1].title.get_window_extent(renderer).width <= axes[1].get_window_extent(renderer).width
    plt.close(fig)
