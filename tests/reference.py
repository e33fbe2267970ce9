"""The reference the schedule tests compare against: a plain loop around torch's CyclicLR."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CyclicLR


def torch_cyclic_reference(optimizer_name: str, steps: int, **cyclic_kwargs):
    """LR and momentum (beta1 for AdamW) applied at each of `steps` optimizer steps."""
    weight = torch.nn.Parameter(torch.zeros(2))
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD([weight], lr=1.0, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW([weight], lr=1.0)
    scheduler = CyclicLR(optimizer, **cyclic_kwargs)
    lrs, momentums = [], []
    for _ in range(steps):
        group = optimizer.param_groups[0]
        lrs.append(group["lr"])
        momentums.append(group["momentum"] if optimizer_name == "sgd" else group["betas"][0])
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        scheduler.step()
    return lrs, momentums
