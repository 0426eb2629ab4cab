"""What one plan costs at small token counts, where a GPU step is bound by kernel launches: the aten ops a plan
dispatches (each one or more kernels on a GPU, whatever the token count) and its time on this machine.

    OMP_NUM_THREADS=1 python benchmarks/plan_cost.py --tokens 256,1024,4096 --repeats 200
    python benchmarks/plan_cost.py --device cuda --tokens 256,1024,4096,16384
    # against an older tree, interleaved in one process:
    git worktree add /tmp/base <rev> && OMP_NUM_THREADS=1 python benchmarks/plan_cost.py --baseline /tmp/base/src

Kernels = aten ops other than views (view, expand, slice, ...), counted with a TorchDispatchMode after one
warm-up plan (which builds the shape constants). Times are medians of ``--repeats`` interleaved plans; on a GPU
each plan is timed from a synchronised device to its last kernel's end (launches included).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VIEWS = {"view", "_unsafe_view", "expand", "unsqueeze", "squeeze", "slice", "select", "transpose", "t", "permute",
         "alias", "detach", "reshape", "as_strided"}


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        return sum(n for name, n in self.ops.items() if name not in VIEWS)


def configs(package) -> dict[str, object]:
    return {
        "ToMe (top-left cells)": package.ToMe(ratio=0.5, use_rand=False, min_tokens=0),
        "ToMe (random cells)": package.ToMe(ratio=0.5, min_tokens=0),
        "ToMe match_window=1": package.ToMe(ratio=0.5, min_tokens=0, match_window=1),
        "ImportanceMerge": package.ImportanceMerge(ratio=0.5, min_tokens=0, prune_steps=0.0),
    }


def plan_call(package, config, tokens: int, channels: int, device: torch.device):
    side = int(tokens**0.5)
    x = torch.randn(2, side * side, channels, generator=torch.Generator().manual_seed(0)).to(device)
    base = package.methods.base
    # A CFG pair: builds before the guidance layouts said it with a flag.
    pair = {"guided": base.CFG} if hasattr(base, "CFG") else {"cfg_pairs": True}
    ctx = base.PlanContext(
        grid=(side, side), generator=torch.Generator(device).manual_seed(0) if config.uses_rng else None,
        **pair, importance=torch.rand(1, side * side, generator=torch.Generator().manual_seed(1)).to(device))
    return lambda: config.make_plan(x, ctx)


def seconds(call, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def load_baseline(src: str):
    """The ``tokenmerge`` package under ``src``, imported as ``tokenmerge_baseline`` (its imports are relative)."""
    target = Path(tempfile.mkdtemp()) / "tokenmerge_baseline"
    shutil.copytree(Path(src) / "tokenmerge", target, ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(target.parent))
    return importlib.import_module("tokenmerge_baseline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="256,1024,4096", help="square token grids, comma-separated")
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--baseline", help="a tree's src/ directory to compare with (e.g. a git worktree)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import tokenmerge

    device = torch.device(args.device)
    trees = {"now": tokenmerge}
    if args.baseline:
        trees = {"baseline": load_baseline(args.baseline), **trees}
    names = list(configs(tokenmerge))
    head = " | ".join(f"{tree} kernels | {tree} ms" for tree in trees)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"| method | tokens | {head} |" + (" speed-up |" if len(trees) == 2 else "")
          + f"  ({where}, batch 2 (CFG), C = {args.channels}, r = 0.5)")
    print("| --- | --- |" + " --- | --- |" * len(trees) + (" --- |" if len(trees) == 2 else ""))
    for tokens in map(int, args.tokens.split(",")):
        for name in names:
            calls = {tree: plan_call(pkg, configs(pkg)[name], tokens, args.channels, device)
                     for tree, pkg in trees.items()}
            kernels, times = {}, {tree: [] for tree in trees}
            for tree, call in calls.items():
                call()  # warm-up: builds the shape constants
                with CountOps() as counter:
                    call()
                kernels[tree] = counter.kernels
            for _ in range(args.repeats):  # interleaved
                for tree, call in calls.items():
                    times[tree].append(seconds(call, device))
            medians = {tree: statistics.median(t) * 1e3 for tree, t in times.items()}
            cells = " | ".join(f"{kernels[tree]} | {medians[tree]:.3f}" for tree in trees)
            ratio = f" {medians['baseline'] / medians['now']:.2f}x |" if len(trees) == 2 else ""
            print(f"| {name} | {tokens} | {cells} |{ratio}", flush=True)


if __name__ == "__main__":
    main()
