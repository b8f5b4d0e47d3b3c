"""What tensortap leaves on a model and in a process: hooks, sockets (no Lightning import, so
the tests that use it also run where Lightning is not installed, e.g. a GPU machine)."""
from __future__ import annotations

import os


def hook_counts(model):
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    for p in model.parameters():
        n += len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {})
    return n


def open_sockets():
    fds = os.listdir("/proc/self/fd")
    return sum(os.readlink(f"/proc/self/fd/{f}").startswith("socket:") for f in fds
               if os.path.exists(f"/proc/self/fd/{f}"))
