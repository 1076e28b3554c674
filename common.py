"""Plumbing shared by every stage: clear errors, the command line, device and dtype, seeding, DDP,
atomic files and checkpoints, the training loop's plumbing (resume, Ctrl-C, periodic checkpoints,
the non-finite guard, DDP teardown: `Run`), the metrics logger, JSONL reading and the
learning-rate schedule.

Exit statuses: 0 done, 2 bad input (die), 3 a NaN or infinity stopped the run (guard_finite),
130 stopped by Ctrl-C after saving a checkpoint (Run.steps).

Nothing about RLHF lives here: each stage's math is in the stage's own file; sampling answers and
scoring their log-probs in sampling.py; the measurements (gold, KL, proxy) in evaluate.py.
"""

import argparse
import atexit
import contextlib
import itertools
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

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
    """Stop with one clear line on stderr and exit status 2 (bad input, not a crash).

    Under torchrun every rank reads the same flags and files and stops with the same line: rank 0
    prints it. Another rank waits first, for torchrun to stop it when rank 0 exits, and prints its
    line only if that does not come (a problem of its own, such as a file its machine lacks)."""
    if not master_process:
        time.sleep(5)
    print(f"error: {message}", file=sys.stderr, flush=True)
    if ddp:
        atexit.register(exit_now, code)
    raise BadInput(message, code)


# -----------------------------------------------------------------------------
# The command line: argparse with one-line errors, type= checks, the flags every stage takes


class ArgumentParser(argparse.ArgumentParser):
    """argparse, whose errors (a type= check that fails, an unknown flag) are one line and exit status 2,
    like every other bad input: `--lr nan` stops with "error: --lr must be a positive number, got nan"."""

    def error(self, message):
        die(re.sub(r"^argument (\S+): must ", r"\1 must ", message))


def number(kind, ok, must):
    """An argparse type= that reads a number (int or float) and checks it: ok(value), or the flag stops
    with "--flag <must>, got <value>". Text that is no number at all gets argparse's own line."""
    def parse(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{must}, got {value}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid float value: 'abc'"
    return parse


# finite, and > 0 or >= 0: NaN and infinity are refused (nan > 0 is False)
positive_int = number(int, lambda v: v > 0, "must be a positive number")
positive_float = number(float, lambda v: 0 < v < math.inf, "must be a positive number")
nonnegative_int = number(int, lambda v: v >= 0, "must be zero or a positive number")
nonnegative_float = number(float, lambda v: 0 <= v < math.inf, "must be zero or a positive number")
fraction = number(float, lambda v: 0 < v < 1, "must be between 0 and 1")  # e.g. --val-fraction


def add_common_args(parser, stage, init=None, data=None, steps=100, kernels=False):
    """--out, --init, --data, --steps (steps=None: the stage adds its own), --seed, --device, --resume;
    --kernels where a kernel runs. Returns the argument group."""
    g = parser.add_argument_group("common")
    g.add_argument("--out", default=f"out/{stage}", help="folder for this stage's checkpoint and metrics")
    if init is not None:
        g.add_argument("--init", default=init, help="folder of the previous stage's checkpoint")
    if data is not None:
        g.add_argument("--data", default=data, help="input data file")
    if steps is not None:
        g.add_argument("--steps", type=positive_int, default=steps, help="optimizer steps")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    if kernels:
        g.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                       help="log-prob/KL/PPO-loss: fused Triton kernels on CUDA tensors (auto), or force one")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    return g


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
    if device == "cpu":
        setup_threads()
    return device, dtype


def choose_threads(cores, load, requested=None):
    """(threads, why) for torch on the CPU. OMP_NUM_THREADS (requested) wins. Otherwise the cores that
    other jobs leave free (load: the cores they use now), at least 1: threads that wait on another
    job's cores slow a stage several-fold (issue 21 measured 5m46s against 58 s), while one thread
    only loses 1.3-1.5x. A different thread count rounds floats differently: the same seed then gives
    another (equally good) run, not the same numbers."""
    if requested:
        return max(1, int(requested)), "OMP_NUM_THREADS"
    if load is None:
        return cores, f"{cores} cores"
    free = max(1, min(cores, int(cores - load + 0.5)))
    if free < cores:
        return free, f"{cores} cores, busy: other jobs use {load:.1f} of them"
    return cores, f"{cores} cores, idle: other jobs use {load:.1f}"


def busy_cores(seconds=0.3):
    """The cores in use by other processes now: the share of non-idle CPU time in /proc/stat over a short
    wait (this process sleeps through it) times the cores. Not the load average: it trails a job that
    ended by minutes. Elsewhere the 1-minute load average; None where there is neither."""
    def idle_total():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user .. steal
    try:
        (idle0, total0), _, (idle1, total1) = idle_total(), time.sleep(seconds), idle_total()
        return (1 - (idle1 - idle0) / max(1, total1 - total0)) * (os.cpu_count() or 1)
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):  # Windows: no load average
            return None


def setup_threads():
    """Set torch's CPU threads with choose_threads and say why in one line. pipeline.py measures once,
    before its first stage, and hands the choice to every stage (RLHF_THREADS), so that every stage of
    a run uses the same count."""
    requested = os.environ.get("OMP_NUM_THREADS") or os.environ.get("RLHF_THREADS")
    load = None if requested else busy_cores()
    threads, why = choose_threads(torch.get_num_threads() if requested is None else 0, load, requested)
    if os.environ.get("RLHF_THREADS") and not os.environ.get("OMP_NUM_THREADS"):
        why = "chosen by pipeline.py"
    torch.set_num_threads(threads)
    print(f"threads: {threads} ({why})")
    return threads


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
    """--kernels: where a stage's log-prob, KL and PPO-loss math runs: the fused Triton kernels
    (kernels/, auto: on CUDA tensors) or the stage's own plain PyTorch. 'triton' needs triton, and a
    CUDA device or the Triton interpreter: checked here, before any work."""
    import kernels

    kernels.set_backend(name)
    if name == "triton" and not kernels.triton_available():
        die("--kernels triton: triton is not installed (pip install triton, on Linux); use --kernels auto or torch")
    if name == "triton" and not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        die(f"--kernels triton on --device {device}: Triton kernels run on a CUDA device, or on the CPU through its "
            f"interpreter with TRITON_INTERPRET=1 set (slow: for tests); use --kernels auto or torch")


# -----------------------------------------------------------------------------
# DDP helpers (the flags ddp, ddp_rank, master_process are at the top of this file)


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
    values = torch.tensor([float(v) for v in metrics.values()], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(values)  # sum
    return {k: v / ddp_world_size for k, v in zip(metrics, values.tolist())}


def all_reduce_sum(x):
    """A tensor summed over ranks (a new tensor); x itself in one process."""
    if not ddp:
        return x
    x = x.clone()
    torch.distributed.all_reduce(x)
    return x


def exit_now(code):
    """End this DDP process without the interpreter's teardown, once its output is flushed (registered
    with atexit by the exits above). A rank that exits while another still runs can otherwise abort in
    C++ as the DDP wrapper is freed ("terminate called without an active exception", exit -6): seen in
    about 1 run in 15 of tests/test_ddp.py's pretraining, torch 2.13 with gloo."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _collective_device():
    return "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"  # nccl reduces GPU tensors only


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
    resume_state (from resume_state()) goes to resume.pt: one file, so a kill never leaves it half old.
    A final save (meta["final"] not empty) adds the seconds by phase, as meta["time"] (time/<phase>:
    beside "final", not in it: two runs of the same steps have the same final metrics, not the same times)."""
    with phase("io"):
        _save_checkpoint(Path(out_dir), model, meta, resume_state)


def _save_checkpoint(out_dir, model, meta, resume_state):
    if meta.get("final"):
        meta = {**meta, "time": phase_times()}
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
        with phase("io"):
            return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or corrupted file
        die(f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


# -----------------------------------------------------------------------------
# Loading a previous stage: its tokenizer, a GPT or a scalar-head model, every check naming the flag


def load_tokenizer_or_die(path, flag):
    from tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as e:
        die(f"{flag}: cannot load the tokenizer {path} ({e})")


def load_policy(stage_dir, device, expect_stage=("pretrain", "sft", "ppo", "dpo", "grpo"), flag="--init"):
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


# -----------------------------------------------------------------------------
# The training loop's plumbing, so that a stage's loop body is the algorithm:
#
#   run = common.Run(args, "sft", model, optimizer)          # --resume: weights, optimizer, RNGs, step
#   for step, batch in run.steps(batches, save, args.eval_every):
#       ...the algorithm...; common.guard_finite(...); optimizer.step(); run.log(step, metrics)
#   ...rank 0 alone from here: final evaluation and save(args.steps, final)
#
# run.steps yields the steps still to do with each step's batch (a resumed run skips the batches of
# the steps done: a stage's data order is an iterator seeded from --seed, so nothing of it is saved),
# saves a checkpoint every `checkpoint_every` steps, stops cleanly on Ctrl-C (every rank at the same
# step, after rank 0 saved), and at the end shuts DDP down and lets only rank 0 go on.


class Run:
    """Resume, logging, checkpoints and stopping for one stage's training loop (see above)."""

    def __init__(self, args, stage, model, optimizer, generators=None, config=None, device="cpu"):
        """args: the stage's flags (--out, --steps, --resume). generators: torch.Generators besides the
        data order whose state a resumed run needs (PPO's sampling noise, ...). With --resume, restores
        the weights, the optimizer, every RNG and the step, and keeps what else was saved in .state."""
        self.out, self.total, self.stage = Path(args.out), args.steps, stage
        self.model, self.optimizer, self.generators = model, optimizer, generators or {}
        self.logger = MetricsLogger(self.out / "metrics.jsonl", args.steps, enabled=master_process, resume=args.resume)
        self.start, self.state = 0, None  # the last step done, and what resume.pt held
        if args.resume:
            self.start, self.state = self._load_resume(config, device)

    def log(self, step, metrics, show=None):
        """One line on the terminal and one row in metrics.jsonl (rank 0)."""
        return self.logger.log(step, metrics, show)

    def phase(self, name):
        """`with run.phase("sampling"):` adds the block's seconds to that phase (common.phase)."""
        return phase(name)

    def resume_state(self, step, **extra):
        """What resume.pt holds: weights, optimizer, every RNG (Python, NumPy, torch, the generators) and
        the step; extra: what else the stage keeps (PPO's value model and kl_coef, ...)."""
        return {"step": step, "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": rng_state(), "generators": {k: g.get_state() for k, g in self.generators.items()}, **extra}

    def steps(self, batches, save, checkpoint_every):
        """(step, batch) for every step still to do. After each step: save(step) on rank 0 every
        checkpoint_every steps (not at the last: the stage saves its final checkpoint itself), the test
        switch, and on Ctrl-C save(step) and exit 130. After the last: DDP shut down, ranks > 0 exit 0."""
        batches = itertools.islice(batches, self.start, None)  # a resumed run: the batches of the steps done
        for step, batch in zip(steps(self.start, self.total, save, self.out, checkpoint_every), batches):
            with phase("train"):  # the loop body's time: train, unless a phase inside it says otherwise
                yield step, batch
        cleanup_ddp()
        if not master_process:  # every rank holds the same weights: rank 0 alone evaluates and saves
            atexit.register(exit_now, 0)
            raise SystemExit(0)

    def _load_resume(self, config, device):
        """Restore what resume_state() saved in --out; returns (step to start after, the state).

        With no checkpoint there yet, starts at 0 (the metrics file starts over). A checkpoint of
        another stage or architecture, or an unreadable one, stops with one line (exit status 2).
        A finished run has nothing to resume: exit status 0."""
        path = self.out / "resume.pt"
        if not path.exists():
            print(f"note: --resume: no checkpoint in {self.out} yet, starting from step 0")
            self.logger.resume = False  # a fresh run: the first log() starts the metrics file over
            return 0, None
        meta = load_meta(self.out, self.stage, "--out")
        if config is not None:
            check_config(self.out, meta, config, "--resume: --out")
        try:
            state = torch.load(path, map_location=device, weights_only=False)  # our own file: RNG states are not tensors
            self.model.load_state_dict(state["model"])
        except Exception as e:  # truncated, corrupted, or from an older version of the stage
            die(f"{path}: cannot resume from it ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                f"run again without --resume")
        self.optimizer.load_state_dict(state["optimizer"])
        for name, g in self.generators.items():
            g.set_state(state["generators"][name])
        set_rng_state(state["rng"])
        start = state["step"]
        if start >= self.total:
            print(f"{self.out} already finished its {start} steps: nothing to resume")
            raise SystemExit(0)
        self.logger.truncate_after(start)  # steps logged after the checkpoint are done again, not twice
        print(f"resumed from {self.out} at step {start}")
        return start, state


def steps(start, total, save, out, checkpoint_every=None, counter="step", ctrl_c=True):
    """start + 1, ..., total: the steps of any loop that saves and may be stopped (Run.steps, and
    feedback.py's sampling and labelling). After each: save(step) on rank 0 every checkpoint_every
    steps, the test switch (injected_fault), and after a Ctrl-C (ctrl_c=True: caught during the loop)
    save(step), then exit 130 with the command that resumes."""
    if ctrl_c:
        catch_interrupt()
    try:
        for step in range(start + 1, total + 1):
            yield step
            if checkpoint_every and master_process and step % checkpoint_every == 0 and step < total:
                save(step)
            fault = injected_fault(counter, step)
            if fault in ("SIGKILL", "SIGINT"):
                os.kill(os.getpid(), getattr(signal, fault))
            if ctrl_c and step < total and stop_requested():  # (at the last step the run is about to end anyway)
                if master_process:  # under torchrun, rank 0 alone writes
                    save(step)
                if ddp:  # the others wait for it: torchrun stops every rank as soon as one exits
                    torch.distributed.barrier()
                how = ("the same torchrun command with --resume" if ddp else resume_command())
                print(f"interrupted: checkpoint of step {step} saved in {out}; continue with: {how}", flush=True)
                if ddp:
                    atexit.register(exit_now, 130)
                raise SystemExit(130)
    finally:
        release_interrupt()


# Ctrl-C: the handler only asks; the loop stops at the end of the step (Run.steps, steps)
_stop = {"requested": False}


def catch_interrupt():
    """From here on a Ctrl-C asks the loop to stop at the end of the current step (a checkpoint is
    saved, exit 130); a second Ctrl-C stops at once, as usual. Under torchrun, torchrun passes the
    Ctrl-C on to every rank (and stops them by force 30 s later)."""
    _stop["requested"] = False

    def handler(signum, frame):
        _stop["requested"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if master_process:
            print("\ninterrupt: saving a checkpoint at the end of this step (Ctrl-C again: stop now, unsaved)",
                  file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)


def release_interrupt():
    """After the loop: Ctrl-C is an ordinary KeyboardInterrupt again."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def stop_requested():
    """Was Ctrl-C pressed? Under DDP, on any rank: the ranks may see it at different steps, and must all
    stop at the same one (a rank that went on would wait for the others forever)."""
    stop = _stop["requested"]
    if ddp:
        flag = torch.tensor([float(stop)], device=_collective_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        stop = flag.item() > 0
    return stop


def resume_command():
    argv = [a for a in sys.argv if a != "--resume"]
    return " ".join(shlex.quote(a) for a in ["python", *argv, "--resume"])


def guard_finite(step, out, **quantities):
    """Stop (exit status 3) if a loss or gradient norm is NaN or infinite, before it reaches the
    weights; nothing is saved, so --out keeps its last good checkpoint. Call between backward and
    the optimizer step. (The test switch RLHF_TEST_FAULT=NaN@step=N makes the first quantity NaN.)"""
    for i, (name, value) in enumerate(quantities.items()):
        value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if i == 0 and injected_fault("step", step) == "NaN":
            value = float("nan")
        if not math.isfinite(value):
            meta = Path(out) / "meta.json"
            last = f"step {json.loads(meta.read_text())['step']}" if meta.exists() else "none saved yet"
            die(f"step {step}: the {name} is {value}; stopped before updating the weights "
                f"(last good checkpoint in {out}: {last})", code=3)


def injected_fault(counter, n):
    """The one switch for tests: RLHF_TEST_FAULT=WHAT@COUNTER=N[,rank=R] makes this process fail at
    step (or label) N as a crash (WHAT = SIGKILL), a Ctrl-C (SIGINT) or a diverged loss (NaN) would,
    on every rank or on rank R only. Returns WHAT at that point, else None; unset, nothing happens."""
    fault = os.environ.get("RLHF_TEST_FAULT")
    if not fault:
        return None
    what, _, where = fault.partition("@")
    at = dict(part.split("=") for part in where.split(","))
    if at.get(counter) == str(n) and at.get("rank", str(ddp_rank)) == str(ddp_rank):
        return what
    return None


# -----------------------------------------------------------------------------
# Time by phase: where a stage's seconds go (docs/profile.md is made of these)
#
#   with run.phase("sampling"):      # or common.phase(...) in a stage without a Run
#       responses = sample_responses(...)
#
# The phases: sampling (generation), scoring (reward model, reference log-probs, gold judge), train
# (forward, backward, optimizer), eval (periodic evaluation), io (checkpoints, data). A phase inside
# another pauses the outer one: each second counts once. metrics.jsonl rows and the final meta.json
# ("time") carry the running totals as time/<phase>; print_phase_times() ends a stage with one line of them.

_PROCESS_START = time.perf_counter()
_phase_seconds, _phase_stack = {}, []  # seconds by phase; [name, started] of the phases open now


@contextlib.contextmanager
def phase(name):
    """Add the seconds of the `with` block to phase `name` (a phase inside it pauses it)."""
    now = time.perf_counter()
    if _phase_stack:  # the outer phase pauses while this one runs
        outer = _phase_stack[-1]
        _phase_seconds[outer[0]] = _phase_seconds.get(outer[0], 0.0) + now - outer[1]
    _phase_stack.append([name, now])
    try:
        yield
    finally:
        now = time.perf_counter()
        _, started = _phase_stack.pop()
        _phase_seconds[name] = _phase_seconds.get(name, 0.0) + now - started
        if _phase_stack:
            _phase_stack[-1][1] = now  # and resumes


def phase_times():
    """{"time/<phase>": seconds so far} (the phases still open included, up to now)."""
    seconds, now = dict(_phase_seconds), time.perf_counter()
    if _phase_stack:
        name, started = _phase_stack[-1]
        seconds[name] = seconds.get(name, 0.0) + now - started
    return {f"time/{k}": round(v, 3) for k, v in seconds.items()}


def print_phase_times():
    """One line: each phase's seconds and share of the time since this process imported common
    ("other": what no phase covers: imports, setup, the loop's own bookkeeping), and the CPU time of
    all its threads (on a shared machine it moves less than the wall time: it leaves out the waiting)."""
    total = time.perf_counter() - _PROCESS_START
    times = {k.removeprefix("time/"): v for k, v in phase_times().items()}
    times["other"] = max(0.0, total - sum(times.values()))
    print(f"time: {format_seconds(total)} (CPU {format_seconds(time.process_time())}) | " + " | ".join(f"{k} {v:.1f}s ({v / max(total, 1e-9):.0%})"
                                                          for k, v in times.items()), flush=True)


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
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}, "time/elapsed_s": round(elapsed, 3),
               **phase_times()}
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
    """Rows of a metrics.jsonl, each with a numeric "step"; a malformed line stops with `file:line: what
    is wrong`, and a last line still being written (or cut by a kill) is skipped."""
    rows = []
    for lineno, row in jsonl_objects(path, partial_last_line=True):
        step = row.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not math.isfinite(step):
            die(f"{path}:{lineno}: missing a numeric 'step' (every logged line has one)")
        rows.append(row)
    if not rows:
        die(f"{path}: empty file (no step logged yet)")
    return rows


# -----------------------------------------------------------------------------
# Input files


def jsonl_objects(path, partial_last_line=False):
    """(line number, object) of each non-blank line of a JSONL file; a line that is not a JSON object
    stops with file:line. partial_last_line: skip a last line that has no newline yet and does not parse."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if partial_last_line and lineno == len(lines) and not text.endswith("\n"):
                print(f"note: {path}:{lineno}: skipped a line still being written")
                continue
            die(f"{path}:{lineno}: not valid JSON ({e.msg})")
        if not isinstance(row, dict):
            die(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def jsonl_line_numbers(path):
    """The line number of each row read_jsonl returns (it skips blank lines)."""
    return [lineno for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1)
            if line.strip()]


def read_jsonl(path, required=(), flag="--data", allow_empty=False):
    """Rows of a JSONL file; any problem stops with the file, the line and what was expected."""
    path = Path(path)
    if not path.exists():
        die(f"{flag} {path}: file not found")
    rows = []
    for lineno, row in jsonl_objects(path):
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


