"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# torch.compile's on-disk kernel cache (/tmp/torchinductor_$USER) is not keyed on ATEN_CPU_CAPABILITY: kernels
# compiled under a cap that emulates another CPU (ATEN_CPU_CAPABILITY=avx2, docs/kernels.md: "CPUs without AVX-512")
# are loaded again without it, and the other way round. Seen on torch 2.13: NaN outputs one way, a corrupted
# heap ("corrupted size vs. prev_size") the other. A capped run compiles into a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_cap_{os.environ['ATEN_CPU_CAPABILITY'].lower()}")


def pytest_collection_modifyitems(config, items):
    """ADAPTWIN_TEST_SHARD="i/n": keep every n-th collected test from the i-th (a child pytest that runs a share of
    the interpreted Triton cases beside another, tests/test_kernels_triton.py)."""
    shard = os.environ.get("ADAPTWIN_TEST_SHARD")
    if not shard:
        return
    try:
        i, n = (int(v) for v in shard.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"ADAPTWIN_TEST_SHARD must be 'i/n' with 0 <= i < n, got {shard!r}") from None
    keep = [item for k, item in enumerate(items) if k % n == i]
    config.hook.pytest_deselected(items=[item for k, item in enumerate(items) if k % n != i])
    items[:] = keep


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread, restored afterwards.

    The test models are tiny (32-wide): a second thread buys nothing, and on a shared 2-core machine its
    OpenMP workers spin-wait for busy cores (a 5-epoch BERT fine-tuning took 17 s with 2 threads vs 0.18 s
    with 1 under load). Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT model folder with its tokenizer files (tests/tiny_cli.py), for the command-line tests."""
    from tiny_cli import save_bert_dir

    return save_bert_dir(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def tk():
    """The Triton launchers, for test_kernels_triton*.py (whose cases run in a TRITON_INTERPRET=1 child)."""
    import adaptwin.kernels.attention
    import adaptwin.kernels.rank_linear

    return {"attention": adaptwin.kernels.attention, "rank_linear": adaptwin.kernels.rank_linear}
