"""``adaptwin._C``'s inference entry points (``backends.FAST``, csrc/cpu/python_calls.cpp): `run_rank_linear` and
`attend` call the ops through them for plain inference calls; they must give the op's results, raise the
op's errors, decline (NotImplemented, then the ``torch.ops`` path runs) whatever is not a plain inference
call, and stay visible to dispatch modes and the profiler."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from adaptwin import quant
from adaptwin.ops import attend, backends
from adaptwin.ops import attention as attention_module
from adaptwin.ops.rank_linear import run_rank_linear

pytestmark = pytest.mark.skipif(set(backends.FAST) != {"attention", "rank_linear"},
                                reason="adaptwin._C is not built (run `make install`)")
OP = torch.ops.adaptwin.rank_linear.default


def _factor(fmt: str, w: torch.Tensor) -> tuple:
    if fmt == "fp":
        return w, None, "fp", 0, list(w.shape)
    f = quant.QuantFormat(fmt, 64 if fmt == "nf4" else 0)
    stored = f.quantize(w)
    return stored["qweight"], f.scale(stored), fmt, f.blocksize, list(w.shape)


def _linear_args(rows: int, fmt: str = "nf4", seed: int = 0, n_in: int = 384, rank: int = 40, n_out: int = 448):
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rank, n_in, generator=gen), torch.randn(rank, n_out, generator=gen)
    x = torch.randn(1, rows, n_in, generator=gen)
    return (x, *_factor(fmt, a), *_factor(fmt, b), torch.randn(n_out, generator=gen))


def _attention_args(t: int = 37, s: int = 41):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, n, d, generator=gen) for n, d in ((t, 20), (s, 20), (s, 12)))
    return q, k, v, torch.rand(1, 1, t, s, generator=gen) > 0.2, 0.25, False


@pytest.mark.parametrize("fmt", ["nf4", "int8", "fp"])
@pytest.mark.parametrize("rows", [1, 59])
def test_rank_linear_entry_gives_the_op_result(fmt, rows):
    args = _linear_args(rows, fmt)
    with torch.no_grad():
        out = backends.FAST["rank_linear"](*args)
        assert isinstance(out, torch.Tensor)
        assert torch.equal(out, OP(*args))
        assert torch.equal(run_rank_linear(*args), out)
    with torch.inference_mode():  # tensor shapes given as tuples work too
        args = (*args[:5], tuple(args[5]), *args[6:10], tuple(args[10]), args[11])
        assert torch.equal(backends.FAST["rank_linear"](*args), out)


def test_attention_entry_gives_the_op_result():
    args = _attention_args()
    with torch.no_grad():
        out = backends.FAST["attention"](*args)
        assert torch.equal(out, torch.ops.adaptwin.attention(*args))
        assert torch.equal(attend(*args[:5])[0], out)
        q, k, v = args[:3]  # an int scale and is_causal
        assert torch.equal(backends.FAST["attention"](q, k, v, None, 1, True),
                           torch.ops.adaptwin.attention(q, k, v, None, 1.0, True))


def test_entries_raise_the_ops_errors():
    x = torch.randn(1, 64)
    nf4 = (torch.zeros(8, dtype=torch.uint8), torch.ones(1), "nf3", 64, [4, 64])
    none = (None, None, "fp", 0, [])
    with torch.no_grad():
        with pytest.raises(ValueError, match="'fp', 'nf4', 'int8'"):
            run_rank_linear(x, *nf4, *none, None)
        with pytest.raises(ValueError, match="64 features, factor a expects 32"):
            run_rank_linear(x, *_factor("nf4", torch.randn(4, 32)), *none, None)
        q = torch.randn(1, 2, 3, 8)
        with pytest.raises(ValueError, match="multiple of key heads"):
            backends.FAST["attention"](q, torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8), None, 1.0, False)


class Logged(torch.Tensor):
    """A Tensor subclass that records the __torch_function__ calls it sees."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


class CountingMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_entries_decline_what_is_not_a_plain_inference_call():
    args = _linear_args(1)
    fast = backends.FAST["rank_linear"]
    # a gradient to record: declined, and run_rank_linear records it through the op's autograd
    x = args[0].clone().requires_grad_()
    assert fast(x, *args[1:]) is NotImplemented
    y = run_rank_linear(x, *args[1:])
    assert y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        assert isinstance(fast(x, *args[1:]), torch.Tensor)  # grad mode off: taken
        # a subclass with __torch_function__: declined, and the override sees run_rank_linear's call
        Logged.seen.clear()
        sub = args[0].as_subclass(Logged)
        assert fast(sub, *args[1:]) is NotImplemented
        run_rank_linear(sub, *args[1:])
        assert OP in Logged.seen
        # a __torch_function__ mode: declined, and the mode sees the call
        with CountingMode() as mode:
            assert fast(*args) is NotImplemented
            run_rank_linear(*args)
        assert mode.calls >= 1
        # arguments of other Python types than the schema's: declined (the torch.ops path converts or refuses)
        assert fast(*args[:4], 64.0, *args[5:]) is NotImplemented
        assert fast(*args[:4], True, *args[5:]) is NotImplemented
        assert fast(*args[:5], torch.tensor(args[5]), *args[6:]) is NotImplemented
        assert fast(*args[:-1]) is NotImplemented
        assert fast(*args[:3], b"nf4", *args[4:]) is NotImplemented
        q, k, v, mask, scale, causal = _attention_args()
        assert backends.FAST["attention"](q, k, v, mask, scale, 1) is NotImplemented
        assert backends.FAST["attention"](q, k, v, mask.float().numpy(), scale, causal) is NotImplemented
    qg = q.clone().requires_grad_()
    assert backends.FAST["attention"](qg, k, v, mask, scale, causal) is NotImplemented
    out, _ = attend(qg, k, v, mask, scale)
    assert out.grad_fn is not None


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_fake_tensors_and_the_profiler_see_the_calls():
    args = _linear_args(3)
    qkv = _attention_args()
    with torch.no_grad():
        with OpLog() as log:
            run_rank_linear(*args)
            attend(*qkv[:5])
        assert torch.ops.adaptwin.rank_linear.default in log.ops
        assert torch.ops.adaptwin.attention.default in log.ops
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as fake_mode:
            fake = [fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            out = run_rank_linear(*fake)
        assert out.shape == (1, 3, 448) and type(out).__name__ == "FakeTensor"
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run_rank_linear(*args)
            attend(*qkv[:5])
    names = {e.name for e in prof.events()}
    assert {"adaptwin::rank_linear", "adaptwin::attention"} <= names


def test_attend_keeps_a_swapped_op(monkeypatch):
    """Benchmarks point `attention._run_op` at the reference: the entry point must not bypass that."""
    calls = []

    def reference(*a):
        calls.append(a)
        return attention_module.attention_reference(*a)

    monkeypatch.setattr(attention_module, "_run_op", reference)
    with torch.no_grad():
        attend(*_attention_args()[:5])
    assert len(calls) == 1



def test_entries_decline_other_devices():
    """Meta tensors (as CUDA ones) take the torch.ops path: the fake kernel answers there."""
    args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in _linear_args(2))
    qkv = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in _attention_args())
    with torch.no_grad():
        assert backends.FAST["rank_linear"](*args) is NotImplemented
        assert backends.FAST["attention"](*qkv) is NotImplemented
        assert run_rank_linear(*args).shape == (1, 2, 448)
        assert attend(*qkv[:5])[0].shape == (1, 37, 4, 12)


def test_entries_release_the_gil_safely():
    """The entry points release the GIL around the kernels: calls from several Python threads at once (each
    kernel keeps its scratch buffers per thread) give each thread's own results."""
    import threading

    cases = [(_linear_args(rows, "nf4", seed=s), _attention_args()) for s, rows in enumerate((1, 3, 8, 20))]
    with torch.no_grad():
        expected = [(OP(*lin), torch.ops.adaptwin.attention(*att)) for lin, att in cases]
    errors = []

    def work(i: int) -> None:
        lin, att = cases[i]
        with torch.no_grad():
            for _ in range(50):
                y, a = run_rank_linear(*lin), attend(*att[:5])[0]
                if not (torch.equal(y, expected[i][0]) and torch.equal(a, expected[i][1])):
                    errors.append(i)
                    return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"threads {errors} got other results than alone"
