"""Device, backend and precision selection (pipeline.device) on this CPU-only machine."""

from __future__ import annotations

import pytest
import torch

from pipeline.console import UserError
from pipeline.device import autocast, dist_backend, resolve_precision, select_device

CPU = torch.device("cpu")


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("warning:")]


@pytest.mark.parametrize("requested", ["bf16", "fp16"])
def test_half_precision_on_cpu_falls_back_to_fp32_with_one_warning(requested, capsys):
    assert resolve_precision(CPU, requested) == "fp32"
    err = capsys.readouterr().err
    assert _warnings(err) == [f"warning: --precision {requested} needs a CUDA GPU; running in fp32 on cpu"]
    # asked quietly (the other ranks): same answer, no second warning
    assert resolve_precision(CPU, requested, warn=None) == "fp32"
    assert capsys.readouterr().err == ""


def test_fp32_is_a_silent_no_op(capsys):
    assert resolve_precision(CPU, "fp32") == "fp32"
    x = torch.rand(8, 8)
    with autocast(CPU, "fp32"):
        assert (x @ x).dtype == torch.float32
    assert capsys.readouterr().err == ""


def test_autocast_never_warns_and_computes_in_fp32_on_cpu(capsys):
    """autocast is called on every step: even an unresolved request stays silent (and fp32)."""
    x = torch.rand(8, 8)
    for _ in range(3):
        with autocast(CPU, "bf16"):
            assert (x @ x).dtype == torch.float32
    assert capsys.readouterr().err == ""


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(UserError, match="precision must be auto, fp32, bf16 or fp16, got 'fp8'"):
        resolve_precision(CPU, "fp8")
    with pytest.raises(UserError, match="got 'fp8'"):
        autocast(CPU, "fp8")


def test_auto_precision_is_fp32_on_cpu_without_a_warning(capsys):
    """Nothing specific was asked for, so falling back is not worth a warning."""
    assert resolve_precision(CPU, "auto") == "fp32"
    x = torch.rand(8, 8)
    with autocast(CPU, "auto"):
        assert (x @ x).dtype == torch.float32
    assert capsys.readouterr().err == ""


def test_backend_follows_the_device():
    assert dist_backend(CPU) == "gloo" and dist_backend("cpu") == "gloo"
    assert dist_backend(torch.device("cuda", 1)) == "nccl" and dist_backend("cuda") == "nccl"


def test_device_selection_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert select_device("auto").type == "cpu" and select_device("cpu").type == "cpu"
    with pytest.raises(UserError, match="no CUDA GPU"):
        select_device("cuda")
