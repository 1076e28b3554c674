"""Plumbing shared by every stage: device and dtype, seeding, clear errors, atomic checkpoints,
the metrics logger, JSONL reading, the learning-rate schedule and the common command-line flags.

Nothing about RLHF lives here: the math of each stage stays visible in the stage's own file.
"""

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# -----------------------------------------------------------------------------
# Errors: bad input stops with one clear line and exit status 2


class BadInput(SystemExit):
    """Raised by die(); a SystemExit with code 2 whose message is kept for tests."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def die(message):
    """Stop with one clear line on stderr and exit status 2 (bad input, not a crash)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise BadInput(message)


# -----------------------------------------------------------------------------
# Device, dtype, seeding


def setup_device(requested="auto"):
    """Pick cuda -> mps -> cpu (or the one asked for); return (device, dtype) and print why."""
    if requested == "auto":
        if torch.cuda.is_available():
            device, why = "cuda", "CUDA is available"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device, why = "mps", "Apple MPS is available"
        else:
            device, why = "cpu", "no GPU found"
    else:
        device, why = requested, "asked for with --device"
        if device.startswith("cuda") and not torch.cuda.is_available():
            die(f"--device {device}: CUDA is not available on this machine")
    # bf16 autocast only where the hardware runs it fast; fp32 everywhere else.
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        dtype, dwhy = torch.bfloat16, "the GPU supports bf16"
    else:
        dtype, dwhy = torch.float32, "fp32 on this device"
    print(f"device: {device} ({why}) | dtype: {str(dtype).replace('torch.', '')} ({dwhy})")
    return device, dtype


def autocast(device, dtype):
    """Mixed precision on GPUs; a no-op context on the CPU."""
    if dtype == torch.float32:
        return torch.autocast(device_type="cpu", enabled=False)
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every random number generator a run uses, so a resumed run continues identically."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# DDP: the same script in N processes under torchrun, one per GPU (or N CPU processes, with gloo)
#
#   torchrun --standalone --nproc_per_node=N pretrain.py ...
#
# torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. Without them (or with one process) ddp is False and
# every helper below hands its input back untouched: a single-process run takes the path it always did.
# --batch-size stays the global batch. Each rank trains on its slice of it (micro_batches), DDP
# averages the gradients during backward, so every rank takes the same optimizer step.

ddp_rank = int(os.environ.get("RANK", 0))
ddp_local_rank = int(os.environ.get("LOCAL_RANK", 0))
ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
ddp = ddp_world_size > 1  # one process (torchrun or not): no process group, no DDP wrapper
master_process = ddp_rank == 0  # this process prints, logs and saves; the others only train


def setup_ddp(requested="auto"):
    """setup_device for every process, then join the process group: nccl on CUDA (one GPU per
    process, cuda:LOCAL_RANK), gloo on the CPU. Returns (device, dtype)."""
    if not master_process:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints; errors still reach stderr
    device, dtype = setup_device(requested)
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{ddp_local_rank}"
            torch.cuda.set_device(device)
        elif device != "cpu":
            die(f"--device {device}: DDP runs on CUDA (nccl) or the CPU (gloo)")
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
        print(f"ddp: {ddp_world_size} processes ({backend}) | rank 0 prints, logs and saves")
    return device, dtype


def wrap_ddp(model, device):
    """The model to train through: DDP(model), whose backward all-reduces the gradients, or the model
    itself in one process. Evaluate, generate and save through the unwrapped model."""
    if not ddp:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[ddp_local_rank] if device.startswith("cuda") else None)


def check_batch_split(batch_size, grad_accum=1, flag="--batch-size"):
    """Every rank must get equal micro-batches: unequal ones would weigh examples unequally."""
    if batch_size % (ddp_world_size * grad_accum) != 0:
        die(f"{flag} {batch_size} must be a multiple of {ddp_world_size * grad_accum} "
            f"(processes {ddp_world_size} x micro-batches {grad_accum})")


def micro_batches(batch, grad_accum=1):
    """This rank's share of a global batch (a list, or a tensor cut on its first dimension), as
    grad_accum equal micro-batches. Rank r takes the r-th slice, so ranks x micro-batches cover the
    batch once and in order: the examples one process sees with --grad-accum ranks * grad_accum."""
    n = len(batch) // (ddp_world_size * grad_accum)
    first = ddp_rank * grad_accum
    return [batch[(first + k) * n : (first + k + 1) * n] for k in range(grad_accum)]


def all_reduce_mean(metrics):
    """The mean over ranks of a dict of numbers, in one all-reduce; the dict itself in one process."""
    if not ddp:
        return metrics
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"  # nccl reduces GPU tensors only
    values = torch.tensor([float(v) for v in metrics.values()], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)  # sum
    return {k: v / ddp_world_size for k, v in zip(metrics, values.tolist())}


def all_reduce_sum(x):
    """A tensor summed over ranks (a new tensor); x itself in one process."""
    if not ddp:
        return x
    x = x.clone()
    torch.distributed.all_reduce(x)
    return x


def cleanup_ddp():
    if ddp:
        torch.distributed.destroy_process_group()


# -----------------------------------------------------------------------------
# Atomic files: write a temporary file in the same folder, flush, fsync, rename


def _atomic(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text):
    _atomic(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_write_jsonl(path, rows):
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def atomic_torch_save(obj, path):
    _atomic(path, lambda f: torch.save(obj, f))


# -----------------------------------------------------------------------------
# Checkpoints: out/<stage>/model.pt + meta.json (+ resume.pt for --resume)


def save_checkpoint(out_dir, model, meta, resume_state=None):
    """Weights of the uncompiled model, then meta.json last: a stage dir with meta.json is complete."""
    out_dir = Path(out_dir)
    raw = getattr(model, "_orig_mod", model)  # never save torch.compile's renamed keys
    raw = getattr(raw, "module", raw)  # nor DDP's "module." prefix
    atomic_torch_save(raw.state_dict(), out_dir / "model.pt")
    if resume_state is not None:
        atomic_torch_save(resume_state, out_dir / "resume.pt")
    atomic_write_json(out_dir / "meta.json", meta)


def load_meta(stage_dir, expect_stage=None, flag="--init"):
    """meta.json of a previous stage, with a clear error when it is missing or from the wrong stage."""
    stage_dir = Path(stage_dir)
    path = stage_dir / "meta.json"
    if not path.exists():
        die(f"{flag} {stage_dir}: no checkpoint there ({path} not found); run the previous stage first")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        die(f"{path}: line {e.lineno}: not valid JSON ({e.msg})")
    stages = [expect_stage] if isinstance(expect_stage, str) else expect_stage
    if stages and meta.get("stage") not in stages:
        die(f"{flag} {stage_dir}: a checkpoint of stage '{meta.get('stage')}', expected {' or '.join(stages)}")
    return meta


def load_state_dict(stage_dir, device="cpu"):
    path = Path(stage_dir) / "model.pt"
    if not path.exists():
        die(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or corrupted file
        die(f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


# -----------------------------------------------------------------------------
# Metrics: one human line per step and the same dict appended to metrics.jsonl


def format_seconds(s):
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class MetricsLogger:
    """Appends one JSON object per logged step and prints `step 42/300 | loss 2.31 | ... | eta 1m20s`."""

    def __init__(self, path, total_steps, enabled=True, resume=False):
        self.path, self.total, self.enabled = Path(path), total_steps, enabled
        self.t0, self.start_step = time.time(), None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not resume and self.path.exists():
                self.path.unlink()

    def truncate_after(self, step):
        """On resume, drop lines logged after the checkpoint, so no step appears twice."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, step, metrics, show=None):
        """metrics: dict of floats (namespaced names). show: the keys to print (default: all)."""
        if self.start_step is None:
            self.start_step, self.t0 = step - 1, time.time()
        elapsed = time.time() - self.t0
        done = step - self.start_step
        eta = elapsed / max(done, 1) * (self.total - step)
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}, "time/elapsed_s": round(elapsed, 3)}
        if not self.enabled:
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        keys = show if show is not None else list(metrics)
        parts = [f"step {step}/{self.total}"] + [f"{k} {_fmt(metrics[k])}" for k in keys if k in metrics]
        print(" | ".join(parts + [f"eta {format_seconds(eta)}"]), flush=True)
        return row


def _plain(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    return float(v) if isinstance(v, (float, np.floating)) else v


def _fmt(v):
    v = _plain(v)
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def read_metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# -----------------------------------------------------------------------------
# Input files


def read_jsonl(path, required=(), flag="--data"):
    """Rows of a JSONL file; any problem stops with the file, the line and what was expected."""
    path = Path(path)
    if not path.exists():
        die(f"{flag} {path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                die(f"{path}:{lineno}: not valid JSON ({e.msg})")
            if not isinstance(row, dict):
                die(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if key not in row:
                    die(f"{path}:{lineno}: missing field '{key}' (expected fields: {', '.join(required)})")
                if not isinstance(row[key], str):
                    die(f"{path}:{lineno}: field '{key}' must be a string, got {type(row[key]).__name__}")
            rows.append(row)
    if not rows:
        die(f"{path}: empty file (expected one JSON object per line)")
    return rows


# -----------------------------------------------------------------------------
# Learning-rate schedule: linear warmup, then cosine decay to min_lr


def lr_at(step, total_steps, lr, warmup_steps, min_lr_ratio=0.1):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# -----------------------------------------------------------------------------
# The flags every stage takes


def add_common_args(parser, stage, init=None, data=None, steps=100):
    g = parser.add_argument_group("common")
    g.add_argument("--out", default=f"out/{stage}", help="folder for this stage's checkpoint and metrics")
    if init is not None:
        g.add_argument("--init", default=init, help="folder of the previous stage's checkpoint")
    if data is not None:
        g.add_argument("--data", default=data, help="input data file")
    g.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                   help="log-prob/KL/PPO-loss kernels: Triton on CUDA tensors (auto), or force one")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    return g


def check_positive(args, *names):
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is None or value <= 0:
            die(f"--{name} must be positive, got {value}")


# -----------------------------------------------------------------------------
# Loading a previous stage, sampling answers, and judging them with the gold judge


def load_tokenizer_or_die(path, flag):
    from tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as e:
        die(f"{flag}: cannot load the tokenizer {path} ({e})")


def load_policy(stage_dir, device, expect_stage=("pretrain", "sft", "ppo", "dpo"), flag="--init"):
    """A GPT checkpoint with its tokenizer: (model, enc, meta). Every check names the flag and folder."""
    from model import GPT, GPTConfig

    meta = load_meta(stage_dir, expect_stage, flag)
    state = load_state_dict(stage_dir, device)
    model = GPT(GPTConfig(**meta["config"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        die(f"{flag} {stage_dir}: weights do not match the config in meta.json ({str(e).splitlines()[0][:160]})")
    enc = load_tokenizer_or_die(meta["tokenizer"], f"{flag} {stage_dir}")
    if enc.n_vocab > model.config.vocab_size:
        die(f"{flag} {stage_dir}: tokenizer {meta['tokenizer']} has {enc.n_vocab} tokens, the model only {model.config.vocab_size}")
    return model.to(device), enc, meta


def load_scalar_model(stage_dir, device, expect_stage=("reward",), flag="--reward"):
    """A reward (or value) model: a GPT trunk with a scalar head. Returns (model, enc, meta)."""
    from model import GPTConfig, ScalarModel

    meta = load_meta(stage_dir, expect_stage, flag)
    model = ScalarModel(GPTConfig(**meta["config"]))
    try:
        model.load_state_dict(load_state_dict(stage_dir, device))
    except RuntimeError as e:
        die(f"{flag} {stage_dir}: weights do not match the config in meta.json ({str(e).splitlines()[0][:160]})")
    return model.to(device), load_tokenizer_or_die(meta["tokenizer"], f"{flag} {stage_dir}"), meta


def encode_prompts(enc, prompts, max_len, where="prompts"):
    """Chat-template token ids of each prompt; a prompt longer than max_len stops with a clear line."""
    from tokenizer import encode_prompt

    out = []
    for i, p in enumerate(prompts):
        ids = encode_prompt(enc, p)
        if len(ids) > max_len:
            die(f"{where}: prompt {i + 1} is {len(ids)} tokens, longer than the {max_len} the context leaves for it")
        out.append(ids)
    return out


@torch.no_grad()
def sample_responses(model, enc, prompts, device, max_new_tokens=48, temperature=1.0, top_k=None, top_p=None,
                     batch_size=128, generator=None):
    """Answers to a list of prompt strings, in batches with the KV cache.

    Returns one dict per prompt: `ids` (the response tokens, the end token included when it came),
    `text` (decoded, without the end token) and `ended` (False if it ran out of tokens first).
    """
    from model import left_pad
    from tokenizer import decode_response, special_id

    end_id, pad_id = special_id(enc, "<|end|>"), enc.eot_token
    prompt_ids = encode_prompts(enc, prompts, model.config.block_size - max_new_tokens)
    was_training = model.training
    model.eval()
    results = []
    for i in range(0, len(prompt_ids), batch_size):
        idx, mask = left_pad(prompt_ids[i : i + batch_size], pad_id)
        out = model.generate(idx.to(device), mask.to(device), max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, eos_id=end_id, pad_id=pad_id, generator=generator)
        for row in out.tolist():
            ended = end_id in row
            ids = row[: row.index(end_id) + 1] if ended else [t for t in row if t != pad_id]
            results.append({"ids": ids, "text": decode_response(enc, ids), "ended": ended})
    model.train(was_training)
    return results


def gold_summary(world, prompts, responses, prefix="eval/"):
    """Mean gold reward with its standard error, plus the per-family figures the evaluation reports.

    prompts: list of {"prompt", "family"}; responses: list of strings (or sample_responses dicts).
    """
    scores, fam_scores, correct, refusals = [], {}, {}, {}
    for p, r in zip(prompts, responses):
        text = r["text"] if isinstance(r, dict) else r
        s = world.gold_score(p["prompt"], text)
        _, info = world.judge(p["prompt"], text)
        scores.append(s)
        fam_scores.setdefault(info["family"], []).append(s)
        if info["correct"] is not None:
            correct.setdefault(info["family"], []).append(info["correct"])
        refusals.setdefault("unsafe" if info["family"] == "unsafe" else "benign", []).append(info["refused"])
    n = len(scores)
    mean = sum(scores) / n
    se = (sum((s - mean) ** 2 for s in scores) / max(n - 1, 1)) ** 0.5 / n ** 0.5
    out = {f"{prefix}gold_reward": mean, f"{prefix}gold_reward_se": se}
    for fam, ss in sorted(fam_scores.items()):
        out[f"{prefix}gold_{fam}"] = sum(ss) / len(ss)
    for fam, cs in sorted(correct.items()):
        out[f"{prefix}correct_{fam}"] = sum(cs) / len(cs)
    if "unsafe" in refusals:
        out[f"{prefix}refusal_rate_unsafe"] = sum(refusals["unsafe"]) / len(refusals["unsafe"])
    if "benign" in refusals:
        out[f"{prefix}over_refusal_rate"] = sum(refusals["benign"]) / len(refusals["benign"])
    texts = [r["text"] if isinstance(r, dict) else r for r in responses]
    out[f"{prefix}length"] = sum(len(t.split()) for t in texts) / n
    return out
