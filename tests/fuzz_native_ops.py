"""Random-shape fuzz of adaptwin's native CPU ops against the library's pure-PyTorch references.

usage: python tests/fuzz_native_ops.py N_RANK_LINEAR N_ATTENTION N_OTHER SEED

Not a pytest module: `make sanitize` runs it under AddressSanitizer and UndefinedBehaviorSanitizer against an
instrumented build (``ADAPTWIN_SANITIZE=1``), under every CPU cap, beside the op tests. Shapes of 0 and 1,
strided / offset / transposed / expanded operands, fp32 / bf16 / fp16 / fp64, fp / NF4 / int8 factors with
blocksizes up to 2^62, masks of rank 0-4, causal and grouped-query attention, kept calls and malformed kept
tuples. Prints a summary; exits 1 on any mismatch with the reference.
"""
import math
import os
import random
import sys
import traceback

import torch

import adaptwin
import adaptwin.ops  # noqa: F401  (loads adaptwin._C)
from adaptwin import quant
from adaptwin.ops.attention import attention_reference
from adaptwin.ops.backends import FAST, cpu_features, load
from adaptwin.ops.rank_linear import dequantize_factor, rank_linear_reference

N_RL = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
N_AT = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
N_OT = int(sys.argv[3]) if len(sys.argv) > 3 else 300
SEED = int(sys.argv[4]) if len(sys.argv) > 4 else 0
R = random.Random(SEED)
torch.manual_seed(SEED)

assert load()["cpp"], load()
print("cap", os.environ.get("ADAPTWIN_CPU_CAP", "native"), cpu_features(), adaptwin._C.__file__, flush=True)

OP_RL = torch.ops.adaptwin.rank_linear.default
OP_AT = torch.ops.adaptwin.attention.default
FAILS = []
COUNTS = {}


def count(name):
    COUNTS[name] = COUNTS.get(name, 0) + 1


def fail(kind, desc, err):
    FAILS.append((kind, desc, err))
    print(f"MISMATCH {kind}: {err}\n   case: {desc}", flush=True)


def odd_layout(t, p=0.35):
    """t's values in a non-contiguous tensor (strided / offset / transposed copy), sometimes."""
    if R.random() > p or t.dim() == 0:
        return t, "contig"
    kind = R.choice(["step", "offset", "transpose"] if t.dim() >= 2 else ["step", "offset"])
    if kind == "step":  # every other element along the last dim
        big = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2], "step"
    if kind == "offset":
        flat = torch.empty(t.numel() + 3, dtype=t.dtype)
        flat[3:] = t.reshape(-1)
        return flat[3:].view(t.shape), "offset"
    return t.transpose(-1, -2).contiguous().transpose(-1, -2), "transpose"


SIZES_IN = [0, 1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 96, 127, 128, 130, 192, 256, 384, 513, 520, 1030]
SIZES_K = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 31, 32, 33, 64, 96, 100]
FP_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def rand_x_rows():
    c = R.random()
    if c < 0.45:
        return [1] * R.randint(1, 3)
    if c < 0.7:
        return [R.choice([0, 1, 2, 3, 5, 8])] + ([R.randint(1, 2)] if R.random() < 0.3 else [])
    if c < 0.9:
        return [R.choice([9, 12, 16, 17, 24, 31, 32, 33])]
    return [R.choice([2, 3]), R.choice([20, 40])]


def make_factor(k, n, fmt):
    """(data, scale, blocksize, desc) of a (k, n) factor."""
    numel = k * n
    if fmt == "fp":
        dt = R.choice(FP_DTYPES)
        w = (torch.randn(k, n) / math.sqrt(max(n, 1))).to(dt)
        w, lay = odd_layout(w)
        if R.random() < 0.05 and k > 0 and n > 0:  # expanded rows (stride 0)
            w = w[:1].expand(k, n)
            lay = "expand"
        return w, None, R.choice([0, 64]), f"fp {dt} {lay}"
    if fmt == "nf4":
        bs = R.choice([2, 4, 6, 8, 16, 32, 64, 64, 64, 96, 128, 256, 1 << 40, 1 << 62])
        data = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8)
        blocks = -(-numel // bs)
        scale = torch.rand(blocks) + 0.05
        data, lay = odd_layout(data, 0.2)
        sdt = R.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16])
        scale = scale.to(sdt)
        scale, slay = odd_layout(scale, 0.2)
        return data, scale, bs, f"nf4 bs{bs} {lay} scale {sdt} {slay}"
    bs = R.choice([0, 0, 1, 5, 16, 32, 64, 64, 96, 128, 1 << 40, (1 << 63) - 1])
    data = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    groups = k if bs == 0 else -(-numel // bs)
    scale = torch.rand(groups) * 0.02 + 0.001
    data, lay = odd_layout(data, 0.2)
    sdt = R.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16])
    scale = scale.to(sdt)
    scale, slay = odd_layout(scale, 0.2)
    return data, scale, bs, f"int8 bs{bs} {lay} scale {sdt} {slay}"


def dense(data, scale, fmt, bs, k, n):
    if data is None:
        return None
    if fmt == "fp":
        return data.double()
    return quant.dequantize(data.contiguous(), scale.float().contiguous(), fmt, bs, (k, n)).double()


TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2.5e-2, torch.float16: 4e-3}


def rank_linear_case(i):
    in_f = R.choice(SIZES_IN)
    if R.random() < 0.3:  # aligned shapes the fused kernels take
        in_f = R.choice([32, 64, 96, 128, 192, 256, 384])
    has_a, has_b = R.choice([(True, True), (True, True), (True, False), (False, True)])
    k = R.choice(SIZES_K) if has_a else in_f
    out_f = R.choice(SIZES_IN) if has_b else k
    if has_b and R.random() < 0.3:
        out_f = R.choice([32, 64, 96, 128, 192, 256, 384])
    xdt = R.choice(FP_DTYPES + [torch.float32, torch.bfloat16])
    lead = rand_x_rows()
    x = torch.randn(*lead, in_f).to(xdt)
    x, xlay = odd_layout(x)
    if R.random() < 0.05 and x.numel() > 0 and x.dim() >= 2 and x.shape[0] > 1:
        x = x[:1].expand(*x.shape)
        xlay = "expand"
    args = []
    desc = [f"x {tuple(x.shape)} {xdt} {xlay}"]

    def factor(present: bool, name: str, n: int):
        """Append one factor's five arguments (absent: None) and return it dense, or None."""
        if not present:
            args.extend([None, None, "fp", 0, [0, 0]])
            return None
        fmt = R.choice(["fp", "nf4", "int8"])
        data, scale, bs, d = make_factor(k, n, fmt)
        args.extend([data, scale, fmt, bs, [k, n]])
        desc.append(f"{name} ({k},{n}) {d}")
        return dense(data, scale, fmt, bs, k, n)

    A = factor(has_a, "a", in_f)
    Bm = factor(has_b, "b", out_f)
    bias = None
    if R.random() < 0.5:
        bdt = R.choice(FP_DTYPES)
        bias = torch.randn(out_f).to(bdt)
        bias, blay = odd_layout(bias, 0.5)
        if R.random() < 0.1 and out_f > 0:
            bias = bias[:1].expand(out_f)
            blay = "expand"
        desc.append(f"bias {bdt} {blay}")
    desc = "; ".join(desc)
    count("rank_linear")
    ref = rank_linear_reference(x, *args, bias)
    # magnitude bound for the tolerance
    xa = x.double().abs()
    hm = xa if A is None else xa @ A.abs().t()
    mag = hm if Bm is None else hm @ Bm.abs()
    if bias is not None:
        mag = mag + bias.double().abs()
    tol = TOL[xdt] * (mag + 1e-6) + (1e-6 if xdt != torch.float64 else 1e-12)
    if xdt in (torch.bfloat16, torch.float16):
        tol = tol + TOL[xdt] * ref.double().abs()
    outs = {}
    with torch.no_grad():
        outs["op"] = OP_RL(x, *args, bias)
        y = FAST["rank_linear"](x, *args, bias)
        if y is not NotImplemented:
            outs["fast"] = y
    for name, y in outs.items():
        if y.shape != ref.shape or y.dtype != ref.dtype:
            fail("rank_linear", desc,
                 f"{name}: shape/dtype {tuple(y.shape)} {y.dtype} vs {tuple(ref.shape)} {ref.dtype}")
            continue
        err = (y.double() - ref.double()).abs()
        bad = err > tol
        if bad.any():
            j = bad.nonzero()[0].tolist()
            fail("rank_linear", desc, f"{name}: max err {err.max().item():.3g} at {j}: got {y[tuple(j)].item()} "
                 f"ref {ref[tuple(j)].item()} tol {tol[tuple(j)].item():.3g}")
        if y.data_ptr() == x.data_ptr() and y.numel() > 0:
            fail("rank_linear", desc, f"{name}: output aliases x")
    # dequantize_factor on the factors (with and without out)
    for name, fac in (("a", args[0:5]), ("b", args[5:10])):
        if fac[0] is None:
            continue
        kk, nn = fac[4]
        w = dequantize_factor(*fac)
        ref_w = dense(fac[0], fac[1], fac[2], fac[3], kk, nn).float()
        if not torch.equal(w, ref_w) and not torch.allclose(w, ref_w, rtol=1e-6, atol=1e-7):
            fail("dequantize", desc, f"{name}: max err {(w - ref_w).abs().max().item()}")
        count("dequantize")
        if kk > 0:
            divs = [g for g in range(1, kk + 1) if kk % g == 0]
            g = R.choice(divs)
            stride = g + R.choice([0, 0, 1, 3])
            need = kk // g * stride * nn
            out = torch.full((need + R.choice([0, 0, 5]),), -7.0)
            res = dequantize_factor(*fac, out=out, group=g, stride=stride)
            exp = torch.full_like(out, -7.0)
            exp[:need].view(kk // g, stride, nn)[:, :g] = ref_w.view(kk // g, g, nn)
            if not torch.allclose(res, exp, rtol=1e-6, atol=1e-7):
                fail("dequantize_out", desc + f" group {g} stride {stride}", "mismatch")
            count("dequantize_out")


def rand_mask(B, H, T, S):
    c = R.random()
    if c < 0.3:
        return None, "none"
    target = [B, H, T, S]
    nd = R.randint(0, 4)
    shape = [R.choice([1, target[4 - nd + d]]) if R.random() < 0.5 else target[4 - nd + d] for d in range(nd)]
    dt = R.choice([torch.bool, torch.bool, torch.float32, torch.bfloat16, torch.float16, torch.float64])
    if dt == torch.bool:
        m = torch.rand(shape) < 0.8
    else:
        r = torch.rand(shape)
        m = torch.where(r < 0.15, torch.tensor(float("-inf")), torch.randn(shape)).to(dt)
        if R.random() < 0.1:
            m = torch.where(r < 0.5, torch.tensor(torch.finfo(torch.float32).min), torch.zeros(shape)).to(dt)
    m, lay = odd_layout(m, 0.4)
    if R.random() < 0.15 and nd >= 2:  # unit last stride, other dims strided (a slice of a bigger mask)
        big = torch.zeros(*shape[:-2], shape[-2] * 3, shape[-1] + 5, dtype=m.dtype)
        big[..., ::3, 2:2 + shape[-1]] = m
        m = big[..., ::3, 2:2 + shape[-1]]
        lay = "rowslice"
    if R.random() < 0.1 and nd >= 1 and m.numel() > 0:  # stride-0 broadcast given as an expanded tensor
        sl = tuple([slice(None)] * (nd - 1) + [slice(0, 1)])
        m = m[sl].expand(*shape)
        lay = "expand"
    return m, f"{tuple(shape)} {dt} {lay}"


def attention_case(i):
    B = R.choice([0, 1, 1, 1, 2, 3])
    Hkv = R.choice([1, 1, 2, 3])
    H = Hkv * R.choice([1, 1, 2, 3])
    T = R.choice([0, 1, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 40, 65])
    S = R.choice([0, 1, 2, 3, 7, 8, 15, 16, 17, 63, 64, 65, 100, 255, 256, 257, 300])
    Dq = R.choice([0, 1, 2, 3, 8, 15, 16, 17, 20, 26, 32, 33, 40, 52, 64, 65, 80])
    Dv = Dq if R.random() < 0.5 else R.choice([0, 1, 2, 3, 8, 15, 16, 17, 20, 26, 32, 33, 40, 64, 65])
    dt = R.choice([torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, torch.float16, torch.float64])
    causal = R.random() < 0.3
    if R.random() < 0.5:  # (B, T, H, D) projections viewed as (B, H, T, D): the common layout
        q = torch.randn(B, T, H, Dq).to(dt).transpose(1, 2)
        k = torch.randn(B, S, Hkv, Dq).to(dt).transpose(1, 2)
        v = torch.randn(B, S, Hkv, Dv).to(dt).transpose(1, 2)
        lay = "bthd"
    else:
        q, lq = odd_layout(torch.randn(B, H, T, Dq).to(dt))
        k, lk = odd_layout(torch.randn(B, Hkv, S, Dq).to(dt))
        v, lv = odd_layout(torch.randn(B, Hkv, S, Dv).to(dt))
        lay = f"{lq}/{lk}/{lv}"
    if R.random() < 0.05 and S > 1:  # expanded keys / values (stride 0 along S)
        k = k[:, :, :1].expand(B, Hkv, S, Dq)
        v = v[:, :, :1].expand(B, Hkv, S, Dv)
        lay += " kv-expand"
    mask, mdesc = rand_mask(B, H, T, S)
    scale = R.choice([1.0 / math.sqrt(max(Dq, 1)), 0.5, 1.0, 0.0, 3.0])
    if scale == 0.0 and causal:  # SDPA (the reference) gives NaN rows for is_causal with scale 0; the kernels do not
        scale = 1e-3
    desc = f"B{B} H{H} Hkv{Hkv} T{T} S{S} Dq{Dq} Dv{Dv} {dt} {lay} causal={causal} mask {mdesc} scale {scale}"
    count("attention")
    ref = attention_reference(q, k, v, mask, scale, causal)
    with torch.no_grad():
        outs = {"op": OP_AT(q, k, v, mask, scale, causal)}
        y = FAST["attention"](q, k, v, mask, float(scale), causal)
        if y is not NotImplemented:
            outs["fast"] = y
    vmax = v.double().abs().max().item() if v.numel() else 1.0
    tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 4e-2, torch.float16: 5e-3}[dt] * max(vmax, 1.0)
    for name, y in outs.items():
        if y.shape != ref.shape or y.dtype != ref.dtype:
            fail("attention", desc, f"{name}: shape/dtype {tuple(y.shape)} {y.dtype} vs {tuple(ref.shape)} {ref.dtype}")
            continue
        yd, rd = y.double(), ref.double()
        nan_mismatch = (yd.isnan() != rd.isnan())
        err = (yd - rd).abs().nan_to_num(0.0)
        if nan_mismatch.any() or (err > tol).any():
            fail("attention", desc, f"{name}: max err {err.max().item():.3g} (tol {tol:.3g}) nan mismatches "
                 f"{int(nan_mismatch.sum())}")


def gelu_case(i):
    n = R.choice([0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1000, 4097, 32768, 32769])
    dt = R.choice([torch.float32, torch.bfloat16])
    x = (torch.randn(n) * R.choice([1.0, 5.0, 100.0])).to(dt)
    if R.random() < 0.2 and n > 2:
        x[0] = float("nan")
        x[1] = float("inf")
        x[2] = float("-inf")
    shape = R.choice([(n,), (1, n), (1, 1, n)])
    x = x.view(shape)
    if R.random() < 0.2:  # an offset view
        flat = torch.empty(n + 5, dtype=dt)
        flat[5:] = x.reshape(-1)
        x = flat[5:].view(shape)
    ref = torch.nn.functional.gelu(x.float()).to(dt)
    src = x.clone()
    y = x.clone() if R.random() < 0.5 else x
    count("gelu")
    with torch.no_grad():
        r = FAST["gelu_"](y)
    if r is NotImplemented:
        return
    if r is not y:
        fail("gelu", f"n{n} {dt}", "not returned in place")
    tol = 2e-6 if dt == torch.float32 else 1e-2
    err = (r.double() - ref.double()).abs()
    # (non-finite inputs not compared: torch's CPU gelu gives NaN for +inf, this kernel inf)
    ok = (err <= tol * (1 + ref.double().abs())) | (r.isnan() & ref.isnan()) | (r == ref) | ~src.isfinite()
    if not ok.all():
        fail("gelu", f"n{n} {dt} {shape}", f"max err {err.nan_to_num(0).max().item()}")


def kept_case(i):
    """A kept call built by hand (the layouts KeptCall builds), against the reference op calls."""
    kind = R.choice(["none", "add", "in", "out"])
    n = R.randint(1, 4)
    blocks = R.choice([1, 1, 2, 3])
    in_f = R.choice([8, 32, 64, 96])
    widths = [R.choice([1, 3, 8, 16, 32]) for _ in range(n)]
    xdt = R.choice([torch.float32, torch.float32, torch.bfloat16])
    calls = []
    if kind == "out":
        x_width = blocks * sum(widths)
    else:
        x_width = in_f
    x = torch.randn(1, R.choice([1, 2]), x_width).to(xdt)
    if R.random() < 0.3:
        x, _ = odd_layout(x, 1.0)
    common_out = R.choice([16, 32, 64])
    for c in range(n):
        if kind == "in":
            out_w = blocks * widths[c]
            cin = in_f
        elif kind == "out":
            cin = blocks * widths[c]
            out_w = common_out
        else:
            cin = in_f
            out_w = common_out
        k = R.choice([4, 8, 16, 32])
        fa = R.choice(["fp", "nf4", "int8"])
        fb = R.choice(["fp", "nf4", "int8"])
        a, sa, bsa, _ = make_factor(k, cin, fa)
        b, sb, bsb, _ = make_factor(k, out_w, fb)
        if fa == "fp":
            a = a.to(xdt)
        if fb == "fp":
            b = b.to(xdt)
        bias = torch.randn(out_w).to(xdt) if R.random() < 0.3 else None
        args = (a, sa, fa, bsa, [k, cin], b, sb, fb, bsb, [k, out_w], bias)
        calls.append((out_w, args))
    sources = ()
    call_tuple = tuple(a for _, a in calls)
    lbias = None
    if kind == "none":
        layout = None
    elif kind == "add":
        alphas = tuple([1.0] + [R.choice([1.0, 0.5, -2.0]) for _ in range(n - 1)])
        layout = ("add", 1, alphas, None)
    elif kind == "in":
        lbias = torch.randn(blocks * sum(widths)).to(xdt) if R.random() < 0.5 else None
        layout = ("in", blocks, tuple(widths), lbias)
    else:
        layout = ("out", blocks, tuple(widths), None)
    kept = (1 << 20, sources, call_tuple, layout)
    if R.random() < 0.5:
        cap = FAST["parse_rank_linear_kept"](kept)
        if cap is not NotImplemented:
            kept = kept + (cap,)
    count("kept")
    with torch.no_grad():
        y = FAST["rank_linear_kept"](x, kept)
    if y is NotImplemented:
        count("kept_notimpl")
        return
    # reference
    rows = x.shape[:-1]
    if kind in ("none", "add"):
        ref = None
        for c, (_, args) in enumerate(calls):
            part = rank_linear_reference(x, *args)
            alpha = 1.0 if kind == "none" else layout[2][c]
            ref = part if ref is None else ref.add(part, alpha=alpha)
    elif kind == "in":
        parts = [rank_linear_reference(x, *args).view(*rows, blocks, w) for (_, args), w in zip(calls, widths)]
        ref = torch.cat(parts, dim=-1).reshape(*rows, blocks * sum(widths))
        if lbias is not None:
            ref = ref + lbias
    else:
        xb = x.reshape(*rows, blocks, sum(widths))
        ref = None
        at = 0
        for (_, args), w in zip(calls, widths):
            xi = xb[..., at:at + w].reshape(*rows, blocks * w)
            at += w
            part = rank_linear_reference(xi, *args)
            ref = part if ref is None else ref + part
    tol = 5e-2 if xdt == torch.bfloat16 else 1e-3
    atol = tol * (1 + ref.double().abs().max().item())
    if y.shape != ref.shape or not torch.allclose(y.double(), ref.double(), rtol=tol, atol=atol):
        fail("kept", f"{kind} n{n} blocks{blocks} widths{widths} {xdt} x{tuple(x.shape)}",
             f"shape {tuple(y.shape)} vs {tuple(ref.shape)}; max err "
             f"{(y.double() - ref.double()).abs().max().item() if y.shape == ref.shape else 'n/a'}")


def bad_kept_case(i):
    """Malformed kept tuples: must answer NotImplemented or raise, never crash."""
    a = torch.randn(8, 16)
    b = torch.randn(8, 32)
    call = (a, None, "fp", 0, [8, 16], b, None, "fp", 0, [8, 32], None)
    big = R.choice([1 << 62, (1 << 63) - 1, 1 << 40, 3, -1])
    variants = [
        (big, (), (call,), None),
        (1, (), (call,), ("in", big, (big,), None)),
        (1, (), (call,), ("in", 2, (big, big), None)),
        (1, (), (call, call), ("out", big, (big, big), None)),
        (1, (), (call,), ("add", 1, (1.0,), None)),
        (1, (), (), None),
        (1, (({}, "w", None, None),), (call,), None),
    ]
    kept = R.choice(variants)
    x = torch.randn(R.choice([1, 2, 0]), 16)
    count("bad_kept")
    try:
        FAST["rank_linear_kept"](x, kept)
    except Exception:
        pass


def main():
    cases = [("rank_linear", rank_linear_case, N_RL), ("attention", attention_case, N_AT),
             ("gelu", gelu_case, N_OT), ("kept", kept_case, N_OT), ("bad_kept", bad_kept_case, N_OT // 3)]
    threads = [1, 2]
    for name, fn, n in cases:
        for i in range(n):
            torch.set_num_threads(threads[i % 2])
            try:
                fn(i)
            except Exception as e:  # the reference or the op refused: a mismatch only if one refused alone
                if name == "bad_kept":
                    continue
                fail(name, f"case {i} (seed {SEED})", "exception: " + "".join(
                    traceback.format_exception_only(type(e), e)).strip()[:400])
        print(f"{name}: {n} cases done, fails so far {len(FAILS)}", flush=True)
    print("COUNTS", COUNTS)
    print("FAILS", len(FAILS))
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
