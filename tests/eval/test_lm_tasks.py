"""lm-evaluation-harness tasks through `lrq eval --tasks`, offline: tasks defined here over local
JSONL (multiple choice and generation) and a local copy of ARC-Easy's format under its real task
config; the onnxruntime graph scores the same requests as torch to 1e-4."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

from cli_runner import invoke  # noqa: E402
from lm_task_files import MULTIPLE_CHOICE as MC, multiple_choice_task, write_jsonl  # noqa: E402

GENERATION = [{"prompt": "The capital of France is", "answer": " Paris"}, {"prompt": "One, two, three,", "answer": " four"}]
ARC = [
    {"id": f"q{i}", "question": q, "choices": {"text": choices, "label": ["A", "B", "C", "D"]}, "answerKey": key}
    for i, (q, choices, key) in enumerate([
        ("Which is a source of light?", ["the Sun", "a rock", "a shadow", "water"], "A"),
        ("What do plants need to grow?", ["sand only", "sunlight", "darkness", "plastic"], "B"),
        ("Which state of matter is ice?", ["gas", "liquid", "solid", "plasma"], "C"),
        ("What pulls objects toward Earth?", ["magnetism", "friction", "wind", "gravity"], "D"),
    ])
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    import lm_eval

    folder = tmp_path_factory.mktemp("tasks")
    gen, arc = write_jsonl(folder / "gen.jsonl", GENERATION), write_jsonl(folder / "arc.jsonl", ARC)
    multiple_choice_task(folder, "tiny_mc", MC)
    (folder / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    # ARC-Easy as lm-eval defines it (prompt, choices, target, acc / acc_norm), over a local copy of its format
    arc_easy = Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"
    (folder / "arc_easy_local.yaml").write_text(f"""include: {arc_easy}
task: arc_easy_local
tag: []
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: {arc}
    validation: {arc}
    test: {arc}
""")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "q"
    result = invoke("-q", "calibrate", "-o", out, "--nsamples", "4", "--seq-len", "64")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)  # older datasets: no such flag


def test_test_tasks_fp_and_quantized_in_json(checkpoint, task_dir):
    result = invoke("eval", checkpoint, "--tasks", "tiny_mc,tiny_gen", "--task-path", task_dir, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for side in ("fp", "quant"):
        assert 0 <= report["tasks"]["tiny_mc"][side]["acc"] <= 1
        assert report["tasks"]["tiny_mc"][side]["acc_stderr"] >= 0
        assert 0 <= report["tasks"]["tiny_gen"][side]["exact_match"] <= 1
    assert report["method"] == "rtn" and report["lm_eval_version"]
    table = invoke("eval", checkpoint, "--tasks", "tiny_mc", "--task-path", task_dir, "--limit", "3")
    assert table.exit_code == 0 and "full precision" in table.output and "tiny_mc" in table.output, table.output


def test_lm_eval_adds_nothing_to_lrqs_output_outside_a_git_checkout(checkpoint, task_dir, tmp_path):
    """lm-eval probes `git describe` for its own record; outside a checkout git printed `fatal: not
    a git repository` into lrq's stream (twice per run)."""
    import os
    import shutil
    import subprocess

    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_DATASETS_OFFLINE": "1",
           "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}
    done = subprocess.run([shutil.which("lrq"), "eval", str(checkpoint), "--tasks", "tiny_mc", "--task-path", str(task_dir),
                           "--limit", "2", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "fatal" not in done.stderr and "git" not in done.stderr, done.stderr
    json.loads(done.stdout)


def test_real_task_format_from_local_files(checkpoint, task_dir):
    result = invoke("eval", checkpoint, "--tasks", "arc_easy_local", "--task-path", task_dir, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)["tasks"]["arc_easy_local"]
    assert {"acc", "acc_norm", "acc_stderr"} <= set(scores["quant"]) and {"acc", "acc_norm"} <= set(scores["fp"])


def test_onnx_graph_scores_like_torch(checkpoint, task_dir, tmp_path):
    """Every log-likelihood request of the test task: the exported graph and the torch model agree to 1e-4."""
    from lrq_deploy.checkpoint import load_checkpoint
    from lrq_deploy.eval.tasks import onnx_scorer, scoring_lm, torch_scorer

    graph = tmp_path / "q.onnx"
    assert invoke("-q", "export", checkpoint, "--onnx", graph, "--limit", "2").exit_code == 0
    ckpt = load_checkpoint(checkpoint)
    requests = [SimpleNamespace(args=(row["question"], " " + choice)) for row in MC for choice in row["choices"]]
    by_torch = scoring_lm(torch_scorer(ckpt.model, "cpu"), ckpt.loaded.tokenizer, 256).loglikelihood(requests)
    by_graph = scoring_lm(onnx_scorer(graph), ckpt.loaded.tokenizer, 256).loglikelihood(requests)
    for (t, t_greedy), (g, g_greedy) in zip(by_torch, by_graph):
        assert abs(t - g) <= 1e-4, (t, g)
    result = invoke("eval", checkpoint, "--tasks", "tiny_mc", "--task-path", task_dir, "--onnx", graph, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["scorer"].startswith("onnxruntime")
    torch_report = json.loads(invoke("eval", checkpoint, "--tasks", "tiny_mc", "--task-path", task_dir, "--json").output)
    assert report["tasks"]["tiny_mc"]["quant"]["acc"] == torch_report["tasks"]["tiny_mc"]["quant"]["acc"]


def test_bad_task_requests_fail_in_one_line(checkpoint, task_dir, tmp_path):
    cases = [
        (["--tasks", "no_such_task"], "unknown lm-eval task"),
        (["--tasks", "arc_easy", "--limit", "2"], "datasets cache"),  # not cached, offline
        (["--task-path", task_dir], "go with --tasks"),
        (["--tasks", "tiny_mc", "--task-path", task_dir, "--seq-len", "32"], "--seq-len does not apply"),
        (["--tasks", "tiny_mc", "--task-path", tmp_path / "absent"], "not a directory"),
    ]
    for args, message in cases:
        result = invoke("eval", checkpoint, *args)
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_vision_checkpoints_are_refused(tmp_path, task_dir):
    out = tmp_path / "vit"
    assert invoke("-q", "calibrate", "bundled:vit", "-o", out, "--nsamples", "8").exit_code == 0
    result = invoke("eval", out, "--tasks", "tiny_mc", "--task-path", task_dir)
    assert result.exit_code != 0 and "score language models" in result.output
