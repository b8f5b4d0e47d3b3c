"""What keeping a hook out of torch.compile's tracing costs a call in eager code.

    python bench/untraced_cost.py [--calls 200000]

Once torch's compiler is imported (torch.compile, and also any torch.optim optimizer: this
script checks that), tensortap keeps its code out of the compiler's tracing: the entry
points user code calls (record, log_batch, ...) are wrapped (`client_hooks.hooks.untraced`),
and each hook makes the same `compiling()` check itself (`Hooks.untrace`, no wrapper's
frame: a capture step of bench/overhead.py's every_step runs ~40 hooks). Timed, best of 5: a
plain call of a three-argument function; the same through `torch.compiler.disable`'s
wrapper; through `untraced`.
"""
from __future__ import annotations

import argparse
import os
import sys
import timeit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--calls", type=int, default=200_000)
a = ap.parse_args()

before = "torch._dynamo" in sys.modules
torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
print(f"torch {torch.__version__}: compiler imported after `import torch`: {before}; "
      f"after making a torch.optim.Adam: {'torch._dynamo' in sys.modules}")

from client_hooks.hooks import untraced  # noqa: E402


def hook(module, args, output):
    return None


ways = {"plain call": hook, "torch.compiler.disable(hook)": torch.compiler.disable(hook),
        "client_hooks.hooks.untraced(hook)": untraced(hook)}
for name, fn in ways.items():
    us = min(timeit.repeat(lambda: fn(None, (), None), number=a.calls, repeat=5)) / a.calls * 1e6
    print(f"  {us:6.3f} us a call  {name}")
