"""The hooks' hot path (denoiser hooks, plans, merge and unmerge) never waits for the device.

On a GPU a host-device sync (``.item()``, ``float(tensor)``, a data-dependent shape such as ``nonzero`` or a
boolean mask) stalls the Python thread until every queued kernel has run, so the next kernels cannot be queued
behind the running ones. On CPU there is no queue to wait for, but the same ops reach the dispatcher, where a
dispatch mode sees them: these tests run whole pipelines and fail on any such op issued from tokenmerge's code.
A copy to the host (``.cpu()``, ``.tolist()``) dispatches nothing for a CPU tensor, so it is not seen here; the
data path has none (``grep`` the modules outside the CLI, bench and eval). A bare denoiser (no scheduler) reads
its timestep where plans follow the run: tests/test_compile.py checks it is read only there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tokenmerge
from tokenmerge import ImportanceMerge, ReToM, SiTo, ToFu, ToMe
from tokenmerge.tools.tiny import tiny_pipeline

PACKAGE = Path(tokenmerge.__file__).parent
# Model stand-ins and the testbed are models, not the hot path.
NOT_HOT_PATH = (PACKAGE / "tiny.py", PACKAGE / "testbed")

# Ops whose result the host must read before it can go on (or whose output shape depends on the data).
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "masked_scatter", "masked_scatter_", "unique_dim",
            "_unique", "_unique2", "unique_consecutive", "is_nonzero", "equal", "allclose", "bincount", "histc"}


def _boolean_index(func, args) -> bool:
    name = func.overloadpacket.__name__
    if name not in ("index", "index_put", "index_put_") or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])


def _repeat_without_size(func, kwargs) -> bool:
    return func.overloadpacket.__name__ == "repeat_interleave" and kwargs.get("output_size") is None


class HostSyncs(TorchDispatchMode):
    """Records the syncing ops dispatched from tokenmerge's own files, with the line that issued each."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in SYNC_OPS or _boolean_index(func, args) or _repeat_without_size(func, kwargs):
            caller = self._tokenmerge_caller()
            if caller is not None:
                self.found.append(f"{func} from {caller}")
        return func(*args, **kwargs)

    @staticmethod
    def _tokenmerge_caller() -> str | None:
        frame = sys._getframe(2)
        while frame is not None:
            path = Path(frame.f_code.co_filename)
            if path.is_relative_to(PACKAGE) and not any(path == p or path.is_relative_to(p) for p in NOT_HOT_PATH):
                return f"{path.relative_to(PACKAGE)}:{frame.f_lineno} ({frame.f_code.co_name})"
            frame = frame.f_back
        return None


@pytest.fixture(scope="module")
def sd1_pipe():
    pipe = tiny_pipeline("sd1")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps: int = 4):
    return pipe("a red circle", height=64, width=64, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


CONFIGS = {
    "tome": ToMe(ratio=0.5),
    "tome-top-left": ToMe(ratio=0.5, use_rand=False),
    "tome-window": ToMe(ratio=0.5, match_window=1),
    "tome-level-every-2": ToMe(ratio=0.5, share_plan="level", plan_every=2, max_downsample=2),
    "tome-all-submodules": ToMe(ratio=0.5, merge_crossattn=True, merge_mlp=True),
    "importance": ImportanceMerge(ratio=0.7, prune_steps=0.3),
    "importance-crossattn": ImportanceMerge(ratio=0.7, importance="crossattn"),
    "importance-topk-all": ImportanceMerge(ratio=0.7, dst_selection="topk", independent_from="all"),
    "importance-map": ImportanceMerge(ratio=0.7, importance=torch.rand(8, 8)),
    "retom": ReToM(ratio=0.5),
    "sito": SiTo(ratio=0.5),
    "tofu": ToFu(ratio=0.5),
    "importance-size-aware-kv-only": ImportanceMerge(ratio=0.7, prune_steps=0.3, proportional_attention=True,
                                                     merge_queries=False),
    "sito-size-aware-channel": SiTo(ratio=0.5, proportional_attention=True, bias_via="channel"),
    "retom-size-aware": ReToM(ratio=0.5, proportional_attention=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_patched_pipeline_run_issues_no_host_sync(sd1_pipe, name):
    tokenmerge.apply(sd1_pipe, CONFIGS[name], on_plan=(events := []).append)
    try:
        with HostSyncs() as syncs:
            generate(sd1_pipe)
    finally:
        tokenmerge.remove(sd1_pipe)
    assert any(e.plan is not None for e in events), "nothing was merged: the run checked nothing"
    assert syncs.found == []


def test_sdxl_pipeline_issues_no_host_sync():
    pipe = tiny_pipeline("sdxl")
    pipe.set_progress_bar_config(disable=True)
    tokenmerge.apply(pipe, ImportanceMerge(ratio=0.7, max_downsample=2, share_plan="level"))
    with HostSyncs() as syncs:
        generate(pipe, steps=3)
    assert syncs.found == []


def test_the_check_sees_a_sync_issued_from_a_plan(sd1_pipe, monkeypatch):
    """The negative control: a plan that reads one value back is caught, with its line."""
    make_plan = ToMe.make_plan

    def reads_back(self, x, ctx):
        float(x.mean())  # a host sync
        return make_plan(self, x, ctx)

    monkeypatch.setattr(ToMe, "make_plan", reads_back)
    tokenmerge.apply(sd1_pipe, ToMe(ratio=0.5))
    try:
        with HostSyncs() as syncs:
            generate(sd1_pipe, steps=1)
    finally:
        tokenmerge.remove(sd1_pipe)
    assert syncs.found and all("_local_scalar_dense" in f for f in syncs.found)
