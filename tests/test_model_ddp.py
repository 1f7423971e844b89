"""A real two-process DDP (gloo, loopback) training step with the unused parameter ``a``."""

from __future__ import annotations

import os
import socket
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SMALL = {"n_resgroups": 1, "n_resblocks": 1, "n_feats": 16, "chunk_size": 16, "n_hashlength": 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, variant: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from pipeline.model import build_model, set_hash_mode

        torch.manual_seed(0)  # same initial weights on both ranks
        model = build_model("tiny", 2, **SMALL)
        if variant == "reference_a":
            # what a literal port would do: `a` trainable and not ignored -> DDP must complain
            model.a.requires_grad_(True)
            model._ddp_params_and_buffers_to_ignore = ()
        elif variant == "a_trainable_but_ignored":
            model.a.requires_grad_(True)
        set_hash_mode(model, "fixed", 0)
        ddp = DDP(model)  # deliberately without find_unused_parameters
        opt = torch.optim.Adam([p for p in ddp.parameters() if p.requires_grad], lr=1e-3)
        torch.manual_seed(100 + rank)  # different data per rank
        error = ""
        try:
            for _ in range(3):
                lr = torch.rand(2, 3, 8, 8)
                hr = torch.rand(2, 3, 16, 16)
                loss = torch.nn.functional.l1_loss(ddp(lr), hr)
                opt.zero_grad()
                loss.backward()
                opt.step()
        except RuntimeError as exc:
            error = str(exc).splitlines()[0]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        tmp = Path(out_dir) / f"rank{rank}.pt.tmp"
        torch.save({"error": error, "state": state}, tmp)
        tmp.rename(tmp.with_suffix(""))  # complete or absent
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def _run(variant: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        results = [Path(out) / f"rank{r}.pt" for r in range(2)]
        try:
            mp.start_processes(
                _worker, args=(2, _free_port(), out, variant), nprocs=2, join=True,
                start_method="spawn",
            )
        except mp.ProcessExitedException as exc:
            # Rarely (1 in ~50 runs here) gloo's C++ teardown aborts a process after its work is
            # done ("terminate called without an active exception"). Each rank writes its result
            # only after all its steps, so if both results exist the steps under test completed;
            # a crash before that leaves a result missing and fails the test.
            if not all(p.exists() for p in results):
                raise
            warnings.warn(f"ignored a crash in gloo teardown after both ranks finished: {exc}", stacklevel=1)
        return [torch.load(p, weights_only=True) for p in results]


def test_ddp_step_runs_without_find_unused_parameters():
    results = _run("ours")
    assert [r["error"] for r in results] == ["", ""]
    s0, s1 = (r["state"] for r in results)
    # gradients were all-reduced: both ranks hold identical weights after 3 steps
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
    # and the weights did change (a real step happened), except the frozen ones
    torch.manual_seed(0)
    from pipeline.model import build_model

    init = build_model("tiny", 2, **SMALL).state_dict()
    assert not torch.equal(init["head.0.weight"], s0["head.0.weight"])
    assert torch.equal(init["a"], s0["a"]) and torch.equal(init["sub_mean.bias"], s0["sub_mean.bias"])


def test_ddp_controls_trainable_a():
    # ignored by DDP even if someone makes it trainable again
    assert [r["error"] for r in _run("a_trainable_but_ignored")] == ["", ""]
    # the control: a gradient-less trainable parameter DDP does not ignore breaks the 2nd step
    errors = [r["error"] for r in _run("reference_a")]
    assert all("unused" in e or "reduction" in e for e in errors), errors
