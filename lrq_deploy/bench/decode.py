"""`lrq bench --decode`: generation speed as LLM users judge it.

A prompt of P tokens (prefill; prompts longer than the prefill chunk, 4096 tokens unless
--prefill-chunk says otherwise, in chunks that each extend the cache: what a long context needs
where one pass's attention scores would not fit), then N tokens generated greedily one at a time
with a KV cache, for a batch of B sequences. Reported: time to first token (the prefill), per-token
latency percentiles of the decode steps, and decode throughput in tokens per second
(B x generated tokens / decode time). One untimed generation warms up, then `runs`
generations are measured.

Targets: a quantized checkpoint or a full-precision HF directory (PyTorch, with a KV cache;
the Triton kernels on CUDA where they serve the scheme), or an ONNX graph exported with
`--with-past` (onnxruntime, one graph for prefill and decode).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrq_deploy.bench.stats import DEFAULT_PERCENTILES, check_options, summarize
from lrq_deploy.bench.report import threads_note
from lrq_deploy.progress import bar, step
from lrq_deploy.errors import LrqError
from lrq_deploy.graph_io import ATTENTION_MASK, PAST_PREFIX, PRESENT_PREFIX
from lrq_deploy.runtime.onnxrt import OrtSession, next_past, step_feeds


# Prompts up to this many tokens are one prefill pass; longer ones go in pieces of it (float attention
# scores of one pass: heads x P x P floats, 2 GiB for 32 heads at 4096)
PREFILL_CHUNK = 4096


@dataclass(frozen=True)
class DecodeOptions:
    batch: int = 1
    prompt_len: int = 128
    new_tokens: int = 64
    runs: int = 3
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    device: str = "auto"
    threads: int | None = None  # intra-op threads of onnxruntime / torch (None: their defaults)
    prefill_chunk: int = PREFILL_CHUNK  # the longest piece of the prompt run at once

    def __post_init__(self):
        check_options((("--batch", self.batch, 1), ("--prompt-len", self.prompt_len, 1), ("--new-tokens", self.new_tokens, 2),
                       ("--iterations", self.runs, 1), ("--prefill-chunk", self.prefill_chunk, 1)),
                      self.percentiles, " for --decode")

    @property
    def prefill_chunks(self) -> int:
        """How many pieces the prompt is prefilled in."""
        return -(-self.prompt_len // self.prefill_chunk)


class Decoder:
    """One greedy generation at a time: prefill resets the cache."""

    name = ""
    device = "cpu"
    max_positions: int | None = None
    kv_bytes_per_token: float | None = None  # what one token adds to the cache of one sequence (all layers)
    chunks_for_one_sequence_only = False  # extend() takes several tokens only at batch 1

    def reserve(self, total: int) -> None:
        """The longest generation to come (prompt + new tokens): a decoder may size its cache by it."""

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Run the prompt [B, P]; return the next tokens [B]."""
        raise NotImplementedError

    def extend(self, ids: np.ndarray) -> np.ndarray:
        """Append tokens [B, S] after the cache (the next piece of a prompt); return the next tokens [B]."""
        raise NotImplementedError

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Append tokens [B] to the cache; return the next tokens [B]."""
        return self.extend(tokens[:, None].astype(np.int64))

    def prefill_in_chunks(self, ids: np.ndarray, chunk: int) -> np.ndarray:
        """The prompt in pieces of at most `chunk` tokens: the first resets the cache, each later one extends it."""
        tokens = self.prefill(ids[:, :chunk])
        for start in range(chunk, ids.shape[1], chunk):
            tokens = self.extend(ids[:, start:start + chunk])
        return tokens


class TorchDecoder(Decoder):
    """An HF causal LM in PyTorch (a quantized checkpoint or a full-precision directory)."""

    name = "torch"

    def __init__(self, loaded, device, description: str):
        import torch

        model = loaded.model
        self.torch, self.model, self.dev = torch, model.eval(), device
        self.device = device.type
        self.description = description
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.kv_bytes_per_token = _torch_cache_bytes(loaded)
        self.cache = None

    def _next(self, ids) -> np.ndarray:
        from lrq_deploy.models.hf import cache_argument, output_cache

        torch = self.torch
        with torch.no_grad():
            out = self.model(input_ids=torch.from_numpy(ids).to(self.dev), use_cache=True,
                             **cache_argument(self.model, self.cache))
        self.cache = output_cache(out)
        tokens = out.logits[:, -1].argmax(-1)
        return tokens.cpu().numpy()  # the copy to the host synchronizes, as a generation loop must

    def prefill(self, ids):
        self.cache = None
        return self._next(ids)

    def extend(self, ids):
        return self._next(ids)


class OrtDecoder(Decoder):
    """A `--with-past` ONNX graph in onnxruntime: present.* outputs feed the next step's past.*.

    A graph that takes an attention mask (its cache kept in place: lrq export --genai) runs on the
    CPU as onnxruntime-genai runs it: one buffer per layer of the full length is bound as past and
    present at once, and GroupQueryAttention appends each step's keys and values to it."""

    name = "ort"

    def __init__(self, path: Path, device: str = "auto"):
        self.ort = OrtSession(path, device=device)
        if not self.ort.has_kv_cache:
            raise LrqError(f"{path} has no KV-cache inputs; export it with lrq export --with-past for --decode")
        self.session, self.device, self.max_positions = self.ort.session, self.ort.device, self.ort.max_positions
        inputs = self.session.get_inputs()
        self.in_place = self.device == "cpu" and any(i.name == ATTENTION_MASK for i in inputs)
        self.description = f"{path.name}, onnxruntime {self.device}" + (", cache in place" if self.in_place else "")
        # onnxruntime's GroupQueryAttention: "batch_size must be 1 when sequence_length > 1 and past context is given"
        self.chunks_for_one_sequence_only = _uses_op(path, "GroupQueryAttention")
        self.past_specs = [i for i in inputs if i.name.startswith(PAST_PREFIX)]
        from lrq_deploy.runtime.onnxrt import ORT_TYPES

        self.kv_bytes_per_token = sum(s.shape[1] * s.shape[3] * np.dtype(ORT_TYPES.get(s.type, "float32")).itemsize
                                      for s in self.past_specs)
        self.capacity, self.length = 0, 0
        self.feeds: dict = {}

    def reserve(self, total):
        self.capacity = total

    def _run(self, feeds: dict) -> np.ndarray:
        outputs = self.ort.run(feeds)
        self.feeds = next_past(outputs)
        return outputs["logits"][:, -1].argmax(-1)

    def _run_in_place(self, ids: np.ndarray) -> np.ndarray:
        self.length += ids.shape[1]
        if self.length > self.capacity:  # past what was reserved: a cache twice as long, filled from this one
            self._allocate(ids.shape[0], 2 * self.length)
        binding = self.session.io_binding()
        binding.bind_output("logits")
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input(ATTENTION_MASK, np.ones((ids.shape[0], self.length), dtype=np.int64))
        for name, buffer in self.cache.items():
            binding.bind_ortvalue_input(name, buffer)
            binding.bind_ortvalue_output(name.replace(PAST_PREFIX, PRESENT_PREFIX), buffer)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[:, -1].argmax(-1)

    def prefill(self, ids):
        if not self.in_place:
            return self._run(step_feeds(self.session, ids))
        self.cache, self.length = {}, 0
        self._allocate(ids.shape[0], max(self.capacity, ids.shape[1]))
        return self._run_in_place(ids)

    def _allocate(self, batch: int, capacity: int) -> None:
        from onnxruntime import OrtValue

        cache = {}
        for spec in self.past_specs:
            buffer = np.zeros((batch, spec.shape[1], capacity, spec.shape[3]), dtype=np.float32)
            if spec.name in self.cache:
                old = self.cache[spec.name].numpy()
                buffer[:, :, :old.shape[2]] = old
            cache[spec.name] = OrtValue.ortvalue_from_numpy(buffer)
        self.cache, self.capacity = cache, capacity

    def extend(self, ids):
        return self._run_in_place(ids) if self.in_place else self._run(step_feeds(self.session, ids, self.feeds))


def _uses_op(path: Path, op_type: str) -> bool:
    import onnx

    return any(n.op_type == op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _torch_cache_bytes(loaded) -> float:
    """The torch reference keeps its cache in the model's float type, quantized cache or not."""
    from lrq_deploy.quant.kv_cache import kv_bytes_per_token

    config = loaded.model.config
    kv_heads, head_dim = loaded.adapter.kv_cache_shape(config)
    itemsize = next(loaded.model.parameters()).element_size()
    return kv_bytes_per_token("none", config.num_hidden_layers, kv_heads, head_dim) * itemsize / 4


def make_decoder(target: Path, device: str) -> Decoder:
    """The decoder for a checkpoint directory, a full-precision HF directory or a with-past graph
    (an lrq export directory: the graph in it)."""
    from lrq_deploy.models import BUNDLED

    if str(target) in BUNDLED:
        return _torch_decoder(target, device)
    from lrq_deploy.artifacts import Kind, resolve_artifact

    kind, target = resolve_artifact(target, "benchmark target")
    if kind is Kind.ONNX:
        return OrtDecoder(target, device)
    if kind is Kind.ENGINE:
        raise LrqError("--decode runs checkpoints, HF directories and --with-past ONNX graphs; engines are timed per "
                       "inference (lrq bench without --decode)")
    return _torch_decoder(target, device)


def _torch_decoder(target: Path, device: str) -> TorchDecoder:
    from lrq_deploy.devices import resolve_device
    from lrq_deploy.runtime.torch_models import load_torch_target

    dev = resolve_device(device)
    torch_target = load_torch_target(target, dev)
    loaded = torch_target.loaded
    if loaded.adapter.task != "causal_lm":
        raise LrqError(f"--decode applies to causal language models; {target} is a {loaded.adapter.task} model")
    return TorchDecoder(loaded, dev, f"{Path(target).name}, {torch_target.path_name}, {dev.type}")


def measure_decode(decoder: Decoder, options: DecodeOptions) -> dict:
    """Warm up with one generation, then time `runs` generations."""
    total = options.prompt_len + options.new_tokens
    if decoder.max_positions and total > decoder.max_positions:
        raise LrqError(f"--prompt-len + --new-tokens = {total} exceeds the model's {decoder.max_positions} positions")
    prompt = np.random.default_rng(0).integers(0, 100, (options.batch, options.prompt_len), dtype=np.int64)
    chunks = options.prefill_chunks
    if chunks > 1 and options.batch > 1 and decoder.chunks_for_one_sequence_only:
        raise LrqError(f"{decoder.description}: onnxruntime's GroupQueryAttention extends a cache by several tokens "
                       f"for one sequence only; use --batch 1, or --prefill-chunk {options.prompt_len} (one pass)")
    decoder.reserve(total)
    with step(f"warming up {decoder.name}"):
        _generate(decoder, prompt, options.new_tokens, options.prefill_chunk)
    first, steps, decode_s = [], [], 0.0
    for _ in bar(range(options.runs), f"decode {decoder.name}", unit="run"):
        ttft, latencies = _generate(decoder, prompt, options.new_tokens, options.prefill_chunk)
        first.append(ttft)
        steps += latencies
        decode_s += sum(latencies) / 1e3
    generated = options.batch * (options.new_tokens - 1) * options.runs
    return {
        "mode": "decode",
        "backend": decoder.name,
        "device": decoder.device,
        "workload": f"{decoder.description}; batch {options.batch}, prompt {options.prompt_len}"
                    f"{_chunks_note(options)}, "
                    f"{options.new_tokens} new tokens",
        "batch": options.batch,
        "prompt_len": options.prompt_len,
        "prefill_chunks": chunks,
        "new_tokens": options.new_tokens,
        "runs": options.runs,
        "ttft_ms": summarize(first, options.percentiles)["mean"],
        "ttft": summarize(first, options.percentiles),
        "token_latency_ms": summarize(steps, options.percentiles),
        "tokens_per_s": generated / decode_s,
        "prefill_tokens_per_s": options.batch * options.prompt_len / (sum(first) / len(first) / 1e3),
        "kv_bytes_per_token": decoder.kv_bytes_per_token,
        "kv_cache_peak_bytes": None if decoder.kv_bytes_per_token is None else
        decoder.kv_bytes_per_token * options.batch * total,
    }


def _chunks_note(options: DecodeOptions) -> str:
    chunks = options.prefill_chunks
    return f" (prefilled in {chunks} chunks of {options.prefill_chunk})" if chunks > 1 else ""


def _generate(decoder: Decoder, prompt: np.ndarray, new_tokens: int,
              chunk: int = PREFILL_CHUNK) -> tuple[float, list[float]]:
    """(time to first token, per-step latencies), both in ms."""
    start = time.perf_counter()
    tokens = decoder.prefill_in_chunks(prompt, chunk)
    ttft = (time.perf_counter() - start) * 1e3
    latencies = []
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        tokens = decoder.step(tokens)
        latencies.append((time.perf_counter() - start) * 1e3)
    return ttft, latencies


def decode_summary(result: dict) -> str:
    lat = result["token_latency_ms"]
    points = ", ".join(f"percentile({p}%) = {v:.5g} ms" for p, v in lat["percentiles"].items())
    return "\n".join([
        f"=== Decode summary ({result['backend']} on {result['device']}: {result['workload']}{threads_note(result)}) ===",
        f"Throughput: {result['tokens_per_s']:.5g} tokens/s generated (prefill {result['prefill_tokens_per_s']:.5g} tokens/s)",
        f"Time to first token: mean = {result['ttft_ms']:.5g} ms",
        f"Per-token latency: min = {lat['min']:.5g} ms, mean = {lat['mean']:.5g} ms, median = {lat['median']:.5g} ms, {points}",
        *([f"KV cache: {result['kv_bytes_per_token']:.6g} bytes per token, peak {result['kv_cache_peak_bytes'] / 2**20:.4g} MiB"]
          if result.get("kv_bytes_per_token") else []),
    ])


def decode_comparison(results: list[tuple[str, dict]]) -> str:
    """One table; speed-up in generated tokens/s against the first target."""
    from lrq_deploy.bench.report import ratio

    base = results[0][1]["tokens_per_s"]
    header = f"{'target':<40}{'backend':>8}{'TTFT ms':>10}{'ms/token':>10}{'tokens/s':>11}{'KV B/token':>12}{'speedup':>9}"
    lines = [header, "-" * len(header)]
    for name, r in results:
        kv = f"{r['kv_bytes_per_token']:.6g}" if r.get("kv_bytes_per_token") else "-"
        lines.append(f"{name[-40:]:<40}{r['backend']:>8}{r['ttft_ms']:>10.4g}{r['token_latency_ms']['mean']:>10.4g}"
                     f"{r['tokens_per_s']:>11.4g}{kv:>12}{ratio(r['tokens_per_s'] / base):>9}")
    return "\n".join(lines)
