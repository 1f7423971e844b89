"""The sync-free training step: non-finite steps skipped on the device, the same on every rank.

The two-rank test runs real DDP (gloo) in two processes without Ray: rank 1 gets a NaN batch
at the second step; both ranks must skip that step (weights, Adam moments and step count
untouched), count it identically, and take the next step normally, staying identical.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.train import checkpoint, step


def _tiny_model():
    from pipeline.model import build_model

    return build_model("tiny", 2, n_resgroups=1, n_resblocks=1, n_feats=16)


def _parts(model, net=None, *, world: int = 1, fused: bool = False, ema=None) -> step.StepParts:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3, fused=True) if fused else step.build_optimizer(
        params, torch.device("cpu"), 1e-3, (0.9, 0.999), 1e-8, 0.0)
    return step.StepParts(
        model=model, net=net or model, optimizer=opt, scaler=torch.amp.GradScaler("cuda", enabled=False),
        ema=ema, ema_decay=0.9, grad_clip=0.0, precision="fp32", device=torch.device("cpu"),
        loss_weight=1.0, local_batch=2, zero_to_none=world == 1,
    )


def _batch(seed: int, nan: bool = False):
    g = torch.Generator().manual_seed(seed)
    lr, hr = torch.rand(2, 3, 12, 12, generator=g), torch.rand(2, 3, 24, 24, generator=g)
    if nan:
        lr[0, 0, 0, 0] = float("nan")
    return lr, hr


def _snapshot(parts: step.StepParts) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in parts.model.parameters()]
    for state in parts.optimizer.state.values():
        tensors += [v.detach().clone() for v in state.values()]
    if parts.ema is not None:
        tensors += [p.detach().clone() for p in parts.ema.parameters()]
    return tensors


@pytest.mark.parametrize("fused", [False, True], ids=["foreach-cpu", "fused-device-flag"])
def test_a_non_finite_step_changes_nothing(fused: bool):
    """foreach (the CPU path, a host branch) and fused Adam (the CUDA path: the skip happens
    inside the kernel from a device flag; PyTorch runs it on the CPU too)."""
    torch.manual_seed(0)
    model = _tiny_model()
    ema = _tiny_model()
    parts = _parts(model, fused=fused, ema=ema)
    window, timer = step.Window(parts.device), step.Timer(parts.device)
    step.train_step(parts, *_batch(1), window, timer)
    before = _snapshot(parts)
    step.train_step(parts, *_batch(2, nan=True), window, timer)
    after = _snapshot(parts)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    loss_sum, norm_sum, good, skipped, bad_run, worst_run = [float(v) for v in window.values()]
    assert (good, skipped, bad_run, worst_run) == (1.0, 1.0, 1.0, 1.0)
    step.train_step(parts, *_batch(3), window, timer)
    assert not all(torch.equal(a, b) for a, b in zip(before, _snapshot(parts), strict=True))
    assert [float(v) for v in window.values()][2:] == [2.0, 1.0, 0.0, 1.0]
    assert torch.isfinite(window.norm_sum) and window.norm_sum > 0


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _tiny_model()
        ddp = DistributedDataParallel(model, gradient_as_bucket_view=True)
        parts = _parts(model, ddp, world=world)
        window, timer = step.Window(parts.device), step.Timer(parts.device)
        step.train_step(parts, *_batch(10 + rank), window, timer)
        before = _snapshot(parts)
        step.train_step(parts, *_batch(20 + rank, nan=rank == 1), window, timer)  # NaN on rank 1 only
        skipped_same = all(torch.equal(a, b) for a, b in zip(before, _snapshot(parts), strict=True))
        counters = [float(v) for v in window.values()][2:]
        step.train_step(parts, *_batch(30 + rank), window, timer)
        moved = not all(torch.equal(a, b) for a, b in zip(before, _snapshot(parts), strict=True))
        from pipeline.train.loop import param_digest

        result = {"skipped_same": skipped_same, "counters": counters, "moved": moved, "digest": param_digest(model)}
        Path(out, f"rank{rank}.json.tmp").write_text(json.dumps(result))
        os.replace(Path(out, f"rank{rank}.json.tmp"), Path(out, f"rank{rank}.json"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_nan_batch_on_one_rank_is_skipped_on_every_rank(tmp_path: Path):
    import torch.multiprocessing as mp
    from helpers import free_port

    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["skipped_same"] and r["moved"], r
        assert r["counters"] == [1.0, 1.0, 1.0, 1.0], r  # good, skipped, bad run, worst run
    assert results[0]["digest"] == results[1]["digest"]


def test_ema_update_skips_with_the_flag():
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    step.ema_update(ema, model, 0.9, torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.parameters(), strict=True))
    step.ema_update(ema, model, 0.9, torch.tensor(0.0))
    for e, b, m in zip(ema.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * m)


def test_checkpoint_keeps_each_ranks_rng_and_derives_a_missing_one(tmp_path: Path):
    from pipeline.train.loop import ema_update  # noqa: F401 - the loop still exports it

    torch.manual_seed(1)
    rank0 = checkpoint.rng_state()
    torch.manual_seed(2)
    rank1 = checkpoint.rng_state()
    model = _tiny_model()
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2])
    checkpoint.save(tmp_path, model, opt, sched, checkpoint.Progress(step=7, checkpoint_every=3), rng=[rank0, rank1])
    progress, state = checkpoint.load(tmp_path, model, opt, sched, restore_rng=False)
    assert progress.step == 7 and progress.checkpoint_every == 3
    states = checkpoint.rng_states(state)
    torch.manual_seed(2)
    expected = torch.rand(3)
    torch.manual_seed(99)
    assert checkpoint.restore_rank_rng(states, 1, seed=5, step=7) == "own"
    assert torch.equal(torch.rand(3), expected)  # rank 1 continues its own sequence, not rank 0's
    assert checkpoint.restore_rank_rng(states, 2, seed=5, step=7) == "derived"
    derived = torch.rand(3)
    checkpoint.restore_rank_rng(states, 2, seed=5, step=7)
    assert torch.equal(torch.rand(3), derived)
    assert checkpoint.restore_rank_rng(None, 0, seed=5, step=0) == "fresh"


def test_channels_last_model_gives_the_same_step():
    """What CUDA runs (channels_last weights and inputs) is the same computation (CPU check)."""
    torch.manual_seed(0)
    a = _tiny_model()
    b = _tiny_model()
    b.load_state_dict(a.state_dict())
    b = b.to(memory_format=torch.channels_last)
    lr, hr = _batch(4)
    torch.manual_seed(5)  # the same stochastic hash draws for both
    out_a = a(lr)
    torch.manual_seed(5)
    out_b = b(lr.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    torch.nn.functional.l1_loss(out_a, hr).backward()
    torch.nn.functional.l1_loss(out_b, hr).backward()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-3, atol=1e-5)


def test_compile_without_a_compiler_runs_eagerly_with_one_warning(tmp_path: Path, monkeypatch, capsys):
    import torch._inductor.config as inductor

    from pipeline.train.loop import Worker
    from pipeline.train.setup import compiled

    class Cfg:
        compile = True

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # nothing compiled before is reused
    model = torch.nn.Linear(2, 2)
    with inductor.patch({"cpp.cxx": (None, str(tmp_path / "no-such-compiler")), "fx_graph_cache": False}):
        out = compiled(model, Worker(Cfg(), None, 0, 1, torch.device("cpu"), 2))
    assert out is model
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "--compile: torch.compile cannot run on every worker" in err
    assert "training runs eagerly" in err
