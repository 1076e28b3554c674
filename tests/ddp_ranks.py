"""Run a stage under torchrun and keep what each rank did, for tests/test_ddp.py:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_ranks.py DIR sft.py ARGS...

runs `sft.py ARGS...` as __main__ in every process, exactly as `torchrun ... sft.py ARGS...` would, and
records the files each rank wrote through common's atomic writes (every checkpoint, meta.json and
JSONL). At the end each rank saves DIR/rank{R}.pt: those paths and the state dicts of the models it
trained, so the test can check that only rank 0 wrote and that all ranks ended with the same weights.
Not collected by pytest (no test_ prefix).
"""

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

out_dir, script = Path(sys.argv[1]), sys.argv[2]
sys.argv = sys.argv[2:]

written = []
atomic = common._atomic
common._atomic = lambda path, write: (written.append(str(path)), atomic(path, write))[1]

scope = {"__name__": "__main__", "__file__": str(ROOT / script)}
try:
    exec(compile((ROOT / script).read_text(), str(ROOT / script), "exec"), scope)  # keeps the globals, unlike runpy
except SystemExit as e:  # ranks other than 0 stop with SystemExit(0) once training is done
    if e.code:
        raise
models = {k: scope[k].state_dict() for k in ("model", "policy", "value_model") if isinstance(scope.get(k), torch.nn.Module)}
out_dir.mkdir(parents=True, exist_ok=True)
torch.save({"written": written, "models": models}, out_dir / f"rank{os.environ['RANK']}.pt")
