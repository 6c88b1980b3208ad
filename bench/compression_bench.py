#!/usr/bin/env python3
"""2-bit gradient compression on a bandwidth-limited link (issue 18).

The README job (the Fashion-MNIST MLP, dist_sync, 2 workers and 2 parameter
servers, batch 100 per worker, SGD) runs inside a network namespace made
here whose loopback is limited to 1 Gbit/s (tc tbf): every byte between
the job's nodes crosses that one link. It runs with
--gradient_compression=2bit and without, rounds alternating, each keeping
its best. Prints one BENCH line: samples/s per worker with 2-bit, baseline
uncompressed, ratio = 2-bit / uncompressed (target >= 1.5), and both test
accuracies. Needs root (ip netns, tc), as CI has.

Usage: bench/compression_bench.py [EPOCHS] [ROUNDS]  (after bazel build
//server:mx_server //worker:mx_train)
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "/usr/share/datasets/fashion-mnist"
WORKERS = 2
TRAIN_SAMPLES = 60000
NS = f"mxcomp{os.getpid()}"


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def make_link():
    sh("ip", "netns", "add", NS)
    sh("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
    sh("ip", "netns", "exec", NS, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate",
       "1gbit", "burst", "128kb", "latency", "50ms")


def run(epochs, compression):
    """Samples/s per worker over the training epochs, and the test accuracy."""
    cmd = ["ip", "netns", "exec", NS, sys.executable, os.path.join(ROOT, "deploy/launch.py"),
           "-n", str(WORKERS), "-s", "2",
           "--server-binary", os.path.join(ROOT, "bazel-bin/server/mx_server"), "--",
           os.path.join(ROOT, "bazel-bin/worker/mx_train"), "--kvstore=dist_sync",
           "--network=mlp", f"--epochs={epochs}", "--lr=0.2", f"--data_dir={DATA}",
           f"--gradient_compression={compression}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    seconds = {}
    for m in re.finditer(r"\[worker (\d+)\] Epoch\[\d+\] .*Time cost=([0-9.]+) s", r.stdout):
        seconds[m.group(1)] = seconds.get(m.group(1), 0.0) + float(m.group(2))
    acc = re.search(r"\[worker 0\] Final test accuracy=([0-9.]+)", r.stdout)
    if len(seconds) != WORKERS or acc is None or r.returncode != 0:
        sys.exit(f"mx run ({compression}) failed:\n" + r.stdout[-2000:] + r.stderr[-2000:])
    return epochs * TRAIN_SAMPLES / WORKERS / max(seconds.values()), float(acc.group(1))


def main():
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    if os.geteuid() != 0:
        print("compression_bench: skipped: needs root for ip netns and tc")
        return
    try:
        make_link()
        best = {}
        for _ in range(rounds):
            for compression in ("none", "2bit"):
                rate, acc = run(epochs, compression)
                if compression not in best or rate > best[compression][0]:
                    best[compression] = (rate, acc)
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    (rate, acc), (base, base_acc) = best["2bit"], best["none"]
    print(f"BENCH name=compression_2bit_1gbit value={rate:.4g} unit=samples/s/worker "
          f"baseline={base:.4g} ratio={rate / base:.3f} target=>=1.5 "
          f"accuracy_2bit={acc:.4f} accuracy_none={base_acc:.4f}")


if __name__ == "__main__":
    main()
