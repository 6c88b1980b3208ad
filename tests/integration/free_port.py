"""Prints a TCP port that is free now, for a test that must name a port
before it starts what listens on it (a --port flag, a Kubernetes manifest,
Prometheus's address).

The port is below the kernel's ephemeral range, so no process that binds
port 0 or connects out (every mx daemon of a test's job, any other test
running beside it) can be given it between this check and the test's own
bind: a port taken from bind(("127.0.0.1", 0)) could be, and CI saw a job's
server take one. Only another test's pick can collide, and it is checked
free here when picked.
"""
import random
import socket
import sys


def ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def is_free(port):
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", port))  # free on every address, 127.0.0.1 included
        return True
    except OSError:
        return False
    finally:
        s.close()


def main():
    low, high = ephemeral_range()
    if low > 11000:
        candidates = range(10000, low)
    elif high < 64000:
        candidates = range(high + 1, 65536)
    else:
        candidates = range(0)  # no room outside the range: the kernel picks
    rng = random.SystemRandom()
    for _ in range(200):
        if not candidates:
            break
        port = rng.choice(candidates)
        if is_free(port):
            print(port)
            return 0
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
