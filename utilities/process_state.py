"""`restores_process_state`: an entry point called in-process (a test, a notebook, another command) leaves
torch's process-wide settings as it found them.

The commands and benchmarks set torch's thread count (`--threads`), turn gradients off for evaluation and seed
torch's generator. Run as a program that is harmless; called as `main(argv)` from a running process it changed
the caller: a later computation ran with another thread count (another reduction order, so bit-exact
comparisons with a child process failed) or without gradients.
"""

from __future__ import annotations

import functools
import os

import torch


def restores_process_state(function):
    """Decorate `function` so that, however it returns or raises, torch's thread count, grad mode, default
    dtype and generator state, the environment variables and the current directory are what they were before."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        threads, grad, dtype = torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype()
        rng, environ, cwd = torch.get_rng_state(), dict(os.environ), os.getcwd()
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            torch.set_grad_enabled(grad)
            torch.set_default_dtype(dtype)
            torch.set_rng_state(rng)
            if dict(os.environ) != environ:
                os.environ.clear()
                os.environ.update(environ)
            if os.getcwd() != cwd:
                os.chdir(cwd)

    return wrapper


__all__ = ["restores_process_state"]
