"""A plain-PyTorch DDP training with Tap, for torchrun (tests/client_hooks/test_ddp_collector.py).
Rank 1 ends 2 s after rank 0 with one more metric: rank 0's process exits first. Each rank
has batches of its own, and logs the norm of the gradients that DDP averaged (`grad_norm`,
read after backward) for the test to compare with the gradient records."""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch import nn

from client_hooks import Tap

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches: local gradients differ
with Tap() as tap:
    tap.watch(model, optimizer=opt)
    for epoch in range(2):
        tap.epoch_start(epoch)
        for i in range(4):
            x = torch.randn(4, 8, generator=data)
            tap.log_batch({"x": x}, epoch=epoch, batch_idx=i)
            loss = model(x).pow(2).mean()
            loss.backward()
            tap.log_metric("grad_norm", torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())
            opt.step()
            opt.zero_grad()
            tap.log_loss(loss)
        tap.epoch_end(epoch)
    dist.destroy_process_group()
    if rank == 1:
        time.sleep(2)
        tap.log_metric("late", 1.0)
print("RANK", rank, os.environ["TENSORTAP_RUN"], flush=True)
