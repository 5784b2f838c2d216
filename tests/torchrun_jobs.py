"""Run several training jobs one after another in ONE torchrun launch (each rank runs this file), so
the tests pay the launch and import cost once: ``torchrun ... tests/torchrun_jobs.py jobs.json``, where
jobs.json is a list of {cfg, base, train_data, run_dir[, val_data]}. Each job is exactly ``python -m trace train``."""
import json
import sys
from pathlib import Path

from trace.cli import main

if __name__ == "__main__":
    for job in json.loads(Path(sys.argv[1]).read_text()):
        main(["train", "--cfg", json.dumps(job["cfg"]), "--base", job["base"], "--train-data", job["train_data"],
              "--run-dir", job["run_dir"], *(["--val-data", job["val_data"]] if job.get("val_data") else [])])
