#!/usr/bin/env python3
"""PyTorch baselines for mx's benchmarks, run in the same session.

  torch_baseline.py train_step MODEL THREADS SECONDS
      forward + backward + (no optimizer) of MODEL ("mlp", "lenet" or "resnet") at
      batch 100 on random data; prints "samples_per_s <v>".
  torch_baseline.py train_step_gpu MODEL SECONDS
      the same on the first CUDA device ("lenet" or "resnet"), timed
      between synchronizations; prints "samples_per_s <v>".
  torch_baseline.py train_epochs MODEL THREADS EPOCHS LR MOMENTUM DATA_DIR
      (MODEL: mlp, lenet or resnet)
      end-to-end training as a user runs it: reads Fashion-MNIST (gzipped
      IDX), shuffles, trains with SGD at batch 100, then tests; prints
      "samples_per_s <v> accuracy <a>" (samples/s over the training epochs,
      data handling included).
  torch_baseline.py train_ddp MODEL THREADS EPOCHS LR WORKERS DATA_DIR
      data-parallel training with DistributedDataParallel (gloo, WORKERS
      processes on 127.0.0.1), each on its contiguous part of the training
      set at batch 100, SGD at LR; prints "samples_per_s <v> accuracy <a>"
      (all processes' samples over the training epochs' wall time, data
      loading excluded, as mx_train's epoch times exclude it).

Uses Debian's python3-torch. Prints "unavailable <reason>" and exits 3 if
torch cannot be imported.
"""
import os
import sys
import time

# glibc's allocator returns PyTorch's freed activation buffers (MBs each) to
# the kernel and page-faults them back in on the next step. In the VMs these
# benchmarks run on that made PyTorch's speed swing 2.5-5x from one run to
# the next (ResNet forward+backward: 180-1,300 samples/s with the defaults,
# 3,100-3,270 with the allocator keeping its memory), so the baselines
# would be noise. PyTorch is measured at its best: the script re-executes
# itself once with the allocator told to keep freed memory (mmap threshold
# at its 32 MiB maximum, no trimming), as PyTorch's CPU tuning guides
# recommend a caching allocator.
_KEEP_MEMORY = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
if os.environ.get("GLIBC_TUNABLES") != _KEEP_MEMORY:
    os.execve(sys.executable, [sys.executable] + sys.argv,
              dict(os.environ, GLIBC_TUNABLES=_KEEP_MEMORY))

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


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, identity shortcut (worker/zoo.cc)."""

    def __init__(self, channels):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                               nn.BatchNorm2d(channels), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                               nn.BatchNorm2d(channels))

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + x)


def resnet(blocks=2):
    """mx's zoo::ResNet: a 3x3x16 stem, residual blocks, global average
    pooling, a classifier."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                         nn.ReLU(), *[ResidualBlock(16) for _ in range(blocks)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def train_step_gpu(model_name, seconds):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = {"lenet": lenet, "resnet": resnet}[model_name]().to(device)
    batch = 100
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    for _ in range(20):
        step()
    torch.cuda.synchronize()
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        n += 10
    elapsed = time.perf_counter() - start
    print("samples_per_s", n * batch / elapsed)


def train_step(model_name, threads, seconds):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = {"mlp": mlp, "lenet": lenet, "resnet": resnet}[model_name]()
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


def read_idx(path):
    import gzip
    import numpy as np
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic == 0x803:
        n, rows, cols = (int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(3))
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, 1, rows, cols)
    n = int.from_bytes(data[4:8], "big")
    return np.frombuffer(data, np.uint8, offset=8)


def fashion_mnist(data_dir, train):
    """Images scaled to [0, 1] and labels of the training or test set."""
    prefix = "train" if train else "t10k"
    x = torch.from_numpy(read_idx(f"{data_dir}/{prefix}-images-idx3-ubyte.gz").astype("float32") / 255.0)
    y = torch.from_numpy(read_idx(f"{data_dir}/{prefix}-labels-idx1-ubyte.gz").astype("int64"))
    return x, y


def test_accuracy(model, data_dir):
    tx, ty = fashion_mnist(data_dir, train=False)
    model.eval()  # BatchNorm (resnet) uses its moving statistics
    with torch.no_grad():
        return (model(tx).argmax(1) == ty).float().mean().item()


def train(model, opt, x, y, epochs, batch=100):
    """SGD over shuffled batches of (x, y), as mx's training loop does."""
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0])
        for i in range(0, x.shape[0], batch):
            idx = perm[i:i + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()


def train_epochs(model_name, threads, epochs, lr, momentum, data_dir, seed=0):
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = {"mlp": mlp, "lenet": lenet, "resnet": resnet}[model_name]()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    start = time.perf_counter()
    x, y = fashion_mnist(data_dir, train=True)
    train(model, opt, x, y, epochs)
    elapsed = time.perf_counter() - start
    print("samples_per_s", epochs * x.shape[0] / elapsed, "accuracy", test_accuracy(model, data_dir))


def ddp_worker(rank, world, port, model_name, threads, epochs, lr, data_dir, result):
    import os
    import torch.distributed as dist
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel({"mlp": mlp, "lenet": lenet}[model_name]())
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = fashion_mnist(data_dir, train=True)
    part = (x.shape[0] + world - 1) // world
    x, y = x[rank * part:(rank + 1) * part], y[rank * part:(rank + 1) * part]
    dist.barrier()
    start = time.perf_counter()
    train(model, opt, x, y, epochs)
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        result.put((epochs * x.shape[0] * world / elapsed, test_accuracy(model, data_dir)))
    dist.destroy_process_group()


def spawn_ddp(worker, world, *args):
    """Runs worker(rank, world, port, *args, result) in `world` processes on a
    free port; returns what rank 0 puts in `result`."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port) + args + (result,))
             for r in range(world)]
    for p in procs:
        p.start()
    answer = result.get(timeout=900)
    for p in procs:
        p.join(timeout=60)
    return answer


def train_ddp(model_name, threads, epochs, lr, world, data_dir):
    rate, acc = spawn_ddp(ddp_worker, world, model_name, threads, epochs, lr, data_dir)
    print("samples_per_s", rate, "accuracy", acc)


def libsvm(path, fields):
    """A click log in libsvm text (mx_ctr_gen's): feature indices (N, fields), labels (N,)."""
    import gzip
    ids, labels = [], []
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        for line in f:
            t = line.split()
            labels.append(1 if t[0] in ("1", "+1") else 0)
            ids.append([int(x.split(":")[0]) for x in t[1:1 + fields]])
    return torch.tensor(ids), torch.tensor(labels)


class Ctr(nn.Module):
    """mx's zoo::Ctr: wide (2 per feature, summed) + deep (16 per feature, fc 64 relu, fc 2),
    both tables with sparse gradients, uniform(-0.07, 0.07) as mx starts its tables."""

    def __init__(self, features, fields, dim=16):
        super().__init__()
        self.wide = nn.EmbeddingBag(features, 2, mode="sum", sparse=True)
        self.deep = nn.Embedding(features, dim, sparse=True)
        for e in (self.wide, self.deep):
            nn.init.uniform_(e.weight, -0.07, 0.07)
        self.fc1 = nn.Linear(fields * dim, 64)
        self.fc2 = nn.Linear(64, 2)

    def forward(self, x):
        return self.wide(x) + self.fc2(torch.relu(self.fc1(self.deep(x).flatten(1))))


def ctr_worker(rank, world, port, threads, epochs, lr, train_path, test_path, fields, features,
               result):
    import os
    import torch.distributed as dist
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(Ctr(features, fields))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = libsvm(train_path, fields)
    x, y = x[rank::world], y[rank::world]  # mx's LibSvmIter parts: every world-th line
    loss_fn = nn.CrossEntropyLoss()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(epochs):
        for i in range(0, x.shape[0], 256):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[i:i + 256]), y[i:i + 256]).backward()
            opt.step()
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        tx, ty = libsvm(test_path, fields)
        with torch.no_grad():
            logloss = loss_fn(model(tx), ty).item()
        result.put((epochs * x.shape[0] / elapsed, logloss))
    dist.destroy_process_group()


def train_ctr_ddp(threads, epochs, lr, world, train_path, test_path, fields, features):
    """Prints samples per second per process and the test log-loss."""
    rate, logloss = spawn_ddp(ctr_worker, world, threads, epochs, lr, train_path, test_path,
                              fields, features)
    print("samples_per_s", rate, "logloss", logloss)


if __name__ == "__main__":
    if sys.argv[1] == "train_step":
        train_step(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    elif sys.argv[1] == "train_step_gpu":
        train_step_gpu(sys.argv[2], float(sys.argv[3]))
    elif sys.argv[1] == "train_epochs":
        train_epochs(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]),
                     float(sys.argv[6]), sys.argv[7], int(sys.argv[8]) if len(sys.argv) > 8 else 0)
    elif sys.argv[1] == "train_ddp":
        train_ddp(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]),
                  int(sys.argv[6]), sys.argv[7])
    elif sys.argv[1] == "train_ctr_ddp":
        train_ctr_ddp(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]),
                      sys.argv[6], sys.argv[7], int(sys.argv[8]), int(sys.argv[9]))
    else:
        sys.exit("unknown command " + sys.argv[1])
