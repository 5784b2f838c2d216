"""Turn the benchmark and training files into the project's normalised JSONL records.

Record format (one JSON object per line; the toy world writes the same keys):

    id        str, unique within the file
    problem   str; for multiple choice the question WITHOUT the options
    solution  str | None, a worked reference solution when the source has one
    answer    str, the gold ("25", "\\frac{14}{3}"; the letter for multiple choice)
    kind      "math" | "mc"
    choices   list[str] in the shuffled order for "mc", else None
    source    str, e.g. "math500", "aime24"
    meta      dict of source-specific extras (answer_raw, subject, choice_order, ...)

Sources: a local mirror laid out like ``shared/data`` (config key ``data.mirror_dir``;
see shared/data/README.md and each PROVENANCE.md), or, when no mirror is given, the
Hugging Face hub. Only the mirror branch is exercised by the tests.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

from trace.verify import last_boxed_content

log = logging.getLogger(__name__)

MIRROR_KEY = "data.mirror_dir"
EXPECTED_ROWS = {
    "math500": 500,
    "aime24": 30,
    "aime25": 30,
    "amc23": 40,
    "gpqa_diamond": 198,
    "minerva": 272,
    "olympiadbench": 675,
}
MAIN_EVAL_SETS = ("math500", "aime24", "aime25", "amc23", "gpqa_diamond")  # spec §6
MC_LETTERS = "ABCD"

# GPQA is distributed as a password-protected zip so that it does not leak into web-crawled
# training data; the password is published in the GPQA README (see gpqa/PROVENANCE.md).
GPQA_ZIP_PASSWORD = b"deserted-untie-orchid"
GPQA_DIAMOND_MEMBER = "dataset/gpqa_diamond.csv"

OPENTHOUGHTS_ID = "open-thoughts/OpenThoughts-114k"


class DataSourceError(ValueError):
    """A dataset could not be read (missing mirror file, hub unreachable, bad row count)."""


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------

def make_record(id: str, problem: str, answer: str, kind: str, source: str, *,
                solution: str | None = None, choices: list[str] | None = None,
                meta: dict | None = None) -> dict:
    if kind not in ("math", "mc"):
        raise ValueError(f"record {id!r} of {source}: kind must be 'math' or 'mc', got {kind!r}")
    return {"id": str(id), "problem": problem, "solution": solution, "answer": answer,
            "kind": kind, "choices": choices, "source": source, "meta": meta or {}}


def normalise_answer(raw) -> str:
    """Gold answer as a clean string: 27.0 -> "27", "025" -> "25", LaTeX kept as written."""
    if isinstance(raw, bool):
        raise ValueError(f"boolean gold answer {raw!r}")
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, float):
        return str(int(raw)) if raw.is_integer() else repr(raw)
    text = str(raw).strip()
    if text.isdigit():
        return str(int(text))  # AIME writes answers as three digits
    return text


def _mirror_file(mirror_dir: Path, relative: str) -> Path:
    path = Path(mirror_dir) / relative
    if not path.exists():
        raise DataSourceError(
            f"{path} not found. The config key {MIRROR_KEY} (= {mirror_dir}) must point at a copy "
            f"of the shared data folder laid out as in shared/data/README.md")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataSourceError(f"{path}:{line_number}: not valid JSON ({error})") from None
    return rows


def _field(row: dict, names: Iterable[str], where: str):
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise DataSourceError(f"{where}: none of the fields {list(names)} present (fields: {sorted(row)})")


def _boxed_answer(solution: str, where: str) -> str:
    answer = last_boxed_content(solution)
    if answer is None:
        raise DataSourceError(f"{where}: the solution has no \\boxed{{...}} answer")
    return answer


def _hub_is_disabled() -> bool:
    return any(os.environ.get(flag, "").strip() in ("1", "true", "TRUE", "yes")
               for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_hub(dataset_id: str, *args, **kwargs):
    """``datasets.load_dataset`` with an error that says what to do when offline."""
    if _hub_is_disabled():
        raise DataSourceError(f"cannot load {dataset_id!r}: the Hugging Face hub is disabled (HF_HUB_OFFLINE or "
                              f"HF_DATASETS_OFFLINE is set). Set {MIRROR_KEY} to a local copy of shared/data")
    try:
        from datasets import load_dataset
        return load_dataset(dataset_id, *args, **kwargs)
    except Exception as error:  # noqa: BLE001 - network, auth (gated sets) and missing-split errors alike
        raise DataSourceError(
            f"could not load {dataset_id!r} from the Hugging Face hub ({type(error).__name__}: "
            f"{str(error)[:300]}). Offline? Set {MIRROR_KEY} to a local copy of shared/data instead"
            + (" (GPQA is gated: accept its terms on the hub and log in first)" if "gpqa" in dataset_id else "")
        ) from error


# ---------------------------------------------------------------------------------------
# Evaluation sets: one reader per benchmark. Each returns normalised records.
# ---------------------------------------------------------------------------------------

def _math500(mirror_dir: Path | None) -> list[dict]:
    rows = (_read_jsonl(_mirror_file(mirror_dir, "math500/test.jsonl")) if mirror_dir
            else list(_load_hub("HuggingFaceH4/MATH-500", split="test")))
    return [make_record(row["unique_id"], row["problem"], normalise_answer(row["answer"]), "math", "math500",
                        solution=row["solution"], meta={"subject": row["subject"], "level": row["level"]})
            for row in rows]


def _aime24(mirror_dir: Path | None) -> list[dict]:
    # The mirror's file holds some answers zero-padded ("025"), like the AIME answer sheet.
    rows = (_read_jsonl(_mirror_file(mirror_dir, "aime24/test.jsonl")) if mirror_dir
            else list(_load_hub("HuggingFaceH4/aime_2024", split="train")))
    return [_integer_answer_record(row, "aime24", index) for index, row in enumerate(rows)]


def _aime25(mirror_dir: Path | None) -> list[dict]:
    rows = (_read_jsonl(_mirror_file(mirror_dir, "aime25/test.jsonl")) if mirror_dir
            else list(_load_hub("math-ai/aime25", split="test")))
    return [_integer_answer_record(row, "aime25", index) for index, row in enumerate(rows)]


def _amc23(mirror_dir: Path | None) -> list[dict]:
    # Free-response rewrite of AMC 12 2023; the gold is an integral float such as 27.0.
    rows = (_read_jsonl(_mirror_file(mirror_dir, "amc23/test.jsonl")) if mirror_dir
            else list(_load_hub("math-ai/amc23", split="test")))
    return [_integer_answer_record(row, "amc23", index) for index, row in enumerate(rows)]


def _integer_answer_record(row: dict, source: str, index: int) -> dict:
    where = f"{source} row {index}"
    raw = _field(row, ["answer"], where)
    answer = normalise_answer(raw)
    if not answer.lstrip("-").isdigit():
        raise DataSourceError(f"{where}: expected an integer answer, got {raw!r}")
    return make_record(row.get("id", index), _field(row, ["problem", "question"], where), answer, "math", source,
                       solution=row.get("solution"), meta={"answer_raw": str(raw), "url": row.get("url")})


def _minerva(mirror_dir: Path | None) -> list[dict]:
    if not mirror_dir:
        raise DataSourceError(f"minerva has no hub source here; set {MIRROR_KEY}")
    rows = _read_jsonl(_mirror_file(mirror_dir, "minerva/test.jsonl"))
    return [make_record(row["idx"], row["problem"], _boxed_answer(row["solution"], f"minerva idx {row['idx']}"),
                        "math", "minerva", solution=row["solution"], meta={"course": row["type"]})
            for row in rows]


def _olympiadbench(mirror_dir: Path | None) -> list[dict]:
    if not mirror_dir:
        raise DataSourceError(f"olympiadbench has no hub source here; set {MIRROR_KEY}")
    records = []
    for row in _read_jsonl(_mirror_file(mirror_dir, "olympiadbench/test.jsonl")):
        problem = row["question"] if not row.get("context") else row["context"] + "\n\n" + row["question"]
        answers = [a.strip().strip("$").strip() for a in row["final_answer"]]
        records.append(make_record(
            row["id"], problem, ", ".join(answers), "math", "olympiadbench",
            solution="\n\n".join(row["solution"]) if row.get("solution") else None,
            meta={"answer_raw": row["final_answer"], "unit": row.get("unit"),
                  "answer_type": row.get("answer_type"), "error": row.get("error")}))
    return records


def gpqa_option_order(seed: int, question_id: str) -> list[int]:
    """Deterministic order of GPQA's four options (0 = correct, 1-3 = the distractors).

    Sorting by a sha256 of (seed, id, option) needs no RNG, so the letters are the same on
    every machine and Python version.
    """
    def key(option: int) -> str:
        return hashlib.sha256(f"{seed}:{question_id}:{option}".encode()).hexdigest()
    return sorted(range(4), key=key)


def _gpqa_rows_from_mirror(mirror_dir: Path) -> list[dict]:
    zip_path = _mirror_file(mirror_dir, "gpqa/dataset.zip")
    # Read in memory only: the CSV must never be written to disk in plain text.
    try:
        with zipfile.ZipFile(zip_path) as archive:
            data = archive.read(GPQA_DIAMOND_MEMBER, pwd=GPQA_ZIP_PASSWORD)
    except KeyError:
        raise DataSourceError(f"{zip_path}: no member {GPQA_DIAMOND_MEMBER!r}") from None
    except RuntimeError as error:  # wrong password / encryption problem
        raise DataSourceError(f"{zip_path}: cannot decrypt {GPQA_DIAMOND_MEMBER!r} ({error})") from None
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


def _gpqa_diamond(mirror_dir: Path | None, seed: int) -> list[dict]:
    rows = (_gpqa_rows_from_mirror(mirror_dir) if mirror_dir
            else list(_load_hub("Idavidrein/gpqa", "gpqa_diamond", split="train")))
    records = []
    for index, row in enumerate(rows):
        where = f"gpqa_diamond row {index}"
        question_id = _field(row, ["Record ID"], where)
        options = [_field(row, [name], where).strip() for name in
                   ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")]
        order = gpqa_option_order(seed, question_id)
        letter = MC_LETTERS[order.index(0)]
        records.append(make_record(
            question_id, _field(row, ["Question"], where).strip(), letter, "mc", "gpqa_diamond",
            solution=(row.get("Explanation") or "").strip() or None,
            choices=[options[i] for i in order],
            meta={"choice_order": order, "answer_text": options[0], "shuffle_seed": seed,
                  "subdomain": row.get("Subdomain"), "domain": row.get("High-level domain")}))
    return records


EVAL_READERS: dict[str, Callable[..., list[dict]]] = {
    "math500": _math500,
    "aime24": _aime24,
    "aime25": _aime25,
    "amc23": _amc23,
    "minerva": _minerva,
    "olympiadbench": _olympiadbench,
}


def read_eval_set(name: str, mirror_dir: Path | None, gpqa_seed: int = 0) -> list[dict]:
    """Normalised records of one benchmark, with its row count and id uniqueness checked."""
    if name == "gpqa_diamond":
        records = _gpqa_diamond(mirror_dir, gpqa_seed)
    elif name in EVAL_READERS:
        records = EVAL_READERS[name](mirror_dir)
    else:
        raise ValueError(f"unknown eval set {name!r}; known: {sorted(EXPECTED_ROWS)}")
    if len(records) != EXPECTED_ROWS[name]:
        raise DataSourceError(f"{name}: read {len(records)} rows, expected {EXPECTED_ROWS[name]}")
    _check_unique_ids(records, name)
    return records


def _check_unique_ids(records: list[dict], name: str) -> None:
    ids = [record["id"] for record in records]
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise DataSourceError(f"{name}: duplicate record ids {duplicates[:5]}")


# ---------------------------------------------------------------------------------------
# Writing + manifest
# ---------------------------------------------------------------------------------------

def write_jsonl(records: list[dict], path: Path) -> dict:
    """Write records (one JSON object per line) and return their manifest entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    data = text.encode("utf-8")
    path.write_bytes(data)
    return {"rows": len(records), "sha256": hashlib.sha256(data).hexdigest()}


def read_records(path: Path) -> list[dict]:
    """Read a normalised JSONL file (as written by this module or the toy world)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found; run the data preparation step first")
    return _read_jsonl(Path(path))


def _update_manifest(out_dir: Path, entries: dict[str, dict]) -> dict:
    """Merge entries into out_dir/manifest.json (other files prepared earlier are kept)."""
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"files": {}}
    manifest["files"].update(entries)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def prepare_eval_sets(mirror_dir: Path | None, out_dir: Path, names: Sequence[str], gpqa_seed: int = 0) -> dict:
    """Write out_dir/<name>.jsonl for each benchmark plus out_dir/manifest.json.

    mirror_dir=None reads from the Hugging Face hub (math500, aime24, aime25, amc23,
    gpqa_diamond; GPQA is gated). Returns the manifest.
    """
    if mirror_dir is not None and not Path(mirror_dir).is_dir():
        raise DataSourceError(f"{MIRROR_KEY} = {mirror_dir} is not a directory")
    out_dir = Path(out_dir)
    entries = {}
    for name in names:
        records = read_eval_set(name, Path(mirror_dir) if mirror_dir else None, gpqa_seed)
        entries[f"{name}.jsonl"] = {
            **write_jsonl(records, out_dir / f"{name}.jsonl"),
            "source": f"mirror:{mirror_dir}" if mirror_dir else "hub",
            **({"gpqa_seed": gpqa_seed} if name == "gpqa_diamond" else {}),
        }
    return _update_manifest(out_dir, entries)


# ---------------------------------------------------------------------------------------
# Training set
# ---------------------------------------------------------------------------------------

# real_data.train_source: what the config asks for; never silently replaced by another source.
TRAIN_SOURCES = {"openthoughts": "OpenThoughts-114k math subset from the Hugging Face hub (the paper's)",
                 "math_train": "Hendrycks MATH train from real_data.mirror_dir (offline; smoke runs)"}
OPENTHOUGHTS_MAX_ROWS = 30_000  # spec §5: "up to 30K problem-solution pairs"


def _math_train_from_mirror(mirror_dir: Path) -> list[dict]:
    """Hendrycks MATH train (7,500 problems with worked solutions).

    A few solutions have no usable answer (number_theory/7115.json ends in an empty
    ``\\boxed{}``); they are skipped because a verifiable reward needs a gold.
    """
    root = _mirror_file(mirror_dir, "train/MATH/train")
    records, skipped = [], []
    for path in sorted(root.glob("*/*.json"), key=lambda p: (p.parent.name, int(p.stem))):
        row = json.loads(path.read_text(encoding="utf-8"))
        record_id = f"{path.parent.name}/{path.stem}"
        answer = last_boxed_content(row["solution"])
        if answer is None:
            skipped.append(record_id)
            continue
        records.append(make_record(
            record_id, row["problem"], answer, "math", "math_train",
            solution=row["solution"], meta={"level": row.get("level"), "subject": row.get("type")}))
    if not records:
        raise DataSourceError(f"{root}: no <subject>/<n>.json files with a boxed answer")
    if skipped:
        log.warning("MATH train: skipped %d problems without a boxed answer: %s", len(skipped), skipped[:10])
    return records


def _openthoughts_math_from_hub(limit: int, seed: int) -> list[dict]:
    """OpenThoughts-114k "metadata" config, domain == math, reference solution + its boxed answer.

    Streams the set (the metadata config holds long R1 traces, several GB) through a seeded
    shuffle buffer, so the first ``limit`` math rows are not just the file's first sources.
    """
    dataset = _load_hub(OPENTHOUGHTS_ID, "metadata", split="train", streaming=True)
    dataset = dataset.shuffle(seed=seed, buffer_size=10_000)
    records, n_without_answer = [], 0
    try:
        for row in dataset:
            if row.get("domain") != "math":
                continue
            solution = row.get("ground_truth_solution") or ""
            answer = last_boxed_content(solution)
            if answer is None:  # no checkable gold: useless for a verifiable reward
                n_without_answer += 1
                continue
            problem_hash = hashlib.sha256(row["problem"].encode("utf-8")).hexdigest()[:16]  # stable across shuffles
            records.append(make_record(f"openthoughts/{problem_hash}", row["problem"], answer, "math",
                                       "openthoughts114k_math", solution=solution,
                                       meta={"origin": row.get("source")}))
            if len(records) >= limit:
                break
    except Exception as error:  # noqa: BLE001 - the stream is read lazily, so network errors surface here
        raise DataSourceError(f"{OPENTHOUGHTS_ID}: reading from the hub failed after {len(records)} rows "
                              f"({type(error).__name__}: {str(error)[:300]})") from error
    log.info("%s: %d math rows kept, %d skipped without a boxed answer", OPENTHOUGHTS_ID, len(records),
             n_without_answer)
    if not records:
        raise DataSourceError(f"{OPENTHOUGHTS_ID}: no math rows with a boxed reference answer")
    return records


def prepare_train_set(mirror_dir: Path | None, out_dir: Path, max_rows: int, val_rows: int, seed: int,
                      source: str) -> dict:
    """Write out_dir/train.jsonl and out_dir/val.jsonl (disjoint, seeded split) + manifest.

    source (real_data.train_source): "openthoughts" = OpenThoughts-114k math subset (spec §5) from
    the hub, an error when the hub is unreachable; "math_train" = Hendrycks MATH train from the
    mirror. The source used is written to the manifest (``train_source``) and the log; training
    refuses data whose manifest names another source than its config asks for.
    """
    if source not in TRAIN_SOURCES:
        raise ValueError(f"real_data.train_source must be one of {sorted(TRAIN_SOURCES)}, got {source!r}")
    if max_rows < 1 or val_rows < 0:
        raise ValueError(f"need max_rows >= 1 and val_rows >= 0, got {max_rows} and {val_rows}")
    if source == "openthoughts":
        pool = _openthoughts_math_from_hub(min(OPENTHOUGHTS_MAX_ROWS, max_rows + val_rows), seed)
        origin = OPENTHOUGHTS_ID
    else:
        pool = _mirror_train_pool(mirror_dir)
        origin = f"mirror:{mirror_dir}/train/MATH/train"
    log.info("training data source: %s (%s) = %s", source, TRAIN_SOURCES[source], origin)

    pool = _dedupe_by_problem(pool)
    random.Random(seed).shuffle(pool)
    if len(pool) <= val_rows:
        raise DataSourceError(f"training pool has {len(pool)} problems, not enough for {val_rows} validation rows")
    val, train = pool[:val_rows], pool[val_rows:val_rows + max_rows]
    out_dir = Path(out_dir)
    entries = {name: {**write_jsonl(records, out_dir / name), "source": origin, "train_source": source, "seed": seed}
               for name, records in (("train.jsonl", train), ("val.jsonl", val))}
    return _update_manifest(out_dir, entries)


def check_train_source(train_path: Path, expected: str) -> str:
    """The training file's source from its manifest; an error if it is not the one the config asks for."""
    manifest_path = Path(train_path).parent / "manifest.json"
    if not manifest_path.exists():
        raise DataSourceError(f"{manifest_path} is missing: cannot tell which source {train_path} came from "
                              f"(rerun the train_data rule)")
    entry = json.loads(manifest_path.read_text()).get("files", {}).get(Path(train_path).name, {})
    used = entry.get("train_source")
    if used != expected:
        raise DataSourceError(f"{train_path} was prepared from train_source {used!r} ({entry.get('source')}), but "
                              f"the config asks for real_data.train_source {expected!r}: rerun the train_data rule")
    return entry.get("source", used)


def _mirror_train_pool(mirror_dir: Path | None) -> list[dict]:
    if mirror_dir is None:
        raise DataSourceError(f"real_data.train_source 'math_train' reads the local mirror, but {MIRROR_KEY} is null")
    return _math_train_from_mirror(Path(mirror_dir))


def _dedupe_by_problem(records: list[dict]) -> list[dict]:
    seen, unique = set(), []
    for record in records:
        key = " ".join(record["problem"].split())
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique
