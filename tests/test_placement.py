"""The placement policy: defaults per device, and bad placements refused before any work with one line."""

from __future__ import annotations

import pytest
import torch

from slimlm import SlimlmError
from slimlm.placement import choose, default_dtype, solver_threads


def test_defaults_follow_the_device():
    p = choose("cpu")
    assert p.device == torch.device("cpu") and p.dtype == torch.float32 and p.world_size == 1
    assert p.to_dict() == {"device": "cpu", "dtype": "float32", "world_size": 1}
    assert default_dtype("cuda") == torch.bfloat16 and default_dtype("cpu") == torch.float32
    assert solver_threads("cpu") == 1 and solver_threads("cuda") == 0
    if not torch.cuda.is_available():
        assert choose().device == torch.device("cpu")


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                          ("fp32", torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_dtype_names(name, dtype):
    assert choose("cpu", name).dtype == dtype


@pytest.mark.parametrize("device, dtype, world, message", [
    ("cpu", "float16", 1, "does not run on cpu"),
    ("cpu", "int8", 1, "expected one of"),
    ("tpu", None, 1, "not a torch device|slimlm runs on"),
    ("cpu", None, 0, "must be at least 1"),
])
def test_bad_placements_fail_with_one_line(device, dtype, world, message):
    with pytest.raises(SlimlmError, match=message) as e:
        choose(device, dtype, world)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(SlimlmError, match="no CUDA GPU"):
        choose("cuda")
