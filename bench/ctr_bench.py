#!/usr/bin/env python3
"""The sparse workload against PyTorch, in the same run (issue 18).

A click log with a planted model (mx_ctr_gen: 400,000 training and 20,000
test samples, 8 fields of 10,000 values) trains the wide-and-deep
click-through model for EPOCHS epochs, batch 256 per worker, SGD lr 0.5:

  mx: deploy/launch.py, 2 workers and 2 parameter servers on 127.0.0.1,
      dist_sync, the embedding tables row-sparse on the servers
      (mx_train --network=ctr);
  PyTorch: DistributedDataParallel over gloo, 2 processes, the same model
      with EmbeddingBag/Embedding(sparse=True), the same data split, at its
      best thread setting (1 or 2 per process).

Both count the training epochs' wall time (data loading and testing
excluded). Rounds alternate and each side keeps its best, as this machine
has slow spells. Figures:
  ctr_dist_samples: samples/s per worker (ratio mx / PyTorch, target >= 2),
      with both test log-losses after the same epochs;
  ctr_time_to_logloss: seconds until the test log-loss PyTorch ends with
      is reached (mx: after the first epoch whose test log-loss is at most
      that; ratio PyTorch / mx).

Usage: bench/ctr_bench.py [EPOCHS] [ROUNDS]  (after bazel build
//server:mx_server //worker:mx_train //worker:mx_ctr_gen)
"""
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PY = "/usr/bin/python3"  # Debian's python, where python3-torch lives
WORKERS = 2
FIELDS, VOCAB = 8, 10000
TRAIN_SAMPLES = 400000


def bin_path(name):
    return os.path.join(ROOT, "bazel-bin", name)


def make_logs(tmp):
    paths = []
    for name, samples, seed in (("train", TRAIN_SAMPLES, 1), ("test", 20000, 2)):
        path = os.path.join(tmp, name + ".txt.gz")
        subprocess.run([bin_path("worker/mx_ctr_gen"), f"--out={path}", f"--samples={samples}",
                        f"--seed={seed}", f"--fields={FIELDS}", f"--vocab={VOCAB}"],
                       check=True, capture_output=True)
        paths.append(path)
    return paths


def mx_run(epochs, train, test):
    """Samples/s per worker and the test log-loss after each epoch."""
    cmd = [sys.executable, os.path.join(ROOT, "deploy/launch.py"), "-n", str(WORKERS), "-s", "2",
           "--server-binary", bin_path("server/mx_server"), "--",
           bin_path("worker/mx_train"), "--kvstore=dist_sync", "--network=ctr",
           f"--train_libsvm={train}", f"--test_libsvm={test}", f"--ctr_fields={FIELDS}",
           f"--ctr_features={FIELDS * VOCAB}", "--batch_size=256", f"--epochs={epochs}",
           "--lr=0.5"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    seconds, losses = {}, []
    for m in re.finditer(r"\[worker (\d+)\] Epoch\[(\d+)\] .*Validation-cross-entropy=([0-9.]+) "
                         r"Time cost=([0-9.]+) s", run.stdout):
        seconds.setdefault(m.group(1), []).append(float(m.group(4)))
        if m.group(1) == "0":
            losses.append(float(m.group(3)))
    if len(seconds) != WORKERS or run.returncode != 0:
        sys.exit("mx run failed:\n" + run.stdout[-2000:] + run.stderr[-2000:])
    per_worker = TRAIN_SAMPLES / WORKERS
    rate = epochs * per_worker / max(sum(s) for s in seconds.values())
    epoch_seconds = [max(s[e] for s in seconds.values()) for e in range(epochs)]
    return rate, losses, epoch_seconds


def torch_run(epochs, threads, train, test):
    r = subprocess.run([TORCH_PY, os.path.join(ROOT, "bench/torch_baseline.py"), "train_ctr_ddp",
                        str(threads), str(epochs), "0.5", str(WORKERS), train, test, str(FIELDS),
                        str(FIELDS * VOCAB)], capture_output=True, text=True, timeout=900)
    m = re.search(r"samples_per_s ([0-9.]+) logloss ([0-9.]+)", r.stdout)
    if m is None:
        print("PyTorch DDP unavailable:", (r.stdout + r.stderr)[-500:])
        return None
    return float(m.group(1)), float(m.group(2))


def main():
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    with tempfile.TemporaryDirectory() as tmp:
        train, test = make_logs(tmp)
        best_mx, best_torch = None, None
        for _ in range(rounds):
            mx = mx_run(epochs, train, test)
            if best_mx is None or mx[0] > best_mx[0]:
                best_mx = mx
            for threads in (1, 2):
                t = torch_run(epochs, threads, train, test)
                if t is not None and (best_torch is None or t[0] > best_torch[0]):
                    best_torch = t
    if best_torch is None:
        sys.exit("no PyTorch baseline")
    rate, losses, epoch_seconds = best_mx
    torch_rate, torch_loss = best_torch
    print(f"BENCH name=ctr_dist_samples value={rate:.4g} unit=samples/s/worker "
          f"baseline={torch_rate:.4g} ratio={rate / torch_rate:.3f} target=>=2 "
          f"logloss_mx={losses[-1]:.4f} logloss_torch={torch_loss:.4f}")
    # Time to PyTorch's final log-loss: its whole run against mx's epochs
    # up to the first that reaches it.
    torch_seconds = epochs * (TRAIN_SAMPLES / WORKERS) / torch_rate
    reached = [e for e, loss in enumerate(losses) if loss <= torch_loss]
    if reached:
        mx_seconds = sum(epoch_seconds[:reached[0] + 1])
        print(f"BENCH name=ctr_time_to_logloss value={mx_seconds:.3g} unit=s "
              f"baseline={torch_seconds:.3g} ratio={torch_seconds / mx_seconds:.3f} target=>=2 "
              f"logloss={torch_loss:.4f}")
    else:
        print(f"BENCH name=ctr_time_to_logloss value=inf unit=s baseline={torch_seconds:.3g} "
              f"ratio=0 target=>=2 logloss={torch_loss:.4f} (mx did not reach it in {epochs} epochs)")


if __name__ == "__main__":
    main()
