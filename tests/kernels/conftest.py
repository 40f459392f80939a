"""Without a GPU the Triton kernels run in Triton's CPU interpreter, which needs TRITON_INTERPRET=1
*before triton is first imported*: `@triton.jit` picks the interpreter at decoration time, for
triton's own library as much as for our kernels, and triton reads the variable again later.

pytest imports this file before any test module of this directory, so the variable is set here
and left set for the rest of the session (harmless on CPU: nothing else runs Triton there). If an
earlier test directory already imported triton (torch.compile does), the in-process kernel tests
skip and test_add_norm_subprocess.py runs them in a fresh process instead (see triton_env.py).
"""
import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
