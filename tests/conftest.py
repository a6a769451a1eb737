"""What every test shares: one torch thread per test process, the real images of ../shared/data (a test
that needs them is skipped, saying so, where they are missing), and the `slow` mark.

`slow` marks the heavy end-to-end tests: torchrun, sweeps through Hydra's plugins, benchmark scripts,
the command line in a subprocess. `make test` (the README's test command, which CI runs) runs every
test; `make test-fast` skips these for the edit loop.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Two torch threads per test on a shared 2-core machine oversubscribe it (up to 10x slower, worse
    with a parallel test worker beside); runs compared with each other all use this same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_data(name: str) -> Path:
    """../shared/data/<name> (ImageFolder layout), or skip the test that needs it."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"needs the real images in {path} (the shared data beside the checkout)")
    return path


@pytest.fixture(autouse=True)
def logging_as_it_was():
    """An in-process `finetune train` sets Hydra's job logging up (handlers on the stderr pytest captures
    for that test): each test gets the loggers back as they were, so no later test logs to a closed stream."""
    import logging

    loggers = [logging.getLogger(), logging.getLogger("finetune")]
    saved = [(logger, list(logger.handlers), logger.level) for logger in loggers]
    yield
    for logger, handlers, level in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)


@pytest.fixture(autouse=True)
def own_probe_store(tmp_path_factory, monkeypatch):
    """auto keeps its probes under $XDG_CACHE_HOME (auto.reuse): each test gets an empty one of its own, so
    no test skips a probe because another (or the user's own runs) stored it; subprocesses inherit it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
