"""trace.data.benchmarks on the real files of shared/data (skipped when that folder is absent)."""
import collections
import hashlib
import json
from pathlib import Path

import pytest

from trace.data import (
    DataSourceError,
    EXPECTED_ROWS,
    MAIN_EVAL_SETS,
    check_train_source,
    prepare_eval_sets,
    prepare_train_set,
    read_records,
)
from trace.verify import last_boxed_content

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(),
                                reason=f"real data mirror not found at {SHARED_DATA}")

RECORD_KEYS = {"id", "problem", "solution", "answer", "kind", "choices", "source", "meta"}


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    prepare_eval_sets(SHARED_DATA, out, list(MAIN_EVAL_SETS), gpqa_seed=0)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name,rows", [("math500", 500), ("aime24", 30), ("aime25", 30), ("amc23", 40),
                                       ("gpqa_diamond", 198)])
def test_row_counts_and_record_format(eval_dir, name, rows):
    records = read_records(eval_dir / f"{name}.jsonl")
    assert len(records) == rows == EXPECTED_ROWS[name]
    assert len({r["id"] for r in records}) == rows
    for record in records:
        assert set(record) == RECORD_KEYS
        assert record["source"] == name
        assert isinstance(record["answer"], str) and record["answer"]
        assert isinstance(record["problem"], str) and record["problem"]
        if record["kind"] == "mc":
            assert record["answer"] in "ABCD" and len(record["choices"]) == 4
        else:
            assert record["kind"] == "math" and record["choices"] is None


def test_manifest_matches_files(eval_dir):
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(f"{name}.jsonl" for name in MAIN_EVAL_SETS)
    for file_name, entry in manifest["files"].items():
        path = eval_dir / file_name
        assert entry["rows"] == len(path.read_text().splitlines())
        assert entry["sha256"] == _sha256(path)
    # nothing else, in particular no decrypted GPQA csv, is written
    assert sorted(p.name for p in eval_dir.iterdir()) == sorted([*manifest["files"], "manifest.json"])


def test_integer_answers_are_normalised(eval_dir):
    aime24 = read_records(eval_dir / "aime24.jsonl")
    padded = [r for r in aime24 if r["meta"]["answer_raw"].startswith("0")]
    assert padded, "the mirror's AIME 2024 file has zero-padded answers such as '025'"
    assert all(r["answer"] == str(int(r["meta"]["answer_raw"])) for r in aime24)
    assert {r["meta"]["answer_raw"]: r["answer"] for r in padded}["025"] == "25"
    amc23 = read_records(eval_dir / "amc23.jsonl")
    assert amc23[0]["answer"] == "27" and amc23[0]["meta"]["answer_raw"] == "27.0"
    assert all("." not in r["answer"] for r in amc23)
    aime25 = read_records(eval_dir / "aime25.jsonl")
    assert [r["answer"] for r in aime25[:3]] == ["70", "588", "16"]  # from aime25/PROVENANCE.md


def test_math500_keeps_the_source_answers(eval_dir):
    source = [json.loads(line) for line in (SHARED_DATA / "math500" / "test.jsonl").read_text().splitlines()]
    records = read_records(eval_dir / "math500.jsonl")
    assert [r["answer"] for r in records] == [row["answer"] for row in source]
    assert [r["id"] for r in records] == [row["unique_id"] for row in source]
    assert all(r["solution"] for r in records)


def test_gpqa_permutation_is_stable_and_balanced(eval_dir, tmp_path):
    again = tmp_path / "again"
    prepare_eval_sets(SHARED_DATA, again, ["gpqa_diamond"], gpqa_seed=0)
    assert _sha256(again / "gpqa_diamond.jsonl") == _sha256(eval_dir / "gpqa_diamond.jsonl")

    records = read_records(eval_dir / "gpqa_diamond.jsonl")
    letters = collections.Counter(r["answer"] for r in records)
    assert set(letters) == set("ABCD")
    assert all(30 <= count <= 70 for count in letters.values()), letters  # 198 / 4 = 49.5 expected
    for record in records:
        order = record["meta"]["choice_order"]
        assert sorted(order) == [0, 1, 2, 3]
        assert record["choices"][order.index(0)] == record["meta"]["answer_text"]
        assert "ABCD".index(record["answer"]) == order.index(0)

    other_seed = tmp_path / "seed1"
    prepare_eval_sets(SHARED_DATA, other_seed, ["gpqa_diamond"], gpqa_seed=1)
    reshuffled = read_records(other_seed / "gpqa_diamond.jsonl")
    assert [r["id"] for r in reshuffled] == [r["id"] for r in records]
    assert sum(a["answer"] != b["answer"] for a, b in zip(records, reshuffled)) > 100


def test_optional_eval_sets(tmp_path):
    manifest = prepare_eval_sets(SHARED_DATA, tmp_path, ["minerva", "olympiadbench"])
    assert manifest["files"]["minerva.jsonl"]["rows"] == 272
    assert manifest["files"]["olympiadbench.jsonl"]["rows"] == 675
    olympiad = read_records(tmp_path / "olympiadbench.jsonl")
    assert not any(r["answer"].startswith("$") for r in olympiad)


def test_training_split(tmp_path):
    manifest = prepare_train_set(SHARED_DATA, tmp_path, max_rows=600, val_rows=50, seed=3, source="math_train")
    train, val = read_records(tmp_path / "train.jsonl"), read_records(tmp_path / "val.jsonl")
    assert (len(train), len(val)) == (600, 50)
    assert manifest["files"]["train.jsonl"]["rows"] == 600
    assert manifest["files"]["val.jsonl"]["sha256"] == _sha256(tmp_path / "val.jsonl")
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    assert not {r["problem"] for r in train} & {r["problem"] for r in val}
    for record in train + val:
        assert record["kind"] == "math" and record["source"] == "math_train"
        assert record["solution"] and last_boxed_content(record["solution"]) == record["answer"]

    again = tmp_path / "again"
    prepare_train_set(SHARED_DATA, again, max_rows=600, val_rows=50, seed=3, source="math_train")
    assert _sha256(again / "train.jsonl") == _sha256(tmp_path / "train.jsonl")


def test_full_math_train_pool(tmp_path):
    manifest = prepare_train_set(SHARED_DATA, tmp_path, max_rows=100_000, val_rows=500, seed=0, source="math_train")
    # 7,500 problems minus two whose solutions end in an empty \boxed{} (number_theory/7115, 7117),
    # minus one problem text that occurs twice
    assert manifest["files"]["val.jsonl"]["rows"] == 500
    assert manifest["files"]["train.jsonl"]["rows"] == 7500 - 2 - 1 - 500


def test_no_silent_fallback_and_the_source_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataSourceError, match="open-thoughts/OpenThoughts-114k"):
        prepare_train_set(SHARED_DATA, tmp_path, max_rows=10, val_rows=2, seed=0, source="openthoughts")
    assert not (tmp_path / "train.jsonl").exists()  # offline: an error, never MATH train instead
    with pytest.raises(ValueError, match="real_data.train_source"):
        prepare_train_set(SHARED_DATA, tmp_path, max_rows=10, val_rows=2, seed=0, source="auto")
    manifest = prepare_train_set(SHARED_DATA, tmp_path, max_rows=10, val_rows=2, seed=0, source="math_train")
    assert manifest["files"]["train.jsonl"]["source"].startswith("mirror:")
    assert manifest["files"]["train.jsonl"]["train_source"] == "math_train"
    assert check_train_source(tmp_path / "train.jsonl", "math_train").startswith("mirror:")
    with pytest.raises(DataSourceError, match="config asks for real_data.train_source 'openthoughts'"):
        check_train_source(tmp_path / "train.jsonl", "openthoughts")
    with pytest.raises(DataSourceError, match="HuggingFaceH4/MATH-500"):
        prepare_eval_sets(None, tmp_path, ["math500"])


def test_missing_mirror_names_path_and_config_key(tmp_path):
    missing = tmp_path / "no_such_mirror"
    with pytest.raises(DataSourceError, match="data.mirror_dir"):
        prepare_eval_sets(missing, tmp_path / "out", ["math500"])
    empty = tmp_path / "empty_mirror"
    empty.mkdir()
    with pytest.raises(DataSourceError, match=r"empty_mirror/aime24/test.jsonl not found.*data\.mirror_dir"):
        prepare_eval_sets(empty, tmp_path / "out", ["aime24"])
    with pytest.raises(DataSourceError, match=r"train/MATH/train not found"):
        prepare_train_set(empty, tmp_path / "out", max_rows=10, val_rows=2, seed=0, source="math_train")
    with pytest.raises(ValueError, match="unknown eval set 'aime26'"):
        prepare_eval_sets(SHARED_DATA, tmp_path / "out", ["aime26"])
