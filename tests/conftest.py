"""Suite-wide settings: property tests draw the same examples on every run, and no test leaves process-wide state
changed for the tests after it (a fresh clone is green every time, in any order)."""

import importlib.util
import os

import pytest
from hypothesis import settings

# derandomize: examples come from a fixed seed, not from the clock or a local example database;
# DEFT_HYPOTHESIS_PROFILE=explore draws fresh random examples on every run (run it a few times when changing a method)
settings.register_profile("deft", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile(os.environ.get("DEFT_HYPOTHESIS_PROFILE", "deft"))


# ------------------------------------------------------------------------------------------ process-wide state
# libraries whose import sets environment variables once (scikit-learn sets KMP_DUPLICATE_LIB_OK): imported here,
# so that the first test to import them is not reported as having changed the environment
try:
    import sklearn  # noqa: F401
except ImportError:  # not installed: no test imports it either
    pass
# torch's compiler stack sets TORCHINDUCTOR_CACHE_DIR on its first import (`torch._dynamo.package`), which the
# model's `torch.compiler.is_compiling()` check triggers: a test file run alone failed its first such test
import torch._dynamo  # noqa: E402, F401

# vLLM's model modules set variables on their first import (cv2's LD_LIBRARY_PATH, Triton's and Inductor's
# settings): imported here in an environment with vLLM (requirements-vllm.txt), before any test imports them
if importlib.util.find_spec("vllm") is not None:
    import modeling_deft_llava.serving.vllm_model  # noqa: F401


def _global_state() -> dict:
    """What one test could leave changed for the next ones (and for the children they start)."""
    import torch

    return {
        "torch threads": torch.get_num_threads(),
        "torch default dtype": torch.get_default_dtype(),
        "torch grad mode": torch.is_grad_enabled(),
        "torch inference mode": torch.is_inference_mode_enabled(),
        "torch deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        # pytest itself sets PYTEST_CURRENT_TEST for every phase
        "environment variables": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},
        "current directory": os.getcwd(),
    }


def _restore(state: dict) -> None:
    import torch

    torch.set_num_threads(state["torch threads"])
    torch.set_default_dtype(state["torch default dtype"])
    torch.set_grad_enabled(state["torch grad mode"])
    torch.use_deterministic_algorithms(state["torch deterministic algorithms"])
    environ = state["environment variables"]
    for name in [k for k in os.environ if k not in environ and k != "PYTEST_CURRENT_TEST"]:
        del os.environ[name]
    os.environ.update(environ)
    os.chdir(state["current directory"])


def _difference(name: str, before, after) -> str:
    if name != "environment variables":
        return f"{name}: {before!r} -> {after!r}"
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return f"{name}: " + ", ".join(f"{k}={before.get(k)!r} -> {after.get(k)!r}" for k in changed)


@pytest.fixture(autouse=True)
def _no_test_leaves_global_state_changed():
    """Every test must leave the process as it found it; the random number generators are restored after it.

    Before: benchmark entry points called in-process changed torch's thread count, and a later bit-exact
    comparison with a child process failed only in some orders. A change is restored (so one offender does not
    fail the tests after it) and fails the test that made it. The generators (torch, numpy, random) are
    restored, not checked: drawing numbers is not a fault, depending on what an earlier test drew is."""
    import random

    import numpy as np
    import torch

    before = _global_state()
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    yield
    after = _global_state()
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    random.setstate(rng[2])
    if after != before:
        _restore(before)
        changes = [
            _difference(name, before[name], after[name]) for name in before if before[name] != after[name]
        ]
        pytest.fail("the test left process-wide state changed: " + "; ".join(changes), pytrace=False)
