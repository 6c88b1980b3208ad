#!/usr/bin/env python3
"""PyTorch baselines for mx's benchmarks, run in the same session.

  torch_baseline.py train_step MODEL THREADS SECONDS
      forward + backward + (no optimizer) of MODEL ("mlp" or "lenet") at
      batch 100 on random data; prints "samples_per_s <v>".

Uses Debian's python3-torch. Prints "unavailable <reason>" and exits 3 if
torch cannot be imported.
"""
import sys
import time

try:
    import torch
    import torch.nn as nn
except Exception as e:  # noqa: BLE001 - report any import failure
    print("unavailable", repr(e))
    sys.exit(3)


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(),
                         nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def lenet():
    return nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.ReLU(),
                         nn.Linear(500, 10))


def train_step(model_name, threads, seconds):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = {"mlp": mlp, "lenet": lenet}[model_name]()
    batch = 100
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()

    for _ in range(20):
        step()
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    elapsed = time.perf_counter() - start
    print("samples_per_s", n * batch / elapsed)


if __name__ == "__main__":
    if sys.argv[1] == "train_step":
        train_step(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        sys.exit("unknown command " + sys.argv[1])
