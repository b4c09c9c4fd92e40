"""lm-eval tasks over local JSONL files, as a user writes them for `lrq eval --tasks --task-path`
(tests/eval/test_lm_tasks.py and the docs smoke test)."""

from __future__ import annotations

import json
from pathlib import Path

MULTIPLE_CHOICE = [
    {"question": "The capital of France is", "choices": ["Paris", "a river", "blue", "seven"], "label": 0},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "happily", "under", "north"], "label": 0},
    {"question": "The opposite of hot is", "choices": ["cold", "seven", "book", "ran"], "label": 0},
    {"question": "A week has seven", "choices": ["days", "rivers", "songs", "colors"], "label": 0},
    {"question": "The film was released in", "choices": ["1998", "the", "green", "quickly"], "label": 0},
    {"question": "He was born in the city of", "choices": ["London", "eating", "blue", "nine"], "label": 0},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def multiple_choice_task(folder: Path, name: str, rows: list[dict] = MULTIPLE_CHOICE) -> Path:
    """folder/NAME.yaml, an accuracy task over folder/NAME.jsonl (question, choices, label)."""
    data = write_jsonl(folder / f"{name}.jsonl", rows)
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder / f"{name}.yaml"
