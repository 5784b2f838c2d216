"""lm-eval task configs for the project's normalised JSONL eval sets (spec §6: avg@k).

:func:`write_task_config` writes one YAML per benchmark. The YAML points at functions in this
module through ``!function trace.evaluation.lmeval_tasks.<name>`` (lm-eval 0.4.13 imports
dotted names that are not files next to the YAML), so lm-eval must run in a process where
``trace`` is this project — as :mod:`trace.evaluation.run` does; from the lm-eval CLI put the
repository root first on ``PYTHONPATH``.

Why each piece is there:

* ``custom_dataset`` (:func:`load_records_dataset`) instead of ``dataset_path: json``: the
  ``json`` builder resolves relative ``data_files`` against the working directory, caches
  under ``~/.cache``, and infers an Arrow schema per file — which breaks on the free-form
  ``meta`` dicts. Our loader reads the file at an absolute path and keeps a fixed schema.
* ``repeats: k`` asks for k samples per problem, but lm-eval's default filter
  (``take_first``) would then score only the first. The ``take_first_k`` filter with k keeps
  all of them, and :func:`process_results` grades every sample with :mod:`trace.verify`
  (the same checker as the RL reward).
* The prompt is ``user_message(record)`` sent through the model's own chat template
  (``apply_chat_template=True`` in ``simple_evaluate``); thinking on/off is a model argument
  there, see :mod:`trace.evaluation.run`. The result equals ``trace.prompting.render_prompt``.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Sequence

import yaml

from trace.prompting import user_message
from trace.verify import grade_many

REQUIRED_FIELDS = ("id", "problem", "answer", "kind")
KINDS = ("math", "mc")
GEN_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens")
# Qwen3 ends an assistant turn with <|im_end|>; <|endoftext|> is its document end. lm-eval
# also adds the tokenizer's eos token by itself.
STOP_SEQUENCES = ["<|im_end|>", "<|endoftext|>"]
FILTER_NAME = "all_samples"  # the lm-eval filter key under which the k samples are scored
METRICS = ("avg_at_k", "pass_at_k", "sample_grades")
_THIS_MODULE = __name__  # "trace.evaluation.lmeval_tasks"


class EvalDataError(ValueError):
    """An eval JSONL file is missing or does not hold normalised records."""


# ---------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------

def read_eval_records(data_path: Path) -> list[dict]:
    """Records of a normalised JSONL file, checked, in the fixed schema lm-eval sees.

    ``meta`` (free-form per source) travels as a JSON string so Arrow needs no schema for it.
    """
    data_path = Path(data_path)
    if not data_path.is_file():
        raise EvalDataError(f"eval data file {data_path} not found; run the data preparation step first")
    records, seen_ids = [], set()
    with open(data_path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{data_path}:{line_number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise EvalDataError(f"{where}: not valid JSON ({error})") from None
            missing = [key for key in REQUIRED_FIELDS if raw.get(key) in (None, "")]
            if missing:
                raise EvalDataError(f"{where}: record lacks required field(s) {missing}")
            if raw["kind"] not in KINDS:
                raise EvalDataError(f"{where}: kind must be one of {KINDS}, got {raw['kind']!r}")
            if raw["kind"] == "mc" and not raw.get("choices") and "(A)" not in raw["problem"]:
                raise EvalDataError(f"{where}: multiple-choice record without choices")
            record_id = str(raw["id"])
            if record_id in seen_ids:
                raise EvalDataError(f"{where}: duplicate record id {record_id!r}")
            seen_ids.add(record_id)
            records.append({
                "id": record_id,
                "problem": str(raw["problem"]),
                "solution": raw.get("solution"),
                "answer": str(raw["answer"]),
                "kind": raw["kind"],
                "choices": [str(choice) for choice in raw["choices"]] if raw.get("choices") else None,
                "source": raw.get("source"),
                "meta_json": json.dumps(raw.get("meta") or {}, ensure_ascii=False, sort_keys=True),
            })
    if not records:
        raise EvalDataError(f"eval data file {data_path} holds no records")
    return records


def load_records_dataset(data_path: str, **_lm_eval_metadata: Any):
    """lm-eval ``custom_dataset`` hook: the JSONL file as a one-split ("test") DatasetDict.

    lm-eval also passes the task's ``metadata`` entries as keyword arguments; they are ignored.
    """
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_eval_records(Path(data_path)))})


# ---------------------------------------------------------------------------------------
# Prompt and scoring hooks (referenced from the YAML)
# ---------------------------------------------------------------------------------------

def doc_to_text(doc: dict) -> str:
    """The user turn; lm-eval wraps it in the model's chat template."""
    return user_message(doc)


def grade_responses(doc: dict, responses: Sequence[str]) -> list[bool]:
    """Grade each sampled response against the doc's gold with the project's one checker."""
    return grade_many(list(responses), [doc["answer"]] * len(responses), [doc["kind"]] * len(responses))


def process_results(doc: dict, results: list) -> dict:
    """Score ALL k samples of one problem.

    With the ``take_first_k`` filter lm-eval hands over ``[[response_1, ..., response_k]]``
    (one request per doc, its k filtered responses).
    """
    if len(results) != 1 or not isinstance(results[0], (list, tuple)):
        raise ValueError(f"doc {doc.get('id')!r}: expected [[k responses]] from the {FILTER_NAME!r} filter, "
                         f"got {type(results[0]).__name__ if results else 'nothing'}; is the task's "
                         f"filter_list missing (lm-eval would then keep only the first sample)?")
    responses = list(results[0])
    grades = grade_responses(doc, responses)
    n_correct = sum(grades)
    return {
        "avg_at_k": n_correct / len(grades),
        "pass_at_k": float(n_correct > 0),  # unbiased pass@k with n == k samples
        "sample_grades": [int(ok) for ok in grades],  # kept per doc in the logged samples
    }


def mean_over_samples(per_doc_grades: Sequence[Sequence[int]]) -> float:
    """Aggregation of ``sample_grades``: accuracy over all samples (= avg@k when k is fixed)."""
    flat = [grade for grades in per_doc_grades for grade in grades]
    return sum(flat) / len(flat) if flat else float("nan")


# ---------------------------------------------------------------------------------------
# Task YAML
# ---------------------------------------------------------------------------------------

class _FunctionRef(str):
    """A string dumped as the YAML tag ``!function <dotted name>``."""


class _TaskDumper(yaml.SafeDumper):
    """SafeDumper that also writes :class:`_FunctionRef` (a subclass, so the global one is untouched)."""


_TaskDumper.add_representer(_FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))


def _function(name: str) -> _FunctionRef:
    return _FunctionRef(f"{_THIS_MODULE}.{name}")


def check_gen(gen: dict) -> dict:
    """The sampling settings with their types checked (keys: GEN_KEYS)."""
    missing = [key for key in GEN_KEYS if key not in gen]
    unknown = sorted(set(gen) - set(GEN_KEYS))
    if missing or unknown:
        raise ValueError(f"gen settings: missing {missing}, unknown {unknown}; expected exactly {list(GEN_KEYS)}")
    checked = {"temperature": float(gen["temperature"]), "top_p": float(gen["top_p"]),
               "top_k": int(gen["top_k"]), "max_new_tokens": int(gen["max_new_tokens"])}
    if checked["temperature"] <= 0:
        raise ValueError(f"gen settings: temperature must be > 0 for k sampled answers, got {gen['temperature']}")
    if checked["max_new_tokens"] < 1:
        raise ValueError(f"gen settings: max_new_tokens must be >= 1, got {gen['max_new_tokens']}")
    return checked


def task_config(task_name: str, data_path: Path, *, k: int, gen: dict, thinking: bool) -> dict:
    """The lm-eval task config as a dict (what :func:`write_task_config` writes)."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", task_name):
        raise ValueError(f"task name {task_name!r}: use letters, digits, '_' and '-' only")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    data_path = Path(data_path).resolve()  # absolute: lm-eval may run from any directory
    records = read_eval_records(data_path)  # fail here, naming the file, not deep inside lm-eval
    gen = check_gen(gen)
    return {
        "task": task_name,
        "custom_dataset": _function("load_records_dataset"),
        "dataset_kwargs": {"data_path": str(data_path)},
        "test_split": "test",
        "output_type": "generate_until",
        "num_fewshot": 0,
        "doc_to_text": _function("doc_to_text"),
        "doc_to_target": "answer",
        "process_results": _function("process_results"),
        "repeats": int(k),
        "generation_kwargs": {
            "do_sample": True,
            "temperature": gen["temperature"],
            "top_p": gen["top_p"],
            "top_k": gen["top_k"],
            "max_gen_toks": gen["max_new_tokens"],
            "until": list(STOP_SEQUENCES),
        },
        "filter_list": [{"name": FILTER_NAME, "filter": [{"function": "take_first_k", "k": int(k)}]}],
        "metric_list": [
            {"metric": "avg_at_k", "aggregation": "mean", "higher_is_better": True},
            {"metric": "pass_at_k", "aggregation": "mean", "higher_is_better": True},
            {"metric": "sample_grades", "aggregation": _function("mean_over_samples"), "higher_is_better": True},
        ],
        # Provenance only: thinking is applied by the model's chat template (see run.py).
        "metadata": {"version": 1, "thinking": bool(thinking), "n_records": len(records),
                     "data_sha256": hashlib.sha256(data_path.read_bytes()).hexdigest()},
    }


def write_task_config(task_name: str, data_path: Path, out_dir: Path, *, k: int, gen: dict,
                      thinking: bool) -> Path:
    """Write ``out_dir/<task_name>.yaml`` and return its path.

    ``out_dir`` is passed to lm-eval as ``include_path``; keep one directory per run so no
    stale YAML of an earlier run is picked up under the same task name.
    """
    config = task_config(task_name, data_path, k=k, gen=gen, thinking=thinking)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{task_name}.yaml"
    path.write_text(yaml.dump(config, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True, width=120))
    return path
