"""Plumbing shared by every stage: device and dtype, seeding, clear errors, atomic checkpoints,
resume, Ctrl-C and the non-finite guard, the metrics logger, JSONL reading, the learning-rate
schedule and the common command-line flags.

Exit statuses: 0 done, 2 bad input (die), 3 a NaN or infinity stopped the run (guard_finite),
130 stopped by Ctrl-C after saving a checkpoint (end_step).

Nothing about RLHF lives here: the math of each stage stays visible in the stage's own file.
"""

import argparse
import json
import math
import os
import random
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# -----------------------------------------------------------------------------
# Errors: bad input stops with one clear line and exit status 2


class BadInput(SystemExit):
    """Raised by die(); a SystemExit with code 2 (3 for a non-finite number) whose message is kept for tests."""

    def __init__(self, message, code=2):
        super().__init__(code)
        self.message = message

    def __str__(self):
        return self.message


def die(message, code=2):
    """Stop with one clear line on stderr and exit status 2 (bad input, not a crash)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise BadInput(message, code)


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


def setup_kernels(name, device):
    """--kernels: which implementation of the log-prob, KL and PPO-loss math runs (kernels/).
    'triton' needs triton, and a CUDA device or the Triton interpreter: checked here, before any work."""
    import kernels

    kernels.set_backend(name)
    if name == "triton" and not kernels.triton_available():
        die("--kernels triton: triton is not installed (pip install triton, on Linux); use --kernels auto or torch")
    if name == "triton" and not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        die(f"--kernels triton on --device {device}: Triton kernels run on a CUDA device, or on the CPU through its "
            f"interpreter with TRITON_INTERPRET=1 set (slow: for tests); use --kernels auto or torch")


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


def unwrap(model):
    raw = getattr(model, "_orig_mod", model)  # never save torch.compile's renamed keys
    return getattr(raw, "module", raw)  # nor DDP's "module." prefix


def save_checkpoint(out_dir, model, meta, resume_state=None):
    """Weights of the uncompiled model, then meta.json last: a stage dir with meta.json is complete.
    resume_state (from resume_state()) goes to resume.pt: one file, so a kill never leaves it half old."""
    out_dir = Path(out_dir)
    if resume_state is not None:
        atomic_torch_save(resume_state, out_dir / "resume.pt")
    atomic_torch_save(unwrap(model).state_dict(), out_dir / "model.pt")
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


def check_config(stage_dir, meta, config, flag):
    """The checkpoint's architecture (meta.json "config") must be the one the flags ask for."""
    diff = [f"{k} {meta['config'].get(k)} vs {v}" for k, v in config.items() if meta.get("config", {}).get(k) != v]
    if diff:
        die(f"{flag} {stage_dir}: the checkpoint's architecture differs from the flags' ({', '.join(diff)}); "
            f"use the same model flags, or another --out")


def load_state_dict(stage_dir, device="cpu"):
    path = Path(stage_dir) / "model.pt"
    if not path.exists():
        die(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or corrupted file
        die(f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


# -----------------------------------------------------------------------------
# Resume: everything a stage needs to continue exactly, in resume.pt


def resume_state(step, model, optimizer, generators=None, **extra):
    """Weights, optimizer, every RNG (Python, NumPy, torch, and the stage's own generators: the data
    position) and the step; extra: what else a stage keeps (PPO's kl_coef and value model, ...)."""
    return {"step": step, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "rng": rng_state(), "generators": {k: g.get_state() for k, g in (generators or {}).items()}, **extra}


def load_resume(out, stage, model, optimizer, logger, total_steps, generators=None, config=None, device="cpu"):
    """--resume: restore what resume_state() saved in --out; returns (step to start after, the state).

    With no checkpoint there yet, starts at 0 (the metrics file starts over). A checkpoint of
    another stage or architecture, or an unreadable one, stops with one line (exit status 2).
    A finished run has nothing to resume: exit status 0."""
    out, path = Path(out), Path(out) / "resume.pt"
    if not path.exists():
        print(f"note: --resume: no checkpoint in {out} yet, starting from step 0")
        logger.resume = False  # a fresh run: the first log() starts the metrics file over
        return 0, None
    meta = load_meta(out, stage, "--out")
    if config is not None:
        check_config(out, meta, config, "--resume: --out")
    try:
        state = torch.load(path, map_location=device, weights_only=False)  # our own file: RNG states are not tensors
        model.load_state_dict(state["model"])
    except Exception as e:  # truncated, corrupted, or from an older version of the stage
        die(f"{path}: cannot resume from it ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            f"run again without --resume")
    optimizer.load_state_dict(state["optimizer"])
    for name, g in (generators or {}).items():
        g.set_state(state["generators"][name])
    set_rng_state(state["rng"])
    start = state["step"]
    if start >= total_steps:
        print(f"{out} already finished its {start} steps: nothing to resume")
        raise SystemExit(0)
    logger.truncate_after(start)  # steps logged after the checkpoint are done again, not twice
    print(f"resumed from {out} at step {start}")
    return start, state


# -----------------------------------------------------------------------------
# Stopping: Ctrl-C saves and exits at the end of a step; a NaN or infinity stops before the update

_stop = {"requested": False}


def catch_interrupt():
    """From here on a Ctrl-C asks the loop to stop at the end of the current step (end_step saves
    a checkpoint and exits); a second Ctrl-C stops at once, as usual."""
    _stop["requested"] = False

    def handler(signum, frame):
        _stop["requested"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\ninterrupt: saving a checkpoint at the end of this step (Ctrl-C again: stop now, unsaved)",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)


def release_interrupt():
    """After the loop: Ctrl-C is an ordinary KeyboardInterrupt again."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def resume_command():
    argv = [a for a in sys.argv if a != "--resume"]
    return " ".join(shlex.quote(a) for a in ["python", *argv, "--resume"])


def end_step(step, total, save, out, hook="RLHF_KILL_AT_STEP"):
    """Call at the end of every step, after logging and any periodic save.

    On a Ctrl-C, save(step) and exit (status 130) with the command that resumes. Test hook: the
    environment variable RLHF_KILL_AT_STEP=N (or N:SIGINT) makes the process send itself SIGKILL
    (or that signal) here at step N, as a crash or a Ctrl-C there would."""
    at, _, sig = os.environ.get(hook, "").partition(":")
    if at == str(step):
        os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))
    if _stop["requested"] and step < total:  # (at the last step the run is about to finish anyway)
        if master_process:  # under torchrun, rank 0 alone writes
            save(step)
        print(f"interrupted: checkpoint of step {step} saved in {out}; continue with: {resume_command()}", flush=True)
        raise SystemExit(130)


def guard_finite(step, out, **quantities):
    """Stop (exit status 3) if a loss or gradient norm is NaN or infinite, before it reaches the
    weights; nothing is saved, so --out keeps its last good checkpoint. Call between backward and
    the optimizer step. Test hook: RLHF_NAN_AT_STEP=N makes the first quantity NaN at step N."""
    for i, (name, value) in enumerate(quantities.items()):
        value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if i == 0 and os.environ.get("RLHF_NAN_AT_STEP") == str(step):
            value = float("nan")
        if not math.isfinite(value):
            meta = Path(out) / "meta.json"
            last = f"step {json.loads(meta.read_text())['step']}" if meta.exists() else "none saved yet"
            die(f"step {step}: the {name} is {value}; stopped before updating the weights "
                f"(last good checkpoint in {out}: {last})", code=3)


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
        # Nothing touches the disk before the first log(): a run stopped by bad input changes no file.
        self.path, self.total, self.enabled, self.resume = Path(path), total_steps, enabled, resume
        self.t0, self.start_step, self.opened = time.time(), None, False

    def truncate_after(self, step):
        """On resume, drop lines logged after the checkpoint, so no step appears twice (and a line
        half-written by a kill, which does not parse)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, step, metrics, show=None):
        """metrics: dict of floats (namespaced names). show: the keys to print (default: all)."""
        if self.start_step is None:  # the clock started when the logger was made, right before the loop
            self.start_step = step - 1
        elapsed = time.time() - self.t0
        done = step - self.start_step
        eta = elapsed / max(done, 1) * (self.total - step)
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}, "time/elapsed_s": round(elapsed, 3)}
        if not self.enabled:
            return row
        if not self.opened:  # the first row: a fresh run starts a new file, a resumed one appends
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.resume:
                self.path.unlink(missing_ok=True)
            self.opened = True
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


def jsonl_line_numbers(path):
    """The line number of each row read_jsonl returns (it skips blank lines)."""
    with open(path, encoding="utf-8") as f:
        return [i for i, line in enumerate(f, 1) if line.strip()]


def read_jsonl(path, required=(), flag="--data", allow_empty=False):
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
    if not rows and not allow_empty:
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
    """Each flag a positive, finite number (NaN and inf included in what is refused)."""
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is None or not 0 < value < math.inf:
            die(f"--{name} must be a positive number, got {value}")


def check_nonnegative(args, *names):
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is None or not 0 <= value < math.inf:
            die(f"--{name} must be zero or a positive number, got {value}")


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
            # where: the JSONL file the prompts were read from (one per non-blank line), so name the line
            at = f"{where}:{jsonl_line_numbers(where)[i]}" if Path(where).is_file() else f"{where}: prompt {i + 1}"
            die(f"{at}: the prompt is {len(ids)} tokens, longer than the {max_len} the context leaves for it")
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


def prompt_response_batch(enc, prompts, responses):
    """Left-padded prompt + response ids (B, T), attention mask, and (B, T - 1) mask of the response targets."""
    from model import left_pad
    from tokenizer import encode_prompt

    seqs = [encode_prompt(enc, p) + r["ids"] for p, r in zip(prompts, responses)]
    idx, mask = left_pad(seqs, enc.eot_token)
    T = idx.size(1)
    lengths = torch.tensor([len(r["ids"]) for r in responses])
    is_response = torch.arange(T)[None, :] >= T - lengths[:, None]  # each row ends with its response
    return idx, mask, is_response[:, 1:]


@torch.no_grad()
def sequence_logprobs(model, enc, prompts, responses, device, temperature=1.0, batch_size=200):
    """(N,) sum over each response's tokens of log pi(y_t | x, y_<t), at the sampling temperature."""
    import kernels

    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        idx, mask, targets = prompt_response_batch(enc, prompts[i : i + batch_size], responses[i : i + batch_size])
        idx, mask, targets = idx.to(device), mask.to(device), targets.to(device)
        logits = model(idx, mask)[:, :-1]  # (B, T - 1, V): position t predicts token t + 1
        logp, _ = kernels.token_logprobs(logits, idx[:, 1:], temperature)
        out.append((logp * targets).sum(1).float().cpu())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def proxy_scores(reward_model, enc, prompts, responses, device, batch_size=200):
    """(N,) learned reward-model score of each answer (read at its last token)."""
    reward_model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        idx, mask, _ = prompt_response_batch(enc, prompts[i : i + batch_size], responses[i : i + batch_size])
        out.append(reward_model.score(idx.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def policy_eval(policy, ref, enc, rows, device, max_new_tokens, temperature, seed, world=None, reward_model=None):
    """The eval/* metrics of a policy during training, on its own samples of the held-out prompts.

    The same seed at every call (common random numbers), so a curve's wiggles are the policy's, not
    the sampler's. eval/kl_to_sft is the sequence KL(pi || pi_ref) estimated on these samples, as
    evaluate.py computes it; eval/proxy_score is the reward model's score of them; eval/gold_* is the
    gold judge's.
    """
    prompts = [r["prompt"] for r in rows]
    responses = sample_responses(policy, enc, prompts, device, max_new_tokens, temperature,
                                 generator=torch.Generator(device).manual_seed(seed))
    kl = (sequence_logprobs(policy, enc, prompts, responses, device, temperature)
          - sequence_logprobs(ref, enc, prompts, responses, device, temperature))
    out = {"eval/kl_to_sft": kl.mean().item()}
    if reward_model is not None:
        out["eval/proxy_score"] = proxy_scores(reward_model, enc, prompts, responses, device).mean().item()
    if world is not None:
        out.update(gold_summary(world, rows, responses))
    return out


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
