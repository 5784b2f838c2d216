"""`snakemake --report report.html`: one self-contained HTML file holding every table and figure the report
rule draws, each under the paper's table or figure it reproduces (trace/study_plan.py REPORT_ENTRIES,
captions workflow/report/*.rst; docs/html-report.md). Made here from results redrawn from a cache, without
training: the toy study's and the three-seed study's shipped caches, and a paper smoke's cache."""
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from trace.cache import redraw

CONFIGS = REPO_ROOT / "workflow" / "configs"
PAPER_SMOKE_CACHE = REPO_ROOT / "tests" / "data" / "paper_smoke_cache"

# what the report shows each drawn file under: <kind>/<name> -> category (its .md and .csv together)
CATEGORIES = {
    "tables/main_results": "Table 2: main results",
    "tables/main_results_vs_paper": "Table 2: main results",
    "tables/vs_grpo": "Table 2: main results",
    "tables/annotator_tiers": "Table 3: annotator tiers",
    "tables/mask_localisation": "Table 4: mask localisation",
    "figures/fig1a_entropy": "Fig 1a: entropy",
    "figures/validation_curves": "Fig 3: validation and training reward",
    "figures/mask_localisation": "Fig 4: mask localisation curves",
    "figures/fig6_credit_map": "Fig 6: credit map",
    "tables/mechanism": "Fig 6: credit map",
    "figures/annotator_tiers": "Fig 7: annotator tier curves",
    "figures/fig8_dynamics": "Fig 8: length, entropy, SRPO",
    "tables/paper_figure_numbers": "Figure numbers beside the paper",
    "figures/training_curves": "Training curves",
    "tables/teacher_gap": "Teacher check",
    "tables/calibration": "Calibration: agreement over k samples",
    "figures/calibration": "Calibration: agreement over k samples",
}


def make_html_report(workdir, *configfiles):
    """`snakemake --report report.html` in workdir (the repo's Snakefile), as docs/html-report.md says."""
    report = workdir / "report.html"
    configs = ["--configfile", *map(str, configfiles)] if configfiles else []
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"), "--directory",
                             str(workdir), *configs, "--report", str(report)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    assert "Report created" in result.stdout + result.stderr
    return report


def check_html_report(report, results, study):
    """The report holds every table and figure under results/, each under its category, the markdown tables
    shown in their captions, loads nothing from elsewhere, and no caption failed to render."""
    drawn = sorted(f"{kind}/{path.name}" for kind in ("tables", "figures") for path in (results / kind).iterdir())
    text = report.read_text(encoding="utf-8")
    assert 1_000_000 < len(text) < 50_000_000, len(text)  # the figures are embedded (base64), ~1 MB of them
    # self-contained: one file, nothing fetched when it is opened (scripts, styles, images are inline)
    assert not re.findall(r'<(?:script|img|link|iframe|source)\b[^>]*\b(?:src|href)="(?!data:|#)[^"]*"', text)
    assert "Docutils System Messages" not in text  # every caption rendered without an RST error
    assert f"TRACE reproduction: the {study} study" in text  # workflow/report/workflow.rst
    categories = json.loads(re.search(r"var categories = (\{.*?\});\n", text).group(1))
    shown = {path: category for category, subcategories in categories.items()
             for paths in subcategories.values() for path in paths}
    expected = {f"results/{name}": CATEGORIES[name.rsplit(".", 1)[0]] for name in drawn}
    assert shown == expected
    for name in drawn:
        assert name.split("/")[1] in text, name
    for category in set(expected.values()):
        assert category in text, category
    for table in (results / "tables").glob("*.md"):  # each markdown table is shown in its caption
        rule = next(line for line in table.read_text().splitlines() if line.startswith(("|:", "|-")))
        assert rule in text, table.name
    return categories


@pytest.mark.slow
@pytest.mark.parametrize("cache, configfiles, study, n_categories", [
    (REPO_ROOT / "results" / "shipped" / "toy", (), "toy", 12),  # with its calibration table and figure
    (REPO_ROOT / "results" / "shipped" / "toy-seeds3-small", (CONFIGS / "seeds3_small.yaml",), "toy", 7),
    (PAPER_SMOKE_CACHE, (CONFIGS / "paper_smoke.yaml",), "paper", 12),
], ids=["toy", "toy-seeds3-small", "paper-smoke"])
def test_the_html_report_of_a_redrawn_cache(tmp_path, cache, configfiles, study, n_categories):
    """README "Regenerate tables and figures from a cache", then `snakemake --report report.html`."""
    redraw(cache, tmp_path / "results")
    report = make_html_report(tmp_path, *configfiles)
    assert report.is_file() and not (tmp_path / "report.zip").exists()
    categories = check_html_report(report, tmp_path / "results", study)
    assert len(categories) == n_categories, sorted(categories)
    if study == "paper":
        assert "Figure numbers beside the paper" in categories
        assert "results/tables/main_results_vs_paper.csv" in categories["Table 2: main results"]["beside the paper"]


@pytest.mark.slow
def test_the_paper_studys_report_from_a_cache_on_a_machine_without_its_models(tmp_path):
    """Planning the paper study checks that every model can be obtained; a report from a cache needs none,
    so TRACE_PREFLIGHT=1 skips that check (docs/html-report.md). The paper smoke's cache stands in for a
    paper cache: the paper study's report rule declares the same files."""
    import os

    redraw(PAPER_SMOKE_CACHE, tmp_path / "results")
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"), "--directory", str(tmp_path),
               "--configfile", str(CONFIGS / "paper.yaml"), "--report", str(tmp_path / "report.html")]
    refused = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=offline)
    assert refused.returncode != 0 and "is not available" in refused.stderr, refused.stderr[-2000:]
    made = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**offline, "TRACE_PREFLIGHT": "1"})
    assert made.returncode == 0, made.stderr[-3000:]
    check_html_report(tmp_path / "report.html", tmp_path / "results", "paper")
    assert not (tmp_path / "results" / "base").exists()  # nothing planned was made
