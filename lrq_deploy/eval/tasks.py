"""lm-evaluation-harness tasks (PIQA, ARC, HellaSwag, MMLU, ... or a task of the user's own) on a
quantized checkpoint and its full-precision source, side by side.

`scoring_lm` gives lm-eval's `LM` interface over one function, token ids -> logits: the torch model
(reference arithmetic or the kernels) or an exported onnxruntime graph, so a graph is judged by
the same requests as the model it came from. Log-likelihoods are summed in float64 from the
logits; generation is greedy and stops at the task's `until` strings."""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lrq_deploy.errors import LrqError
from lrq_deploy.progress import step

Logits = Callable[[torch.Tensor], torch.Tensor]  # (1, T) int64 ids -> (1, T, vocab) logits


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise LrqError("lm-eval tasks need lm-evaluation-harness: pip install 'lrq-deploy[lmeval]'") from None
    return LM


def scoring_lm(logits: Logits, tokenizer, max_length: int):
    """An lm-eval LM over `logits` (the class is made when lm_eval is importable)."""
    LM = _lm_base()

    class _ScoringLM(LM):
        def __init__(self):
            super().__init__()
            self.tokenizer, self.max_length = tokenizer, max_length
            prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            self.prefix_token = int(prefix if prefix is not None else 0)

        def encode(self, text: str) -> list[int]:
            return self.tokenizer.encode(text, add_special_tokens=False)

        def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            """Tokens of context and continuation as lm-eval's HF model splits them: trailing spaces
            of the context move to the continuation, and the continuation is what encoding the
            whole adds to the context's tokens."""
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            if not context:
                return [self.prefix_token], self.encode(continuation)
            whole, head = self.encode(context + continuation), self.encode(context)
            return head, whole[len(head):]

        def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
            ids = (context + continuation)[-(self.max_length + 1):][:-1]
            out = logits(torch.tensor([ids], dtype=torch.long))[0, -len(continuation):].double()
            logprobs = torch.log_softmax(out, dim=-1)
            target = torch.tensor(continuation)
            chosen = logprobs.gather(1, target[:, None]).sum().item()
            return chosen, bool((logprobs.argmax(dim=-1) == target).all())

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return [self._score(*self._pair(*request.args)) for request in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            totals = []
            for request in requests:
                windows = get_rolling_token_windows(self.encode(request.args[0]), self.prefix_token,
                                                    self.max_length, context_len=1)
                totals.append(sum(self._score(*make_disjoint_window(w))[0] for w in windows))
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False):
            return [self._generate(*request.args) for request in requests]

        def _generate(self, context: str, settings: dict) -> str:
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self.encode(context) or [self.prefix_token]
            new: list[int] = []
            for _ in range(int(settings.get("max_gen_toks", 256))):
                window = (ids + new)[-self.max_length:]
                token = int(logits(torch.tensor([window], dtype=torch.long))[0, -1].argmax())
                if token == self.tokenizer.eos_token_id:
                    break
                new.append(token)
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                if any(stop in text for stop in until):
                    break
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            return text

    return _ScoringLM()


def torch_scorer(model, device) -> Logits:
    """The model's logits (models/causal_lm.py torch_logits), without autograd."""
    from lrq_deploy.models.causal_lm import torch_logits

    return torch.no_grad()(torch_logits(model, device))


def onnx_scorer(graph: Path) -> Logits:
    """Logits from an exported graph as written (onnxruntime's reference session; a graph with a
    KV cache is fed an empty one)."""
    from lrq_deploy.runtime.onnxrt import reference_session, step_feeds

    session = reference_session(Path(graph))
    names = [i.name for i in session.get_inputs()]
    if "input_ids" not in names:
        raise LrqError(f"{graph} does not take input_ids: not a language-model graph")
    output = session.get_outputs()[0].name

    def run(ids: torch.Tensor) -> torch.Tensor:
        feed = step_feeds(session, ids.numpy().astype(np.int64))
        return torch.from_numpy(session.run([output], feed)[0])

    return run


@dataclass(frozen=True)
class TaskOptions:
    tasks: tuple[str, ...]
    task_path: Path | None = None  # a folder of the user's own task YAMLs (lm-eval's include_path)
    limit: int | None = None
    num_fewshot: int | None = None
    onnx: Path | None = None  # score the quantized side with this graph instead of torch
    device: str = "auto"
    backend: str = "reference"
    compare_fp: bool = True

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise LrqError(f"--limit must be >= 1 (documents per task), got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise LrqError(f"--num-fewshot must be >= 0, got {self.num_fewshot}")


def evaluate_tasks(path: Path, options: TaskOptions) -> dict:
    """{"tasks": {task: {"fp": {metric: value, metric_stderr: ...}, "quant": {...}}}, "scorer",
    "method", "scheme", "lm_eval_version", "limit", "num_fewshot"} for checkpoint `path`."""
    import lm_eval

    from lrq_deploy.devices import resolve_device
    from lrq_deploy.eval.api import load_for_eval

    _lm_base()
    if options.onnx:
        check_graph_of(Path(options.onnx), Path(path))
    manager = _task_manager(options.task_path)
    _check_tasks(manager, options.tasks)
    dev = resolve_device(options.device)
    ckpt = load_for_eval(path, dev, options.backend)
    if ckpt.adapter.task != "causal_lm":
        raise LrqError(f"lm-eval tasks score language models; {path} is a {ckpt.adapter.task} model")
    length = ckpt.adapter.max_sequence_length(ckpt.model)
    scorer = onnx_scorer(options.onnx) if options.onnx else torch_scorer(ckpt.model, dev)
    result = {"scorer": f"onnxruntime {options.onnx}" if options.onnx else f"torch ({options.backend})",
              "method": ckpt.method, "scheme": ckpt.scheme_name, "lm_eval_version": lm_eval.__version__,
              "limit": options.limit, "num_fewshot": options.num_fewshot, "tasks": {}}
    sides = {"quant": scoring_lm(scorer, ckpt.loaded.tokenizer, length)}
    if options.compare_fp:
        with step("loading the full-precision model"):
            fp = ckpt.full_precision_source(dev).loaded
        sides = {"fp": scoring_lm(torch_scorer(fp.model, dev), fp.tokenizer, length), **sides}
    for side, lm in sides.items():
        with step(f"lm-eval tasks, {'full precision' if side == 'fp' else 'quantized'}"):
            scores = _run(lm, manager, options)
        for task, metrics in scores.items():
            result["tasks"].setdefault(task, {})[side] = metrics
    return result


def check_graph_of(graph: Path, checkpoint: Path) -> None:
    """Refuse to score a graph under a checkpoint's name when lrq exported it from other weights."""
    from lrq_deploy.artifacts import Kind, resolve_artifact
    from lrq_deploy.checkpoint import MANIFEST

    kind, graph = resolve_artifact(graph, "--onnx")
    if kind is not Kind.ONNX:
        raise LrqError(f"--onnx {graph} is not an ONNX graph")
    import onnx

    metadata = {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}
    exported_from = metadata.get("lrq.source_weights_sha256")
    try:
        recorded = json.loads((checkpoint / MANIFEST).read_text())["files"]["model.safetensors"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a full-precision model: no record to compare (the checkpoint's own load reports damage)
    if exported_from != recorded:
        raise LrqError(f"--onnx {graph} was not exported from {checkpoint} (its weights' sha256 differs"
                       f"{'' if exported_from else ': the graph records none'}); export the graph from this checkpoint")


def _task_manager(task_path: Path | None):
    from lm_eval.tasks import TaskManager

    if task_path is not None and not Path(task_path).is_dir():
        raise LrqError(f"--task-path {task_path} is not a directory of task YAML files")
    if task_path is not None:
        check_task_files(Path(task_path))
    return TaskManager(include_path=str(task_path) if task_path else None)


def check_task_files(folder: Path) -> None:
    """Every YAML under --task-path parses (lm-eval itself skips a broken one without a word, and
    a task defined there then goes missing or, worse, another of that name is used)."""
    import yaml

    class TaskLoader(yaml.SafeLoader):  # lm-eval's own tags (!function module.name) are names, not code, here
        pass

    TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    for file in sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")]):
        try:
            yaml.load(file.read_text(), Loader=TaskLoader)  # noqa: S506 - SafeLoader with inert tags
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" line {where.line + 1}" if where is not None else ""
            raise LrqError(f"--task-path: {file}{line} is not valid YAML "
                           f"({getattr(exc, 'problem', None) or type(exc).__name__}); fix or remove it") from None


def _check_tasks(manager, tasks: tuple[str, ...]) -> None:
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise LrqError(f"unknown lm-eval task {unknown[0]!r} ({len(known)} known, e.g. piqa, arc_easy, arc_challenge, "
                       "boolq, hellaswag, winogrande, mmlu; `lm-eval ls tasks` lists them; your own with --task-path)")


def _run(lm, manager, options: TaskOptions) -> dict:
    import io

    from lm_eval import simple_evaluate

    from lrq_deploy.progress import shown

    # lm-eval's and datasets' own bars follow lrq's rule: terminals only, never with --quiet
    quiet = contextlib.nullcontext() if shown() else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet, _without_git_probes():
            out = simple_evaluate(model=lm, tasks=list(options.tasks), task_manager=manager, limit=options.limit,
                                  num_fewshot=options.num_fewshot, bootstrap_iters=1000, log_samples=False,
                                  verbosity="ERROR")
    except LrqError:
        raise
    except Exception as exc:  # datasets / hub errors while loading task data come in many types
        raise LrqError(_data_error(options.tasks, exc)) from None
    return {task: _metrics(values) for task, values in out["results"].items()}


@contextlib.contextmanager
def _without_git_probes():
    """lm-eval runs `git describe` in the working directory to record its own commit, which prints
    `fatal: not a git repository` into lrq's output outside a checkout; lrq records versions itself."""
    import lm_eval.evaluator

    probe = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = probe


def _metrics(values: dict) -> dict:
    """lm-eval's {"acc,none": v, "acc_stderr,none": s, "alias": ...} as {"acc": v, "acc_stderr": s}."""
    metrics = {}
    for key, value in values.items():
        name, _, _filter = key.partition(",")
        if isinstance(value, (int, float)) and name not in ("sample_len",):
            metrics[name] = float(value)
    return metrics


def _data_error(tasks, exc: Exception) -> str:
    import os

    from lrq_deploy.models.hf import first_line

    cache = os.environ.get("HF_DATASETS_CACHE") or str(Path.home() / ".cache" / "huggingface" / "datasets")
    message = first_line(exc)
    if re.search(r"offline|connect|reach|resolve|not found|doesn't exist|couldn't find|no such file|"
                 r"name or service not known|name resolution|network is unreachable|timed out", message, re.I):
        return (f"cannot load the data of {', '.join(tasks)} ({message}); lm-eval reads task data through the Hugging "
                f"Face datasets cache ({cache}, HF_DATASETS_CACHE): run once online, or define the task over local files "
                "(a YAML with dataset_path: json and data_files) in a folder given as --task-path")
    return f"lm-eval failed on {', '.join(tasks)}: {message}"
