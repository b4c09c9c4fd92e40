"""Every command the README and the docs give, run as a user would, in document order, with small
settings: a dependency that moves under the project, or a command that no longer matches the
code, fails here the day it happens.

Commands are read from the fenced shell blocks of README.md, docs/*.md and benchmarks/RESULTS.md
(continuation lines joined, `A && B` run as two steps). Each document runs in its own working
folder, holding what its commands name but do not make themselves (`./my-llama`, `my.txt`, an
image folder, a task folder). What makes a command small is said once per tool (SMALL_SETTINGS);
what cannot run on a CPU machine without network is named with its reason in NOT_RUN, and every
NOT_RUN entry must still match a command."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from lm_task_files import multiple_choice_task
from script_loader import ROOT

pytestmark = pytest.mark.docs

DOCUMENTS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")), "benchmarks/RESULTS.md"]
PROGRAMS = ("lrq", "python", "torchrun", "bash", "pip", "pytest")
# Tutorials run top to bottom in one folder (later commands use earlier outputs); every fenced block
# of the other documents is a recipe of its own, run in a fresh folder.
TUTORIALS = {"README.md"}

NOT_RUN = {  # a part of the command -> why this smoke run does not run it
    "pip install": "the environment under test is the one the README's command installed",
    "pytest -q -n auto": "the README's test command: this suite",
    "--tasks piqa,arc_easy": "lm-eval's hub tasks download their datasets (no network in CI); the local YAML task runs",
    "peer_decode.py": "times a peer's graphs in the peer's own virtual environment, built by hand (its docstring)",
}


@dataclass(frozen=True)
class DocCommand:
    document: str
    line: int
    text: str
    block: int = 0  # which fenced block of the document (1, 2, ...)

    def __str__(self):
        return f"{self.document}:{self.line}: {self.text}"


def doc_commands(document: str) -> list[DocCommand]:
    """The shell commands of a document's fenced blocks, `A && B` split into steps."""
    commands, fenced, in_block, pending, start, block = [], False, False, "", 0, 0
    for number, line in enumerate((ROOT / document).read_text().splitlines(), 1):
        if line.startswith("```"):  # a fence opens or closes a block; only shell blocks (or bare ones) run
            fenced = not fenced
            in_block = fenced and line.strip() in ("```", "```bash", "```sh", "```shell")
            block += in_block
            continue
        if not in_block:
            continue
        text = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        if pending:
            text = f"{pending} {text}"
        else:
            start = number
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        pending = ""
        if text.split(" ")[0] in PROGRAMS:
            commands += [DocCommand(document, start, step.strip(), block) for step in text.split(" && ")]
    return commands


def not_run_reason(command: DocCommand) -> str | None:
    return next((why for part, why in NOT_RUN.items() if part in command.text), None)


# -- small settings: one rule per tool --------------------------------------------------------

LEARNABLE = {"omniquant", "lrquant", "lrquant+"}
SMALL_MODEL = ["--hidden", "128", "--intermediate", "256", "--heads", "4"]


def _set(argv: list[str], option: str, value: str) -> list[str]:
    """argv with option given value (replaced when present, appended when not)."""
    if option in argv:
        argv = list(argv)
        argv[argv.index(option) + 1] = value
        return argv
    return [*argv, option, value]


def _option(argv: list[str], option: str, default: str | None = None) -> str | None:
    return argv[argv.index(option) + 1] if option in argv else default


def small_lrq(argv: list[str]) -> list[str]:
    command = argv[1]
    if command == "calibrate" and "--resume" not in argv:
        if _option(argv, "--method", "rtn") in LEARNABLE:
            argv = _set(argv, "--epochs", "1")
        argv = _set(argv, "--nsamples", _option(argv, "--batch-size", "2"))
        if not any("vit" in a or "deit" in a for a in argv):
            argv = _set(argv, "--seq-len", "32")
    elif command == "eval":
        argv = _set(argv, "--limit", "2")
    elif command == "export" and "--no-verify" not in argv and "--vllm" not in argv:
        argv = _set(argv, "--limit", "4")
    elif command == "bench" and "--decode" in argv:
        argv = _set(_set(_set(argv, "--prompt-len", "8"), "--new-tokens", "4"), "--iterations", "1")
    elif command == "bench":
        argv = _set(_set(argv, "--duration", "0.2"), "--warm-up", "10")
        if "--seq-len" in argv:
            argv = _set(argv, "--seq-len", "16")
    return argv


def small_python(argv: list[str]) -> list[str]:
    script = Path(argv[1]).name
    if script == "random_llama.py":
        argv = [*argv, *SMALL_MODEL, "--kv-heads", "4"]
    elif script == "offload_memory.py":
        argv = [*argv, *SMALL_MODEL, "--layers", "1", "2"]
    return argv


def small_settings(argv: list[str]) -> list[str]:
    if argv[0] == "lrq":
        return small_lrq(argv)
    if argv[0] == "torchrun":
        at = argv.index("calibrate") - 1  # the lrq program torchrun starts
        return [*argv[:at], *small_lrq(argv[at:])]
    if argv[0] == "python":
        return small_python(argv)
    return argv


# -- what the documents name but do not make ---------------------------------------------------

@pytest.fixture(scope="session")
def my_llama_dir(tmp_path_factory) -> Path:
    """A user's LLaMA as the README means it: widths that groups of 128 divide (2 layers, hidden 128,
    grouped-query attention 4/2 heads, random weights), the bundled tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    out = tmp_path_factory.mktemp("my-llama")
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "lrq_deploy" / "assets" / "llama-wikitext2" / name, out / name)
    return out


def user_files(work: Path, my_llama_dir: Path, tiny_deit_dir: Path, digits_folder: Path) -> None:
    assets = ROOT / "lrq_deploy" / "assets"
    shutil.copytree(my_llama_dir, work / "my-llama")
    shutil.copytree(tiny_deit_dir, work / "my-deit")
    shutil.copytree(digits_folder, work / "imagenet" / "train")
    (work / "my.txt").write_text((assets / "data" / "wikitext2-calib.txt").read_text()[:20000])
    (work / "my-tasks").mkdir()
    multiple_choice_task(work / "my-tasks", "my_task")


def run_command(command: DocCommand, work: Path, env: dict) -> subprocess.CompletedProcess:
    """The command as a user types it: python scripts, torchrun and the README's quickstart as
    processes (the installed `lrq` script included); other `lrq` commands through the same CLI in
    this process (click's runner), which saves each the seconds of importing torch afresh."""
    text = command.text.replace("$(which lrq)", shutil.which("lrq") or "lrq")
    argv = small_settings(shlex.split(text))
    if argv[0] == "lrq" and not (command.document in TUTORIALS and command.block == 1):
        return _in_process(argv[1:], work, env)
    if "--workdir" in argv:  # a scratch folder the document puts under /tmp: kept inside the test's
        argv = _set(argv, "--workdir", str(work / Path(_option(argv, "--workdir")).name))
    if argv[0] == "python":  # scripts of the checkout, run from wherever the user works
        argv[0] = sys.executable
        if (ROOT / argv[1]).is_file():
            argv[1] = str(ROOT / argv[1])
    return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)


def _in_process(args: list[str], work: Path, env: dict) -> subprocess.CompletedProcess:
    import traceback

    from click.testing import CliRunner

    from lrq_deploy.cli import main

    here = os.getcwd()
    os.chdir(work)  # the documents' paths are relative to where the user works
    try:
        result = CliRunner().invoke(main, args, env={k: v for k, v in env.items() if os.environ.get(k) != v})
    finally:
        os.chdir(here)
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        output += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["lrq", *args], result.exit_code, output, "")


def run_commands(commands: list[DocCommand], work: Path) -> list[str]:
    """Failures of `commands`, run in order in `work`; prints each command's time (pytest -s)."""
    env = {**os.environ, "LRQ_CACHE": str(work / ".lrq-cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": ""}
    failures = []
    for command in commands:
        if not_run_reason(command):
            print(f"not run  {command} ({not_run_reason(command)})")
            continue
        start = time.monotonic()
        proc = run_command(command, work, env)
        print(f"{time.monotonic() - start:6.1f} s  {command}")
        if proc.returncode != 0:
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            errors = [line for line in lines if line.lstrip().startswith(("error:", "Error:"))][:3]
            shown = "\n  ".join(errors + lines[-6:])
            failures.append(f"{command}\n  exit {proc.returncode}:\n  {shown}")
    return failures


def runs() -> list[tuple[str, int | None]]:
    """(document, block): a tutorial as a whole (block None), every block of a recipe document alone."""
    found = []
    for document in DOCUMENTS:
        blocks = sorted({c.block for c in doc_commands(document) if not not_run_reason(c)})
        found += [(document, None)] if document in TUTORIALS else [(document, b) for b in blocks]
    return found


@pytest.mark.parametrize("document,block", runs(), ids=[f"{d}-{b or 'all'}" for d, b in runs()])
def test_document_commands_run(document, block, tmp_path, my_llama_dir, tiny_deit_dir, digits_folder):
    user_files(tmp_path, my_llama_dir, tiny_deit_dir, digits_folder)
    commands = [c for c in doc_commands(document) if block is None or c.block == block]
    failures = run_commands(commands, tmp_path)
    assert not failures, "\n\n".join(failures)


def test_every_not_run_entry_names_a_command():
    commands = [c for d in DOCUMENTS for c in doc_commands(d)]
    assert {part for part in NOT_RUN if any(part in c.text for c in commands)} == set(NOT_RUN)


def test_commands_are_read_from_the_documents():
    export = doc_commands("docs/EXPORT.md")  # a ```text synopsis first: not run, and its fence closes cleanly
    assert export[0].text == "lrq calibrate -o runs/w4 --wbits 4 --group-size 64" and export[0].block == 1
    readme = doc_commands("README.md")
    assert readme[0].text == "pip install -e ." and readme[1].text.startswith("lrq calibrate -o runs/demo")
    assert any(c.text.startswith("torchrun --nproc-per-node 2") for c in readme)
    bench = doc_commands("benchmarks/RESULTS.md")
    decode = next(c for c in bench if c.text.startswith("lrq bench --decode --compare llama.onnx"))
    assert decode.text.endswith("--prompt-len 64 --new-tokens 64 --threads 1")  # continuation joined, comment dropped


def test_small_settings():
    assert small_settings(shlex.split("lrq calibrate -o r --method lrquant+ --epochs 10 --batch-size 4")) == \
        shlex.split("lrq calibrate -o r --method lrquant+ --epochs 1 --batch-size 4 --nsamples 4 --seq-len 32")
    assert small_settings(shlex.split("lrq calibrate -o r --resume")) == shlex.split("lrq calibrate -o r --resume")
    assert small_settings(["torchrun", "--nproc-per-node", "2", "/bin/lrq", "calibrate", "m", "-o", "r"]) == \
        ["torchrun", "--nproc-per-node", "2", "/bin/lrq", "calibrate", "m", "-o", "r", "--nsamples", "2", "--seq-len", "32"]
    assert re.search("--limit 2", " ".join(small_settings(shlex.split("lrq eval q --limit 500"))))
