"""trace/study_plan.py: the study grid the rule files wire (which runs, which files, which settings each job
gets), on the real toy, paper and paper-smoke configs; and that the rules pass exactly what it plans."""
import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
import sys

import pytest

from conftest import REPO_ROOT
from trace.launch import train_resources
from trace.methods import get_method
from trace.study_config import job_resources, load_study, validate
from trace.study_plan import REBUILD_MARKER, WILDCARD_CONSTRAINTS, StudyPlan, StudyPlanError

CONFIGS = REPO_ROOT / "workflow" / "configs"
TABLE2 = ["grpo", "trace_fkl", "trace_rkl", "sdpo", "srpo", "rlsd"]
TIERS = ["trace_fkl@self", "trace_fkl@frozen", "trace_fkl@static"]
MASKS = ["alltoken_decay", "random25", "inverted25"]


def study_config(*files, **overrides):
    """The validated config the Snakefile builds (study file + override files + --config items)."""
    study = load_study(REPO_ROOT, [CONFIGS / name for name in files], overrides)
    return validate(study, REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml")


def plan_of(*files, **overrides):
    return StudyPlan(study_config(*files, **overrides), REPO_ROOT, get_method)


@pytest.fixture(scope="module")
def toy():
    return plan_of()


@pytest.fixture(scope="module")
def paper():
    return plan_of("paper.yaml")


def test_loads_by_path_on_its_own_like_the_snakefile_does():
    path = REPO_ROOT / "trace" / "study_plan.py"
    tree = ast.parse(path.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or ".").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= set(sys.stdlib_module_names) - {"trace"}, imported
    spec = importlib.util.spec_from_file_location("plan_by_path", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["plan_by_path"] = module
    try:
        spec.loader.exec_module(module)
        assert module.StudyPlan(study_config(), REPO_ROOT, get_method).runs_of("toy-large") == TABLE2
    finally:
        del sys.modules["plan_by_path"]


def test_run_names_of_the_toy_and_paper_studies(toy, paper):
    assert toy.runs_of("toy-small") == TABLE2 + TIERS + MASKS
    assert toy.runs_of("toy-large") == TABLE2
    assert paper.runs_of("qwen3-8b") == TABLE2 + TIERS
    assert paper.runs_of("qwen3-1.7b") == TABLE2 + MASKS
    assert len(toy.all_training_metrics()) == len(paper.all_training_metrics()) == 18
    assert toy.all_training_metrics()[0] == "results/train/toy-large/grpo/seed0/metrics.jsonl"
    assert "results/train/qwen3-8b/trace_fkl@frozen/seed0/metrics.jsonl" in paper.all_training_metrics()
    # a mask method already among the main methods is trained once
    assert plan_of(methods=["grpo", "random25"]).runs_of("toy-small") == ["grpo", "random25"] + TIERS + [
        "alltoken_decay", "inverted25"]
    assert plan_of(seeds=[0, 1]).all_training_metrics()[:2] == [
        "results/train/toy-large/grpo/seed0/metrics.jsonl", "results/train/toy-large/grpo/seed1/metrics.jsonl"]


def test_evaluation_files_one_per_policy_and_benchmark(toy, paper):
    assert toy.benchmarks == ["arith_2op", "arith_3op", "arith_4op", "arith_5op", "choice_ood"]
    assert toy.evaluations_of("toy-large", ["grpo"]) == (
        [f"results/eval/toy-large/base/{b}.json" for b in toy.benchmarks]
        + [f"results/eval/toy-large/grpo-seed0/{b}.json" for b in toy.benchmarks])
    assert len(toy.all_evaluations()) == 20 * 5 and len(paper.all_evaluations()) == 20 * 5
    assert paper.evaluation_outputs() == [f"results/eval/{{model}}/{{policy}}/{b}.json"
                                          for b in ["math500", "aime24", "aime25", "amc23", "gpqa_diamond"]]
    assert paper.evaluation_data_arg().split()[0] == "math500=results/data/real/math500.jsonl"
    assert toy.evaluation_data_arg().split()[-1] == "choice_ood=results/data/toy/choice_ood.jsonl"
    assert toy.trained_model_of("toy-small", "base") is None
    assert toy.trained_model_of("toy-small", "trace_fkl@frozen-seed12") == \
        "results/train/toy-small/trace_fkl@frozen/seed12/model"


def test_tier_runs_merge_the_tier_into_train_annotator(toy, paper):
    method, annotator = toy.method_and_annotator("trace_fkl@frozen")
    assert method == "trace_fkl"
    assert annotator == {**toy.config["train"]["annotator"], "tier": "frozen", "model": "results/base/toy-large"}
    assert toy.config["train"]["annotator"]["tier"] == "toy_oracle"  # the config itself is left alone
    method, annotator = paper.method_and_annotator("trace_fkl@frozen")
    assert (method, annotator["tier"], annotator["mode"], annotator["model"]) == (
        "trace_fkl", "frozen", "prompted", "results/base/qwen3-32b")
    assert paper.method_and_annotator("sdpo") == ("sdpo", paper.config["train"]["annotator"])
    with pytest.raises(ValueError, match=r"^run 'trace_fkl@bogus': tier 'bogus' is not in "
                                         r"ablations.annotator_tiers.tiers$"):
        toy.method_and_annotator("trace_fkl@bogus")
    assert toy.built_annotator("trace_fkl@frozen") == "results/base/toy-large"
    assert toy.built_annotator("trace_fkl") is None and toy.built_annotator() is None
    assert toy.base_of("results/base/toy-large") == "toy-large" and toy.base_of("/models/x") is None


def test_train_settings_are_train_without_parallel_plus_the_run(toy, paper):
    def as_the_rule_built_them(plan, run, seed):  # workflow/rules/train.smk before the plan existed
        config = plan.config
        method, annotator = plan.method_and_annotator(run)
        train = {key: value for key, value in config["train"].items() if key != "parallel"}
        # since OPD and TRB: only the runs that read them carry train.teacher_model, train.guidance, train.trb
        for key in get_method(method).unused_train_keys:
            train.pop(key, None)
        settings = {**train, "method": method, "annotator": annotator, "seed": int(seed),
                    "thinking": config["thinking"], "teacher_check_on_worse": config["teacher_check"]["on_worse"]}
        if config["study"] != "toy":
            settings["train_source"] = config["real_data"]["train_source"]
        return settings

    for plan in (toy, paper, plan_of("paper_smoke.yaml")):
        for model in plan.models:
            for run in plan.runs_of(model):
                assert plan.train_settings(run, "0") == as_the_rule_built_them(plan, run, "0"), run
    settings = paper.train_settings("trace_fkl@frozen", "3")
    assert "parallel" not in settings and "parallel" in paper.config["train"]
    assert (settings["method"], settings["seed"], settings["train_source"], settings["thinking"]) == (
        "trace_fkl", 3, "openthoughts", True)
    assert settings["annotator"]["model"] == "results/base/qwen3-32b"
    assert settings["teacher_check_on_worse"] == "refuse"
    assert "train_source" not in toy.train_settings("grpo", 0)
    assert not {"teacher_model", "guidance", "trb"} & set(toy.train_settings("grpo", 0))   # a paper method's params


def test_gpu_count_check_names_resources_train_gpus(paper):
    assert paper.train_gpus_problem(train_resources(paper.config["train"])) is None
    four = plan_of("paper.yaml", resources={"train": {"gpus": 4}})
    assert four.train_gpus_problem(train_resources(four.config["train"])) == (
        "resources.train.gpus = 4 but train.parallel runs 8 GPU process(es) per node (train.device 'cuda'): "
        "make them equal")
    toy = plan_of()
    assert toy.train_gpus_problem(train_resources(toy.config["train"])) is None  # CPU: 0 = 0


def test_train_resources_count_the_whole_jobs_gpus(paper):
    one = paper.train_resources(job_resources(paper.config, "train", REPO_ROOT), train_resources(paper.config["train"]))
    assert (one["nodes"], one["tasks"], one["gpu"], one["cpus_per_task"]) == (1, 1, 8, 192)
    assert "mpi" not in one
    two = plan_of("paper.yaml", train={"parallel": {"nodes": 2, "procs_per_node": 8}})
    resources = two.train_resources(job_resources(two.config, "train", REPO_ROOT), train_resources(two.config["train"]))
    assert (resources["nodes"], resources["tasks"], resources["gpu"], resources["mpi"]) == (2, 2, 16, "srun")
    toy = plan_of()
    resources = toy.train_resources(job_resources(toy.config, "train", REPO_ROOT), train_resources(toy.config["train"]))
    assert (resources["nodes"], resources["tasks"], resources["gpu"], resources["runtime"]) == (1, 1, 0, 240)


def test_teacher_checks_one_per_base_and_context(toy, paper):
    assert toy.teacher_context_of("grpo") is None
    assert toy.teacher_context_of("trace_fkl@static") == "label" and toy.teacher_context_of("sdpo") == "reference"
    assert toy.teacher_contexts("toy-small") == ["label", "reference"]
    assert paper.all_teacher_gaps() == [f"results/teacher_gap/{model}/{context}.json"
                                        for model in ("qwen3-8b", "qwen3-1.7b") for context in ("label", "reference")]
    grpo_only = plan_of(methods=["grpo"], ablations=None, train={"probe": {"steps": []}})
    assert grpo_only.all_teacher_gaps() == []
    assert grpo_only.teacher_check_inputs("toy-small", "grpo") == {}
    inputs = toy.teacher_check_inputs("toy-small", "srpo")
    assert inputs == {"gap": "results/teacher_gap/toy-small/reference.json",
                      "probe_batch": "results/teacher_gap/toy-small/label.probe.pt"}
    assert toy.teacher_check_args(inputs) == ("--teacher-gap results/teacher_gap/toy-small/reference.json "
                                              "--probe-batch results/teacher_gap/toy-small/label.probe.pt")
    settings = paper.teacher_gap_settings("qwen3-8b", "label")
    assert (settings["context"], settings["model"], settings["train"]["seed"]) == ("label", "qwen3-8b", 0)
    assert "parallel" not in settings["train"] and settings["teacher_check"]["n_prompts"] == 32


def test_an_external_teacher_is_an_input_of_its_runs_and_has_no_teacher_check():
    """OPD's teacher (train.teacher_model) is built before the runs that read it when it lies under results/ (a
    base, or a trained run's model/); its runs' settings name it, other runs' settings do not (a new teacher
    reruns only the OPD runs); and it asks for no teacher check (that compares a self-teacher with the student)."""
    no_family = {"opd_family": None}  # the default study's opd_family has its own teacher (tests/test_opd_family.py)
    opd = plan_of(methods=["grpo", "opd", "opd_k1"], train={"teacher_model": "results/base/toy-large"},
                  ablations=no_family)
    assert opd.teacher_model_of("opd") == opd.built_teacher("opd_k1") == "results/base/toy-large"
    assert opd.teacher_model_of("grpo") is None and opd.built_teacher("trace_fkl@frozen") is None
    assert opd.teacher_context_of("opd") is None and opd.teacher_context_of("trace_fkl") == "label"
    assert opd.teacher_check_inputs("toy-small", "opd") == {"probe_batch": "results/teacher_gap/toy-small/label.probe.pt"}
    assert opd.teacher_contexts("toy-large") == ["label"]  # the probe's fixed batch only
    assert opd.train_settings("opd", 0)["teacher_model"] == "results/base/toy-large"
    assert "teacher_model" not in opd.train_settings("grpo", 0)
    assert not {"teacher_model", "tropd", "guidance", "trb"} & set(opd.teacher_gap_settings("toy-small", "label")["train"])
    assert opd.teacher_problem() is None
    trained = plan_of(methods=["opd"], train={"teacher_model": "results/train/toy-large/grpo/seed0/model"},
                      ablations=no_family)
    assert trained.built_teacher("opd") == "results/train/toy-large/grpo/seed0/model"
    outside = plan_of(methods=["opd"], train={"teacher_model": "/models/qwen3-8b"}, ablations=no_family)
    assert outside.teacher_model_of("opd") == "/models/qwen3-8b" and outside.built_teacher("opd") is None
    # the default study: no OPD run, the key is null and no run's settings carry it (its params are unchanged)
    assert all("teacher_model" not in plan_of().train_settings(run, 0) for run in plan_of().runs_of("toy-small"))
    assert plan_of().teacher_problem() is None
    assert plan_of(methods=["grpo", "opd"], ablations=no_family).teacher_problem() == (
        "method opd distils from an external teacher: set train.teacher_model (a model folder with the student's "
        "tokenizer, e.g. results/base/<larger base>)")
    assert plan_of(methods=["opd_topk"], train={"teacher_model": "results/base/toy-large"}).teacher_problem() == (
        "method opd_topk distils on the teacher's top-K: set train.kl.top_k (it is null)")
    assert plan_of(methods=["opd_topk"], train={"teacher_model": "results/base/toy-large",
                                                "kl": {"top_k": 20}}).teacher_problem() is None
    # the paper study: a pinned base as the teacher enters the run's base identity (its folder is ancient)
    paper_opd = plan_of("paper.yaml", methods=["grpo", "opd"], train={"teacher_model": "results/base/qwen3-8b"})
    assert paper_opd.train_bases("qwen3-1.7b", "opd") == paper_opd.base_identity("qwen3-1.7b", "qwen3-8b")
    assert paper_opd.train_bases("qwen3-1.7b", "grpo") == paper_opd.base_identity("qwen3-1.7b")


def test_base_identity_pins_paper_bases_only(toy, paper):
    assert toy.base_identity("toy-small") == "" and not toy.pinned_bases
    assert paper.pinned_bases and re.fullmatch(r"[0-9a-f]{16}", paper.base_identity("qwen3-8b"))
    assert paper.base_identity("qwen3-8b") != paper.base_identity("qwen3-1.7b")
    assert paper.train_bases("qwen3-8b", "trace_fkl@frozen") == paper.base_identity("qwen3-8b", "qwen3-32b")
    assert paper.train_bases("qwen3-8b", "trace_fkl") == paper.base_identity("qwen3-8b")
    assert paper.evaluation_bases("qwen3-8b", "base") == paper.base_identity("qwen3-8b")
    assert paper.evaluation_bases("qwen3-8b", "grpo-seed0") == ""


def test_data_and_model_settings(toy, paper):
    assert (toy.data_dir, toy.train_data, toy.val_data) == (
        "results/data/toy", "results/data/toy/train.jsonl", "results/data/toy/val.jsonl")
    assert (paper.train_data, paper.val_data) == ("results/data/real/train/train.jsonl", "results/data/real/train/val.jsonl")
    assert toy.toy_data_files()[:3] == [f"results/data/toy/{s}.jsonl" for s in ("train", "sft", "val")]
    assert toy.mirror_dir() == str((REPO_ROOT / "../shared/data").resolve()) and paper.mirror_dir() is None
    assert paper.train_data_settings() == {"mirror_dir": None, "max_rows": 30000, "val_rows": 500, "seed": 0,
                                           "source": "openthoughts"}
    assert toy.toy_base_settings("toy-small")["size"]["hidden_size"] == 64
    assert toy.toy_base_settings("toy-small")["tokenizer_vocab"] == 700
    assert paper.section_of("qwen3-32b") == "annotator_models" and paper.section_of("qwen3-8b") == "models"
    assert paper.base_model_pattern() == r"qwen3\-8b|qwen3\-1\.7b|qwen3\-32b"
    assert paper.base_model_inputs("qwen3-8b") == ["results/.rebuild/base_model/qwen3-8b"]
    assert paper.base_model_inputs("qwen3-8b", preflight=True) == [] and paper.base_model_data_arg("qwen3-8b") == ""
    smoke = plan_of("paper_smoke.yaml")
    model = smoke.models[0]
    assert smoke.base_model_inputs(model) == [REBUILD_MARKER.format(model=model), "results/data/real/train/train.jsonl"]
    assert smoke.base_model_data_arg(model) == "--train-data results/data/real/train/train.jsonl"
    assert os.path.isabs(smoke.base_entries[model]["init"]["config"])
    assert smoke.base_model_settings(model)["section"] == "models"


def test_unprepared_benchmarks_are_a_config_problem(paper):
    assert paper.data_problem() is None and plan_of().data_problem() is None
    assert plan_of("paper.yaml", real_data={"eval_sets": ["math500"]}).data_problem() == (
        "eval.benchmarks ['aime24', 'aime25', 'amc23', 'gpqa_diamond'] are not prepared: add them to "
        "real_data.eval_sets")


def test_check_bases_fails_on_the_first_unavailable_and_marks_broken_bases(paper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    notes, unavailable = [], set()

    def availability(name, entry, out_dir, section):
        return f"model {name} is not available ({section})" if name in unavailable else None

    def repair(name, out_dir):
        return f"model {name}: {out_dir} has no weights" if name == "qwen3-1.7b" else None

    paper.check_bases(availability, repair, preflight=True, main_process=True, note=notes.append)
    assert notes == [] and not (tmp_path / "results").exists()  # preflight reports problems itself
    paper.check_bases(availability, repair, preflight=False, main_process=True, note=notes.append)
    assert notes == ["rebuilding: model qwen3-1.7b: results/base/qwen3-1.7b has no weights; its base_model job "
                     "reruns, finished runs and evaluations on it are kept"]
    markers = {name: tmp_path / REBUILD_MARKER.format(model=name) for name in ("qwen3-8b", "qwen3-1.7b", "qwen3-32b")}
    assert markers["qwen3-8b"].stat().st_mtime == 0 and markers["qwen3-1.7b"].stat().st_mtime > 0
    unavailable.add("qwen3-32b")
    with pytest.raises(StudyPlanError, match=r"^model qwen3-32b is not available \(annotator_models\)$"):
        paper.check_bases(availability, repair, preflight=False, main_process=False, note=notes.append)


def test_wildcards_accept_the_grid_names(toy, paper):
    for plan in (toy, paper):
        for model in plan.models:
            assert re.fullmatch(WILDCARD_CONSTRAINTS["model"], model)
            for run in plan.runs_of(model):
                assert re.fullmatch(WILDCARD_CONSTRAINTS["method"], run)


def test_the_train_rule_passes_the_planned_settings(toy, tmp_path):
    target = "results/train/toy-small/trace_fkl@frozen/seed0/metrics.jsonl"
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"), "--directory",
                             str(tmp_path), "-n", "-p", "--cores", "1", target], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    command = next(line for line in result.stdout.splitlines() if "-m trace train" in line)
    cfg = shlex.split(command)[shlex.split(command).index("--cfg") + 1]
    assert cfg == json.dumps(toy.train_settings("trace_fkl@frozen", 0), sort_keys=True)
    assert "--teacher-gap results/teacher_gap/toy-small/label.json" in command
    assert "--probe-batch results/teacher_gap/toy-small/label.probe.pt" in command


def test_report_outputs_and_their_report_entries(toy, paper):
    """Every table and figure the report rule declares has a category and an existing caption; the paper study
    adds its beside-the-paper tables, a study without an ablation leaves its files out."""
    from trace.study_plan import REPORT_ENTRIES

    toy_files = [f for value in toy.report_outputs("results").values() for f in ([value] if isinstance(value, str) else value)]
    paper_files = [f for value in paper.report_outputs("R").values() for f in ([value] if isinstance(value, str) else value)]
    assert "results/tables/annotator_tiers.md" in toy_files and "results/figures/mask_localisation.png" in toy_files
    assert not any("vs_paper" in f or "paper_figure" in f for f in toy_files)
    assert {"R/tables/main_results_vs_paper.csv", "R/tables/paper_figure_numbers.md"} <= set(paper_files)
    for path in toy_files + paper_files:
        category, _, caption = toy.report_entry(path)
        assert (REPO_ROOT / "workflow" / "report" / Path(caption).name).is_file() and category
    assert toy.report_entry("results/tables/main_results.csv")[0] == "Table 2: main results"
    assert {key.split("/")[0] for key in REPORT_ENTRIES} == {"tables", "figures"}
    with pytest.raises(StudyPlanError, match=r"^results/tables/unknown\.md: no entry in REPORT_ENTRIES"):
        toy.report_entry("results/tables/unknown.md")
    assert toy.report_outputs("results")["calibration"] == ["results/tables/calibration.md",
                                                            "results/tables/calibration.csv",
                                                            "results/figures/calibration.png"]
    no_ablations = plan_of(ablations=None)
    assert not no_ablations.report_outputs("results")["ablations"]
    assert no_ablations.report_settings()["methods"] == toy.methods
    assert paper.report_settings()["compare_to_paper"] is True and paper.report_settings()["paper_models"]


def test_calibration_bins_reach_the_evaluation_and_the_report_only_when_set(toy):
    """Unset (config.yaml), the jobs take the schema's default and the evaluate rule's params stay as they were
    (finished evaluations are kept); set, both the evaluations and the report get it."""
    assert "calibration_bins" not in toy.evaluation_settings() and "calibration_bins" not in toy.report_settings()
    binned = plan_of(eval={**toy.config["eval"], "calibration_bins": 15})
    assert binned.evaluation_settings()["calibration_bins"] == 15 and binned.report_settings()["calibration_bins"] == 15
    with pytest.raises(Exception, match="calibration_bins"):
        plan_of(eval={**toy.config["eval"], "calibration_bins": 0})
