"""Are two runs of a study the same? Compares BEFORE/results and AFTER/results (two clones, e.g. before and
after a refactor that must not change behaviour):

    python scripts/compare_results.py /path/to/before /path/to/after

- tables/, figures/, aggregate/: byte for byte;
- every run's metrics.jsonl, every evaluation's JSON and every teacher check's JSON: value for value, leaving
  out only what cannot repeat (wall times ``*_s``, annotator latencies, finish times, the repo's git hash)
  and the clone's own path;
- every evaluation's samples file: byte for byte after the same path substitution.
Prints one line per difference and a summary; exit 1 when anything differs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _unrepeatable(key: str) -> bool:
    return key.endswith("_s") or "latency" in key or key in ("lm_eval_repo_git_hash", "finished_at")


def _comparable(value, before: str, after: str):
    if isinstance(value, dict):
        return {k: _comparable(v, before, after) for k, v in value.items() if not _unrepeatable(k)}
    if isinstance(value, list):
        return [_comparable(v, before, after) for v in value]
    return value.replace(before, after) if isinstance(value, str) else value


def _load(path: Path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def compare(before_root: Path, after_root: Path) -> list[str]:
    before, after = before_root / "results", after_root / "results"
    problems, counts = [], {"byte": 0, "value": 0, "samples": 0}
    for folder in ("tables", "figures", "aggregate"):
        for path in sorted((before / folder).glob("*")):
            counts["byte"] += 1
            other = after / folder / path.name
            if not other.is_file() or other.read_bytes() != path.read_bytes():
                problems.append(f"{folder}/{path.name}: differs")
    valued = [p for p in before.rglob("metrics.jsonl") if "work" not in p.relative_to(before).parts]
    valued += list(before.glob("eval/*/*/*.json")) + list(before.glob("teacher_gap/*/*.json"))
    for path in sorted(valued):
        counts["value"] += 1
        other = after / path.relative_to(before)
        if not other.is_file() or (_comparable(_load(path), str(before_root), str(after_root))
                                   != _comparable(_load(other), str(before_root), str(after_root))):
            problems.append(f"{path.relative_to(before)}: differs")
    for path in sorted(before.glob("eval/*/*/*.samples.jsonl")):
        counts["samples"] += 1
        other = after / path.relative_to(before)
        if not other.is_file() or path.read_text().replace(str(before_root), str(after_root)) != other.read_text():
            problems.append(f"{path.relative_to(before)}: differs")
    print(f"{counts['byte']} tables/figures/aggregate files byte for byte, {counts['value']} metrics/evaluation/"
          f"teacher-check files value for value, {counts['samples']} samples files: {len(problems)} differ")
    return problems


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    found = compare(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
    print("\n".join(found))
    sys.exit(1 if found else 0)
