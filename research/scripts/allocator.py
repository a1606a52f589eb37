"""What keeping freed memory in the heap (``blackbox_saliency.allocator``) does to a CPU forward loop.

    python benchmarks/allocator.py            # about a minute on 2 cores

Runs EfficientNet-Lite0 (random weights: the work does not depend on them) forward on batches of
``--batch-size`` images at 224 px, float32, in two fresh processes: one with glibc's own allocator
behaviour, one after ``keep_freed_memory()``. Prints, per process, images/s over ``--repeats``
batches after one warm-up batch, the process's user and system CPU time, its minor page faults and
its peak resident memory, as a markdown table with the command, machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import date

_RUN = """
import json, resource, sys, time
import timm, torch
from blackbox_saliency.allocator import keep_freed_memory
mode, batch, repeats, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
applied = keep_freed_memory() if mode == "kept" else False
torch.set_num_threads(threads)
torch.manual_seed(0)
model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
images = torch.randn(batch, 3, 224, 224)
with torch.no_grad():
    model(images)
    start = time.perf_counter()
    for _ in range(repeats):
        model(images)
    seconds = time.perf_counter() - start
use = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"applied": applied, "rate": repeats * batch / seconds, "user": use.ru_utime,
                  "system": use.ru_stime, "faults": use.ru_minflt, "peak_mib": use.ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for name in ("batch_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(args, name)}")
    # glibc's own behaviour must be what the first process gets: no opt-out or tuning inherited
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "BLACKBOX_SALIENCY_MALLOC"))}
    rows = {}
    for mode in ("default", "kept"):
        out = subprocess.run([sys.executable, "-c", _RUN, mode, str(args.batch_size), str(args.repeats), str(args.threads)],
                             env=env, check=True, capture_output=True, text=True).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
    command = " ".join(["python benchmarks/allocator.py", *map(shlex.quote, sys.argv[1:])])
    print(f"Command: `{command}`; machine: {platform.machine()}, "
          f"{args.threads} CPU threads; date: {date.today()}. EfficientNet-Lite0 forward, float32, batch "
          f"{args.batch_size} at 224 px, {args.repeats} timed batches.\n")
    print("| allocator | images/s | user CPU (s) | system CPU (s) | minor page faults | peak memory (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    labels = {"default": "glibc's own behaviour", "kept": "freed memory kept in the heap"}
    for mode, r in rows.items():
        label = labels[mode] + ("" if mode == "default" or r["applied"] else " (not applied: not glibc?)")
        print(f"| {label} | {r['rate']:.1f} | {r['user']:.1f} | {r['system']:.1f} | {r['faults']:,} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
