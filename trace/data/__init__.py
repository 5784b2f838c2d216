"""Data preparation: real benchmarks and training sets in the project's normalised JSONL format.

See :mod:`trace.data.benchmarks` for the record format.
"""
from trace.data.benchmarks import (
    EXPECTED_ROWS,
    MAIN_EVAL_SETS,
    DataSourceError,
    check_train_source,
    gpqa_option_order,
    make_record,
    normalise_answer,
    prepare_eval_sets,
    prepare_train_set,
    read_eval_set,
    read_records,
    write_jsonl,
)

__all__ = [
    "EXPECTED_ROWS",
    "MAIN_EVAL_SETS",
    "DataSourceError",
    "check_train_source",
    "gpqa_option_order",
    "make_record",
    "normalise_answer",
    "prepare_eval_sets",
    "prepare_train_set",
    "read_eval_set",
    "read_records",
    "write_jsonl",
]
