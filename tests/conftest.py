"""pytest setup shared by the test files.

Without a GPU the Triton kernels run through the Triton interpreter, which must be switched on
before anything imports triton; with CUDA they run natively. Also puts the repo root on sys.path
so `import kernels` (and the stage modules) work from tests/.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
