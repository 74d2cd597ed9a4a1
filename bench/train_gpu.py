"""LoRA DPO and KTO training throughput and MFU: the project's configuration against TRL's
defaults, on the same model and data, in one run.

For each method (DPO, KTO), sequence length (default 1024 and 2048) and configuration, one
training run on a freshly built, randomly initialised model of a real architecture's shape
(Qwen2.5-1.5B by default; the GPU machine has neither internet nor weights), timed after
``--warmup-steps`` optimizer steps for ``--steps`` more:

* **project**: ``learner.training.build_config`` with ``LearnerSettings(max_length=SEQ)`` and
  every other setting at its default: exactly what ``train_adapter`` runs on this device.
* **trl**: ``DPOConfig`` / ``KTOConfig`` with only what a run needs: ``output_dir``,
  ``max_steps``, ``report_to=[]``, ``max_length=SEQ`` (TRL's default of 1024 would cut the 2048
  runs to a different workload) and the precision (bf16 on a GPU, float32 on CPU like the
  project).

Both get the project's LoRA configuration (``LearnerSettings`` lora_r/alpha/dropout/targets),
the same tokenizer and the same synthetic conversations: random English words, a prompt of
SEQ/8 words and answers of SEQ words, so that prompt + answer exceeds SEQ tokens and TRL's
``keep_start`` truncation makes every sequence exactly SEQ tokens long (no padding).

Measured, over the timed steps only (CUDA synchronised before each clock reading):

* **tokens/s**: non-padding tokens the model processed: ``attention_mask`` of chosen and
  rejected sequences for DPO; for KTO the completion sequences plus the KL sequences (TRL 1.16
  builds one mismatched prompt/completion sequence per example and runs it through the policy
  and the reference). Counted from every micro-batch that reaches ``training_step``.
* **step time**: seconds per optimizer step (all its micro-batches, the optimizer, logging).
* **peak memory**: ``torch.cuda.max_memory_allocated`` over the whole run (weights included).
* **MFU**: model FLOPs per second over ``--peak-tflops`` (default 989.4, H100 SXM dense bf16).

FLOPs accounting (model FLOPs: recomputation is not counted, so gradient checkpointing lowers
MFU; a multiply-add is 2 FLOPs). Per sequence of ``s`` non-padding tokens with ``c`` positions
scored by the LM head:

* ``N_body``: weights of the decoder layers' linear layers (attention and MLP projections);
  ``N_lora``: the LoRA A and B matrices; ``N_head``: the LM head (vocab x hidden). Embedding
  lookups cost nothing. ``L`` layers, ``d`` = heads x head dim.
* forward = ``2*N_body*s + 2*N_lora*s + 2*N_head*c + 2*L*d*s^2`` (attention: QK^T and PV,
  ``4*d*s^2`` per layer, halved for the causal mask); a forward with the adapter disabled has
  no LoRA term.
* backward = ``2*N_body*s + 4*N_lora*s + 2*N_head*c + 4*L*d*s^2``: the base weights are
  frozen, so only activation gradients go through them (one matmul per linear layer instead of
  two); the LoRA matrices get both; attention's backward is twice its forward.
* DPO, per chosen and per rejected sequence: trained forward + backward + the reference forward
  (adapter disabled): ``6*N_body*s + 6*N_lora*s + 6*N_head*c + 8*L*d*s^2``.
* KTO, per completion sequence: the same; per KL sequence: a policy forward without gradients
  plus a reference forward: ``4*N_body*s + 2*N_lora*s + 4*N_head*c + 4*L*d*s^2``.
* ``c``: on CUDA (Triton) TRL's fused LM head scores only completion positions; elsewhere it
  scores every position of the padded batch, and that is what is counted.

``--smoke`` builds a tiny model of the same architecture (hidden 64, 2 layers, the tokenizer's
vocabulary), runs sequences of 48 and 96 tokens for 1 + 1 steps and sets the project's
batch_size=2, gradient_accumulation_steps=2 (``--set`` shows how): the same code path, in well
under a minute on a CPU, where ``build_config`` takes its CPU branch. MFU there is n/a unless
``--peak-tflops`` gives the CPU's peak. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch

# Run as a script on a machine where the project is not installed (the GPU machine): the repo
# root holds learner/ and services/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from learner.training import Method, build_config, lora_config, training_device
from services.settings import LearnerSettings

Config = Literal["project", "trl"]
H100_SXM_BF16_DENSE_TFLOPS = 989.4

# Model shapes (from the models' published config.json); vocab comes from the tokenizer.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": {
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {  # llama3 rope scaling left out: it changes no cost
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rope_theta": 500_000.0,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "smoke": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
}

_WORDS_TEXT = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part "
    "over new sound take only little work know place year live me back give most very after "
    "thing our just name good sentence man think say great where help through much before "
    "line right too mean old any same tell boy follow came want show also around form three "
    "small set put end does another well large must big even such because turn here why ask "
    "went men read need land different home us move try kind hand picture again change off "
    "play spell air away animal house point page letter mother answer found study still "
    "learn should america world high every near add food between own below country plant "
    "last school father keep tree never start city earth eye light thought head under story "
    "saw"
)
WORDS = tuple(_WORDS_TEXT.split())


@dataclass
class Shape:
    """What the FLOPs accounting needs from the model (module docstring)."""

    layers: int
    attn_width: int
    body_params: int
    head_params: int
    lora_params: int = 0


@dataclass
class Result:
    method: str
    seq_len: int
    config: str
    ok: bool = True
    error: str = ""
    tokens_per_s: float = 0.0
    tflops: float = 0.0
    mfu: float | None = None
    peak_mem_gib: float | None = None
    step_time_s: float = 0.0
    tokens_per_step: float = 0.0
    tokens_per_sequence: float = 0.0
    per_device_batch: int = 0
    grad_accum: int = 0
    grad_checkpointing: bool = False
    lora_params: int = 0
    settings: dict[str, Any] = field(default_factory=dict)


class Meter:
    """Sums what each micro-batch holds, for the main and for the KL sequences: non-padding
    tokens, their squares (attention) and the positions the LM head scores. Sums of tensors
    stay on the device (no synchronisation per micro-batch); shapes are counted on the host."""

    def __init__(self, device: torch.device, compact: bool) -> None:
        self.device = device
        self.compact = compact
        self.acc = torch.zeros(6, dtype=torch.float64, device=device)
        self.host = [0.0, 0.0, 0.0]  # scored positions when not compact (main, KL), rows

    def add(self, inputs: dict[str, Any]) -> None:
        parts: list[torch.Tensor] = []
        for i, prefix in enumerate(("", "KL_")):
            mask = inputs.get(f"{prefix}attention_mask")
            if mask is None:
                parts.append(torch.zeros(3, dtype=torch.float64, device=self.device))
                continue
            mask = mask.to(self.device)
            tokens = mask.sum(dim=1, dtype=torch.float64)
            if self.compact:  # labels[:, 1:] != -100: completion positions
                completion = inputs[f"{prefix}completion_mask"].to(self.device)
                scored = completion[:, 1:].sum(dtype=torch.float64)
            else:  # every position of the padded batch but the last
                scored = torch.zeros((), dtype=torch.float64, device=self.device)
                self.host[i] += mask.shape[0] * (mask.shape[1] - 1)
            parts.append(torch.stack([tokens.sum(), (tokens * tokens).sum(), scored]))
            self.host[2] += mask.shape[0]
        self.acc += torch.cat(parts)

    def read(self) -> list[float]:
        """[tokens, sum of squares, scored] for main and KL sequences, then rows."""
        s, s2, c, kl_s, kl_s2, kl_c = (float(x) for x in self.acc.tolist())
        c += self.host[0]
        kl_c += self.host[1]
        return [s, s2, c, kl_s, kl_s2, kl_c, self.host[2]]


def flops(shape: Shape, sums: list[float]) -> float:
    """Model FLOPs of the counted sequences (module docstring)."""
    s, s2, c, kl_s, kl_s2, kl_c, _rows = sums
    nb, nl, nh = shape.body_params, shape.lora_params, shape.head_params
    ld = shape.layers * shape.attn_width
    trained = (6 * nb + 6 * nl) * s + 6 * nh * c + 8 * ld * s2
    kl = (4 * nb + 2 * nl) * kl_s + 4 * nh * kl_c + 4 * ld * kl_s2
    return trained + kl


def lm_head_scores_completions_only(device: torch.device) -> bool:
    try:
        from trl.kernels.chunked_logprob import _use_triton  # noqa: PLC0415

        return bool(_use_triton(device))
    except ImportError:  # a TRL without this module: its CUDA path scores completions only
        return device.type == "cuda"


def load_tokenizer(folder: str | None) -> Any:
    from transformers import AutoTokenizer  # noqa: PLC0415

    if folder is None:
        from services.models import ensure_base_model  # noqa: PLC0415
        from services.settings import WildloopSettings  # noqa: PLC0415

        folder = str(ensure_base_model(WildloopSettings()))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(name: str, vocab: int, device: str, dtype: torch.dtype) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    values = dict(SHAPES[name])
    config = AutoConfig.for_model(values.pop("model_type"), vocab_size=vocab, **values)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def model_shape(model: Any) -> Shape:
    head = model.get_output_embeddings()
    body = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Shape(
        layers=config.num_hidden_layers,
        attn_width=config.num_attention_heads * head_dim,
        body_params=body,
        head_params=head.weight.numel(),
    )


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def synthetic_rows(method: Method, seq_len: int, n: int, seed: int) -> list[dict[str, Any]]:
    """Conversations whose prompt + answer exceed ``seq_len`` tokens (every word is at least
    one token), so truncation to ``max_length=seq_len`` makes each sequence exactly that long."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        prompt = [{"role": "user", "content": words(rng, max(4, seq_len // 8))}]

        def answer() -> list[dict[str, str]]:
            return [{"role": "assistant", "content": words(rng, seq_len)}]

        if method == "dpo":
            rows.append({"prompt": prompt, "chosen": answer(), "rejected": answer()})
        else:
            rows.append({"prompt": prompt, "completion": answer(), "label": i % 2 == 0})
    return rows


def trl_default_config(
    method: Method, output_dir: Path, *, max_steps: int, seq_len: int, device: str, dtype: Any
) -> Any:
    from trl import DPOConfig, KTOConfig  # noqa: PLC0415

    args: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": max_steps,
        "report_to": [],
        "max_length": seq_len,
        "bf16": device == "cuda" and dtype == torch.bfloat16,
        "fp16": device == "cuda" and dtype == torch.float16,
    }
    return DPOConfig(**args) if method == "dpo" else KTOConfig(**args)


def run_one(
    args: argparse.Namespace,
    tokenizer: Any,
    *,
    method: Method,
    seq_len: int,
    config_name: Config,
    device: str,
    dtype: Any,
) -> Result:
    from datasets import Dataset  # noqa: PLC0415
    from transformers import TrainerCallback  # noqa: PLC0415
    from trl import DPOTrainer, KTOTrainer  # noqa: PLC0415

    result = Result(method=method, seq_len=seq_len, config=config_name)
    cuda = device == "cuda"
    settings = LearnerSettings(**{**args.overrides, "max_length": seq_len})
    total_steps = args.warmup_steps + args.steps
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(args.model, len(tokenizer), device, dtype)
    shape = model_shape(model)
    with tempfile.TemporaryDirectory(prefix="wildloop-bench-") as tmp:
        if config_name == "project":
            config = build_config(
                method,
                settings,
                Path(tmp),
                max_steps=total_steps,
                device=device,
                dtype=dtype,
                model=model,
            )
        else:
            config = trl_default_config(
                method,
                Path(tmp),
                max_steps=total_steps,
                seq_len=seq_len,
                device=device,
                dtype=dtype,
            )
        result.per_device_batch = config.per_device_train_batch_size
        result.grad_accum = config.gradient_accumulation_steps
        result.grad_checkpointing = bool(config.gradient_checkpointing)
        result.settings = {
            k: getattr(config, k)
            for k in (
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "gradient_checkpointing",
                "bf16",
                "fp16",
                "max_length",
                "logging_steps",
                "dataloader_num_workers",
                "learning_rate",
                "lr_scheduler_type",
            )
        }
        examples = config.per_device_train_batch_size * config.gradient_accumulation_steps
        rows = synthetic_rows(method, seq_len, examples * total_steps, seed=seq_len)
        peft_config = lora_config(settings)
        meter = Meter(torch.device(device), lm_head_scores_completions_only(torch.device(device)))
        marks: dict[int, tuple[float, list[float]]] = {}
        timed = {args.warmup_steps, total_steps}

        class Clock(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, _args: Any, state: Any, control: Any, **_: Any) -> None:
                if state.global_step in timed:
                    if cuda:
                        torch.cuda.synchronize()
                    marks[state.global_step] = (time.perf_counter(), meter.read())

        trainer_cls = DPOTrainer if method == "dpo" else KTOTrainer
        trainer = trainer_cls(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Clock()],
        )
        shape.lora_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        result.lora_params = shape.lora_params
        step = trainer.training_step

        def counted(model: Any, inputs: dict[str, Any], *rest: Any, **kwargs: Any) -> Any:
            meter.add(inputs)
            return step(model, inputs, *rest, **kwargs)

        trainer.training_step = counted
        try:
            trainer.train()
        finally:  # main collects the rest (counted -> step -> trainer is a cycle) after return
            del trainer, model
    if set(marks) != timed:
        raise RuntimeError(f"timed steps {sorted(timed)} not reached (got {sorted(marks)})")
    (t0, c0), (t1, c1) = marks[args.warmup_steps], marks[total_steps]
    seconds = t1 - t0
    sums = [b - a for a, b in zip(c0, c1, strict=True)]
    tokens = sums[0] + sums[3]
    result.tokens_per_s = tokens / seconds
    result.step_time_s = seconds / args.steps
    result.tokens_per_step = tokens / args.steps
    result.tokens_per_sequence = tokens / sums[6] if sums[6] else 0.0
    result.tflops = flops(shape, sums) / seconds / 1e12
    if args.peak_tflops:
        result.mfu = result.tflops / args.peak_tflops
    if cuda:
        result.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
    return result


def table(results: list[Result]) -> str:
    lines = [
        "| method | seq len | config | tokens/s | MFU % | peak GPU mem GiB | step time s | "
        "speed-up vs TRL default | batch x accum, checkpointing | tokens/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r.method, r.seq_len, r.config): r for r in results}
    for r in results:
        if not r.ok:
            lines.append(
                f"| {r.method.upper()} | {r.seq_len} | {r.config} | failed: {r.error} | | | | | | |"
            )
            continue
        base = by_key.get((r.method, r.seq_len, "trl"))
        if r.config == "project" and base is not None and base.ok and base.tokens_per_s:
            speedup = f"{r.tokens_per_s / base.tokens_per_s:.2f}x"
        else:
            speedup = "-"
        mfu = "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}"
        mem = "n/a" if r.peak_mem_gib is None else f"{r.peak_mem_gib:.1f}"
        ckpt = "on" if r.grad_checkpointing else "off"
        lines.append(
            f"| {r.method.upper()} | {r.seq_len} | {r.config} | {r.tokens_per_s:,.0f} | {mfu} "
            f"| {mem} | {r.step_time_s:.3f} | {speedup} | {r.per_device_batch} x {r.grad_accum}, "
            f"{ckpt} | {r.tokens_per_step:,.0f} |"
        )
    return "\n".join(lines)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    parts = [f"python {platform.python_version()}"]
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} ?")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the project's SmolLM2)")
    parser.add_argument("--export-tokenizer", metavar="DIR", help="save the tokenizer and exit")
    parser.add_argument("--model", choices=[s for s in SHAPES if s != "smoke"])
    parser.add_argument("--methods", default="dpo,kto")
    parser.add_argument("--seq-lens", help="comma-separated (default 1024,2048; smoke 64,128)")
    parser.add_argument("--configs", default="project,trl")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps first (default 3)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps (default 10)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help=f"peak of the device for MFU (default on CUDA {H100_SXM_BF16_DENSE_TFLOPS}, "
        "H100 SXM dense bf16; on CPU none: MFU n/a)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a LearnerSettings field for the project configuration (repeatable); --smoke sets "
        "batch_size=2 and gradient_accumulation_steps=2 unless given",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, short sequences: a CPU check"
    )
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.tokenizer)
    if args.export_tokenizer:
        tokenizer.save_pretrained(args.export_tokenizer)
        print(f"tokenizer saved to {args.export_tokenizer}")
        return 0

    device, dtype = training_device()
    args.model = "smoke" if args.smoke else (args.model or "qwen2.5-1.5b")
    seq_default = "48,96" if args.smoke else "1024,2048"
    seq_lens = [int(s) for s in (args.seq_lens or seq_default).split(",")]
    if args.warmup_steps is None:
        args.warmup_steps = 1 if args.smoke else 3
    if args.steps is None:
        args.steps = 1 if args.smoke else 10
    args.overrides = {"batch_size": 2, "gradient_accumulation_steps": 2} if args.smoke else {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in LearnerSettings.model_fields or key == "max_length":
            parser.error(f"--set {item}: not a LearnerSettings field (max_length is --seq-lens)")
        args.overrides[key] = value
    try:
        LearnerSettings(**args.overrides)  # refuse a bad value before any run
    except ValueError as exc:  # pydantic's ValidationError
        parser.error(f"--set: {exc}")
    if args.warmup_steps < 1 or args.steps < 1:
        parser.error("--warmup-steps and --steps must be at least 1")
    if args.peak_tflops is None and device == "cuda":
        args.peak_tflops = H100_SXM_BF16_DENSE_TFLOPS
    methods: list[Method] = [m for m in ("dpo", "kto") if m in args.methods.split(",")]
    configs: list[Config] = [c for c in ("project", "trl") if c in args.configs.split(",")]

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    probe = build_model(args.model, len(tokenizer), "meta", dtype)
    shape = model_shape(probe)
    del probe
    print(f"# LoRA DPO/KTO training throughput, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"device: {device} ({gpu}), dtype {str(dtype).removeprefix('torch.')}; {versions()}")
    print(
        f"model: {args.model} shape, random weights, vocab {len(tokenizer)} (tokenizer); "
        f"N_body {shape.body_params / 1e6:.1f}M, N_head {shape.head_params / 1e6:.1f}M, "
        f"{shape.layers} layers; warm-up {args.warmup_steps} steps, timed {args.steps} steps; "
        f"peak {args.peak_tflops or 'n/a'} TFLOP/s"
    )
    if args.overrides:
        print(f"project settings changed from the defaults: {args.overrides}")
    sys.stdout.flush()

    results: list[Result] = []
    for method in methods:
        for seq_len in seq_lens:
            for config_name in configs:
                label = f"{method} seq {seq_len} {config_name}"
                print(f"... {label}", file=sys.stderr, flush=True)
                started = time.perf_counter()
                try:
                    result = run_one(
                        args,
                        tokenizer,
                        method=method,
                        seq_len=seq_len,
                        config_name=config_name,
                        device=device,
                        dtype=dtype,
                    )
                except Exception as exc:  # one failed run (OOM, say) must not lose the others
                    traceback.print_exc()
                    result = Result(method, seq_len, config_name, ok=False)
                    result.error = type(exc).__name__
                gc.collect()  # after the except clause, which held the failed run's frames
                if device == "cuda":
                    torch.cuda.empty_cache()
                results.append(result)
                print(
                    f"... {label}: {result.tokens_per_s:,.0f} tokens/s, "
                    f"{time.perf_counter() - started:.0f} s in all",
                    file=sys.stderr,
                    flush=True,
                )
                if result.ok and result.tokens_per_sequence < 0.95 * seq_len:
                    print(
                        f"warning: {label} averaged {result.tokens_per_sequence:.0f} tokens per "
                        "sequence: the data did not reach the sequence length",
                        file=sys.stderr,
                    )

    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": datetime.now(UTC).isoformat(),
                    "device": gpu,
                    "versions": versions(),
                    "model": args.model,
                    "shape": asdict(shape),  # lora_params: see each result
                    "peak_tflops": args.peak_tflops,
                    "warmup_steps": args.warmup_steps,
                    "steps": args.steps,
                    "project_overrides": args.overrides,
                    "results": [asdict(r) for r in results],
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
