"""The Snakemake DAG: the default study lists every stage; bad config is rejected by the schema."""
import subprocess
import sys

from conftest import REPO_ROOT


def snakemake(*args, workdir):
    """Snakemake on the repo's Snakefile, with a scratch working directory (results go there)."""
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"),
                           "--directory", str(workdir), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def test_dry_run_lists_the_whole_toy_study(tmp_path):
    result = snakemake(workdir=tmp_path, *("-n", "--cores", "2", "--forceall", "--quiet", "rules"))
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    for rule, count in [("toy_data", 1), ("toy_base", 2), ("train", 2), ("evaluate", 20),
                        ("aggregate", 1), ("report", 1)]:
        assert any(line.split() == [rule, str(count)] for line in out.splitlines()), (rule, out[-1500:])


def test_more_methods_and_seeds_widen_the_grid(tmp_path):
    result = snakemake(workdir=tmp_path, *("-n", "--cores", "2", "--forceall", "--quiet", "rules",
                       "--config", "methods=[grpo,trace_fkl,sdpo]", "seeds=[0,1]"))
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    # 2 models x 3 methods x 2 seeds runs; evaluations: 2 models x (1 base + 6 runs) x 5 benchmarks
    assert any(line.split() == ["train", "12"] for line in out.splitlines()), out[-1500:]
    assert any(line.split() == ["evaluate", "70"] for line in out.splitlines()), out[-1500:]


def test_invalid_config_names_the_offending_key(tmp_path):
    result = snakemake("-n", "--cores", "1", "--config", "methods=[grpo,not_a_method]", workdir=tmp_path)
    assert result.returncode != 0
    assert "not_a_method" in result.stdout + result.stderr
