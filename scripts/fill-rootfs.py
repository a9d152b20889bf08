#!/usr/bin/env python3
"""Fills a rootfs with generated files for the benchmark images.

Usage: fill-rootfs.py ROOT synthetic|writebench
  synthetic   /tree/dNNN/fNNN: 500 dirs of 100 small files, and /big.bin (1 GiB)
  writebench  /dir5k/fNNNN: 5,000 small files, and /big.bin (1 GiB)
Small files are 0-8 KiB of words; big.bin repeats a block of words and
random bytes (gzip takes it to about 45%). The same seed gives the same bytes.
"""
import os
import random
import sys

WORDS = [b"alpha ", b"beta ", b"gamma ", b"delta ", b"\n", b"epsilon "]


def small_files(rng, path, count, width):
    os.makedirs(path)
    for f in range(count):
        size = rng.randrange(0, 8192)
        data = b"".join(rng.choice(WORDS) for _ in range(size // 5 + 1))[:size]
        with open(os.path.join(path, f"f{f:0{width}}"), "wb") as fh:
            fh.write(data)


def big_file(rng, path, size=1 << 30):
    block = b"".join(rng.choice(WORDS) + rng.randbytes(2) for _ in range(200_000))
    with open(path, "wb") as fh:
        written = 0
        while written < size:
            chunk = block[: size - written]
            fh.write(chunk)
            written += len(chunk)


def main():
    root, kind = sys.argv[1], sys.argv[2]
    if kind == "synthetic":
        rng = random.Random(42)
        for d in range(500):
            small_files(rng, os.path.join(root, "tree", f"d{d:03}"), 100, 3)
    elif kind == "writebench":
        rng = random.Random(7)
        small_files(rng, os.path.join(root, "dir5k"), 5000, 4)
    else:
        sys.exit(f"fill-rootfs.py: unknown image {kind!r}")
    big_file(rng, os.path.join(root, "big.bin"))


if __name__ == "__main__":
    main()
