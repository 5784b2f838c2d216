"""The fast test set stays fast (tests/conftest.py): tests that use a model fixture or a real SLURM are
marked slow at collection, a fast test that spawns anything but a cheap command fails, and the default
`pytest` (pyproject.toml's addopts) selects only fast tests."""
import subprocess
import sys

import pytest

from conftest import MODEL_FIXTURES, REPO_ROOT, cheap_command


@pytest.mark.parametrize("argv, allowed", [
    ([sys.executable, "-m", "snakemake", "-s", "Snakefile", "-n", "--cores", "1"], "a Snakemake dry run"),
    ("python -m snakemake --dry-run --profile slurm", "a Snakemake dry run"),
    (["sinfo", "-h", "-o", "%P %t"], "a SLURM query"),
    (["bash", str(REPO_ROOT / "scripts" / "install_profile.sh")], "the SLURM profile installer"),
    ([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import trace.verify as v; "
                            "v.worker_loop(int(sys.argv[2]))", str(REPO_ROOT), "2"], "the grader's worker"),
    ([sys.executable, "-m", "snakemake", "-s", "Snakefile", "--cores", "2", "real_data"], None),
    ([sys.executable, "-m", "trace", "train", "--cfg", "{}"], None),
    ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trace", "train"], None),
    ([sys.executable, str(REPO_ROOT / "scripts" / "gpu_check.py")], None),
    ([sys.executable, "-c", "import torch"], None),
])
def test_only_planning_and_lookups_count_as_cheap(argv, allowed):
    assert cheap_command(argv) == allowed


def test_a_fast_test_that_spawns_a_process_fails_naming_it():
    with pytest.raises(pytest.fail.Exception, match=r"a fast test spawned `.* -c pass`; mark it @pytest.mark.slow"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_lm_evals_environment_report_may_spawn_its_queries():
    from lm_eval.loggers.utils import get_git_commit_hash

    commit = get_git_commit_hash()  # spawns `git describe`: allowed (the guard would fail this test)
    assert bool(commit) == (REPO_ROOT / ".git").exists()


@pytest.mark.slow
def test_a_slow_test_may_spawn_anything():
    assert subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout == "42\n"


def test_tests_using_a_model_fixture_are_slow_and_the_default_run_leaves_them_out(request):
    items = request.session.items
    assert request.node in items
    for item in items:
        if set(MODEL_FIXTURES) & set(item.fixturenames) or item.get_closest_marker("slurm"):
            assert item.get_closest_marker("slow"), item.nodeid
    default = request.config.getini("addopts")  # pyproject.toml
    assert default[default.index("-m") + 1] == "not slow"
    if request.config.option.markexpr == "not slow":  # the default run: no slow test was selected
        assert not [item.nodeid for item in items if item.get_closest_marker("slow")]
    else:  # the full run (.ci/run) selects every test, this module's slow one included
        assert any(item.name == "test_a_slow_test_may_spawn_anything" for item in items)


def test_the_readme_and_ci_run_the_same_two_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "-m 'slow or not slow'" in ci and "--durations=25" in ci
    assert f"\n{ci}\n" in readme  # .ci/run calls exactly the README's full test command
    fast = ci.replace(" -m 'slow or not slow'", "").replace(" --durations=25", "")
    assert f"\n{fast}\n" in readme and fast != ci


def test_the_model_fixtures_named_for_marking_exist():
    source = (REPO_ROOT / "tests" / "conftest.py").read_text()
    assert all(f"def {name}(" in source for name in MODEL_FIXTURES)  # renaming one would unmark its tests
