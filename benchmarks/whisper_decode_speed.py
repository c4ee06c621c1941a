"""Whisper greedy decoding on CPU: time per generated token, dense HF model against adaptwin (ratio 0.5).

    python -m benchmarks.whisper_decode_speed [--shapes tiny,base] [--dtypes fp32,bf16] [--tokens 32]
        [--repeats 5] [--providers dense,dense_gemv,adaptwin,adaptwin_sdpa] [--threads 2] [--batch 1]
        [--out results/whisper_decode_speed.csv]

Models are `WhisperForConditionalGeneration` from `WhisperConfig` with random weights (no hub access), the
Whisper tiny / base shapes with the real vocabulary (51865) and a 30 s input (1500 encoder positions).
Each generates exactly the asked number of tokens greedily, with its key/value cache (the end-of-text token
is never chosen: `NoEndOfText`, one indexed fill per step, where ``min_new_tokens`` would add two
vocabulary-wide ``torch.isin`` calls, 0.4 ms per token here, to every provider alike), for ``--batch``
inputs at once (as ``adaptwin eval --batch-size`` transcribes: every decoding step then multiplies that many
rows; its rows carry ``-B<batch>`` in their shape).
Per-token time = (generate with 8 + N new tokens - generate with 8) / N, so the encoder
pass and the first steps cancel; each generate call is timed interleaved with the other providers'.

* ``dense``: the Hugging Face model, ``attn_implementation="sdpa"``.
* ``dense_gemv``: the same with ``adaptwin.gemv_output_head`` and ``adaptwin.gemv_linears``: its decoding
  steps' linear layers, the output head included, run as the CPU kernels' streaming GEMV
  (``torch.ops.adaptwin.rank_linear`` with the weight as its one factor) instead of MKL's sgemv or oneDNN's
  bf16 GEMV, the same function; the like-for-like baseline of ``adaptwin``.
* ``adaptwin``: ``adaptwin.compress(model, CompressionConfig(ratio=0.5, width_multiple=8))`` (encoder and
  decoder) and ``adaptwin.prepare_inference`` (fused activations, contiguous layer inputs, the GEMV head and
  linear layers; the FFN factors of `LowRankLinear` take the GEMV on their own).
  Decoder self- and cross-attention run in rank space with the cache in rank space, through
  ``torch.ops.adaptwin.attention``: the CPU C++ kernel's row path, one query against the cache, read in
  place.
* ``adaptwin_sdpa``: the same compressed model with `attend` calling the op's SDPA reference: what the
  kernel buys. Its scores are the check of the kernel (fp32: relative difference at most 1e-4).
* ``adaptwin_nf4``: ``adaptwin`` with NF4 factors and the token table (and the output head tied to it) in
  NF4 (``quantization="nf4", quantize_embeddings=True``): the factors and the 51865-way head decoded in
  registers by ``torch.ops.adaptwin.rank_linear``: about an eighth of the float32 head's bytes.
* ``dense_int8``: the peer: the dense model with every ``nn.Linear`` (the output head included) replaced by
  torch's dynamically quantised int8 linear (`benchmarks.common.int8_dynamic`); float32 rows only (it takes
  float32 activations).

``MB`` is what each model stores (`benchmarks.common.stored_bytes`: parameters, buffers, packed weights; the
tied token table and head once).

Op-level rows (benchmark ``whisper_decode_attention``): one decoding query per head against S = 448 (the
self-attention cache at its longest) and 1500 keys (cross-attention over a 30 s window), per call, at the
compressed decoder's rank-space widths: ``torch.ops.adaptwin.attention`` (the C++ row path) and its SDPA
reference, against SDPA on the dense heads (d_h = d / heads).

Per-token time includes what does not shrink with the ranks: the token embedding and the 51865-way output
projection (d x 51865 multiply-adds per token, 19.9 M for tiny), layer norms, and Python and dispatch
overhead per layer.
"""

from __future__ import annotations

import argparse
import copy
import sys
from functools import partial

import torch
import transformers
from transformers import LogitsProcessor, LogitsProcessorList, WhisperConfig, WhisperForConditionalGeneration

import adaptwin
from benchmarks.common import (
    device_string,
    format_table,
    int8_dynamic,
    now_utc,
    runs_in,
    stored_bytes,
    time_interleaved,
    versions,
    write_rows,
)
from benchmarks.whisper_encoder_speed import (
    DTYPES,
    SHAPES,
    WIDTH_MULTIPLE,
    EncoderShape,
    add_model_args,
    picked_models,
    reference_ops,
)

BENCHMARK = "whisper_decode_speed"
PROVIDERS = ("dense", "dense_gemv", "adaptwin", "adaptwin_sdpa", "adaptwin_nf4", "dense_int8")
PROMPT_TOKENS = 8  # new tokens of the shorter generate call, subtracted out
REL_TOL_FP32 = 1e-4  # adaptwin against adaptwin_sdpa: the same factors, two attention kernels
FIELDS = ("benchmark", "shape", "dtype", "provider", "ms_per_token", "us_per_call", "ratio", "generate_ms", "tokens",
          "repeats", "rel_err", "weight_mb", "device", "threads", "torch", "transformers", "adaptwin", "timestamp")
CALLS = 200  # attention calls per timed sample of the op-level rows
KEY = ("benchmark", "shape", "dtype", "provider")


def build_models(shape: EncoderShape, seed: int = 0, ratio: float = 0.5, int8: bool = True
                 ) -> dict[str, torch.nn.Module]:
    """fp32 models of every provider (``dense_int8`` only with ``int8``), in eval mode."""
    torch.manual_seed(seed)
    config = WhisperConfig(
        d_model=shape.d_model, encoder_layers=shape.layers, decoder_layers=shape.layers,
        encoder_attention_heads=shape.heads, decoder_attention_heads=shape.heads, encoder_ffn_dim=shape.ffn,
        decoder_ffn_dim=shape.ffn, num_mel_bins=shape.mel_bins, max_source_positions=shape.positions,
        begin_suppress_tokens=None, suppress_tokens=None, attn_implementation="sdpa",
    )
    dense = WhisperForConditionalGeneration(config).eval()
    small = adaptwin.compress(dense, adaptwin.CompressionConfig(ratio=ratio, width_multiple=WIDTH_MULTIPLE))
    packed = adaptwin.compress(dense, adaptwin.CompressionConfig(
        ratio=ratio, width_multiple=WIDTH_MULTIPLE, quantization="nf4", quantize_embeddings=True))
    for m in (small, packed):
        adaptwin.prepare_inference(m)
    dense_gemv = copy.deepcopy(dense)
    adaptwin.gemv_output_head(dense_gemv)
    adaptwin.gemv_linears(dense_gemv)
    models = {"dense": dense, "dense_gemv": dense_gemv, "adaptwin": small, "adaptwin_sdpa": small,
              "adaptwin_nf4": packed}
    return {**models, "dense_int8": int8_dynamic(dense)} if int8 else models


class NoEndOfText(LogitsProcessor):
    """Sets the end-of-text tokens' scores to -inf, so that generation runs to ``max_new_tokens``."""

    def __init__(self, eos: int | list[int] | None) -> None:
        if eos is None:
            raise ValueError("the model's generation_config has no eos_token_id to block")
        self.ids = torch.tensor(eos).flatten()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(-1, self.ids.to(scores.device), float("-inf"))


def generate(model: torch.nn.Module, features: torch.Tensor, tokens: int, reference: bool = False):
    """Greedy generation of exactly ``tokens`` new tokens, scores kept."""
    with torch.inference_mode():
        if reference:
            with reference_ops():
                return generate(model, features, tokens)
        blocked = LogitsProcessorList([NoEndOfText(model.generation_config.eos_token_id)])
        return model.generate(features, max_new_tokens=tokens, do_sample=False, num_beams=1,
                              logits_processor=blocked, output_scores=True, return_dict_in_generate=True)


def time_attention(shape: EncoderShape, model: torch.nn.Module, dtype: torch.dtype, dname: str,
                   repeats: int) -> list[dict]:
    """Per-call microseconds of one decoding query against the cache, op against SDPA (see the docstring)."""
    from adaptwin.compressors.product_twin.layer import TwinAttention
    from adaptwin.ops import attention
    from adaptwin.ops.backends import call_without_autograd

    twin = next(m for m in model.model.decoder.modules() if isinstance(m, TwinAttention))
    heads, wq, wv, dh = twin.num_heads, twin.qk_width, twin.v_width, shape.d_model // shape.heads
    gen = torch.Generator().manual_seed(3)
    rows = []
    for keys in (448, 1500):
        q, k, v = (torch.randn(1, heads, n, w, generator=gen).to(dtype) for n, w in ((1, wq), (keys, wq), (keys, wv)))
        qd, kd = (torch.randn(1, heads, n, dh, generator=gen).to(dtype) for n in (1, keys))
        fns = {"sdpa_dense": partial(torch.nn.functional.scaled_dot_product_attention, qd, kd, kd),
               "adaptwin_op": partial(call_without_autograd, torch.ops.adaptwin.attention.default, q, k, v, None,
                                      wq ** -0.5, False),
               "adaptwin_op_sdpa": partial(attention.attention_reference, q, k, v, None, wq ** -0.5, False)}
        with torch.inference_mode():
            timings = time_interleaved({n: (lambda f=f: [f() for _ in range(CALLS)]) for n, f in fns.items()},
                                       repeats=repeats, warmup=1)
        base = timings["sdpa_dense"].p50
        for name, t in timings.items():
            rows.append({"benchmark": "whisper_decode_attention", "dtype": dname, "provider": name,
                         "shape": f"{shape.name}:H{heads}-T1-S{keys}-w{dh if name == 'sdpa_dense' else wq}",
                         "us_per_call": t.p50 / CALLS * 1e3, "ratio": t.p50 / base, "repeats": repeats})  # p50: ms
    return rows


def run_shape(shape: EncoderShape, dtypes: list[str], providers: list[str], tokens: int, repeats: int,
              seed: int = 0, batch: int = 1) -> list[dict]:
    models = build_models(shape, seed, int8="dense_int8" in providers)
    gen = torch.Generator().manual_seed(seed + 1)
    features = torch.randn(batch, shape.mel_bins, shape.frames, generator=gen)
    label = shape.label() + (f"-B{batch}" if batch > 1 else "")
    rows = []
    device, vers, threads = device_string(), versions(), torch.get_num_threads()
    for dname in dtypes:
        dtype = DTYPES[dname]
        here = [p for p in providers if runs_in(p, dname)]
        typed = {name: copy.deepcopy(m).to(dtype) for name, m in models.items()
                 if name != "adaptwin_sdpa" and runs_in(name, dname)}
        typed["adaptwin_sdpa"] = typed["adaptwin"]
        x = features.to(dtype)
        err = None
        if "adaptwin" in providers and "adaptwin_sdpa" in providers:
            ours = torch.stack(generate(typed["adaptwin"], x, tokens).scores).float()
            ref = torch.stack(generate(typed["adaptwin_sdpa"], x, tokens, reference=True).scores).float()
            finite = torch.isfinite(ref)
            err = ((ours - ref)[finite].norm() / ref[finite].norm()).item()
            if dname == "fp32" and not err <= REL_TOL_FP32:
                raise RuntimeError(f"{shape.name}: adaptwin's decoding scores differ from the SDPA reference ops' by "
                                   f"{err:.2e} relative (> {REL_TOL_FP32:.0e}); the attention kernel is wrong")
        calls = {}
        for p in here:
            for n in (PROMPT_TOKENS, PROMPT_TOKENS + tokens):
                calls[f"{p}/{n}"] = (lambda m=typed[p], x=x, n=n, r=p == "adaptwin_sdpa": generate(m, x, n, r))
        timings = time_interleaved(calls, repeats=repeats, warmup=1)
        per_token = {p: (timings[f"{p}/{PROMPT_TOKENS + tokens}"].p50 - timings[f"{p}/{PROMPT_TOKENS}"].p50) / tokens
                     for p in here}
        noisy = [p for p in here if not per_token[p] > 0]
        if noisy:  # the longer call was not slower: its extra tokens cost less than the timing noise
            print(f"warning: {shape.name} {dname}: per-token time <= 0 for {noisy} (the {tokens} extra tokens took "
                  f"less than the timing noise); raise --tokens or --repeats", file=sys.stderr)
        for p in here:
            rows.append({
                "benchmark": BENCHMARK, "shape": label, "dtype": dname, "provider": p,
                "ms_per_token": per_token[p], "tokens": tokens, "repeats": repeats,
                "weight_mb": stored_bytes(typed[p]) / 1e6,
                "ratio": per_token[p] / per_token["dense"],
                "generate_ms": timings[f"{p}/{PROMPT_TOKENS + tokens}"].p50,
                "rel_err": err if p in ("adaptwin", "adaptwin_sdpa") else None, "device": device, "threads": threads,
                **vers, "timestamp": now_utc(),
            })
        if batch == 1:  # the op-level rows are per call, whatever the batch
            rows += [{**r, "device": device, "threads": threads, **vers, "timestamp": now_utc()}
                     for r in time_attention(shape, typed["adaptwin"], dtype, dname, repeats)]
        del typed
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, PROVIDERS)
    ap.add_argument("--tokens", type=int, default=32, help="timed new tokens per call (beyond the first 8)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per provider and length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="inputs decoded together (rows per decoding step)")
    ap.add_argument("--out", default="results/whisper_decode_speed.csv")
    args = ap.parse_args(argv)
    shapes, dtypes, providers = picked_models(ap, args, PROVIDERS)
    if not 1 <= args.tokens <= 400 or args.repeats < 1:
        ap.error(f"--tokens must be 1..400 (Whisper's decoder holds 448 positions) and --repeats >= 1, got "
                 f"{args.tokens} and {args.repeats}")
    if not 1 <= args.batch <= 64:
        ap.error(f"--batch must be 1..64, got {args.batch}")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # generate's notes on max_length / min_length, once per call
    print(f"{device_string()}, torch {torch.__version__}")
    rows: list[dict] = []
    for name in shapes:
        shape = SHAPES[name]
        print(f"timing {shape.label()} ({', '.join(dtypes)}; batch {args.batch}, {args.tokens} tokens, "
              f"{args.repeats} repeats)...", flush=True)
        rows += run_shape(shape, dtypes, providers, args.tokens, args.repeats, batch=args.batch)
    tokens_rows = [r for r in rows if r["benchmark"] == BENCHMARK]
    print(format_table(["shape", "dtype", "provider", "ms/token", "vs dense", "MB", "rel err"],
                       [[r["shape"].split(":")[0], r["dtype"], r["provider"], f"{r['ms_per_token']:.2f}",
                         f"{r['ratio']:.3f}x", f"{r['weight_mb']:.1f}",
                         "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"]
                        for r in tokens_rows]))
    print("\nrel err: adaptwin's generate scores against the same model on the op's SDPA reference.\n")
    print(format_table(["attention call", "dtype", "provider", "us/call", "vs dense SDPA"],
                       [[r["shape"], r["dtype"], r["provider"], f"{r['us_per_call']:.1f}", f"{r['ratio']:.3f}x"]
                        for r in rows if r["benchmark"] != BENCHMARK]))
    path = write_rows(args.out, rows, fields=FIELDS, key=KEY)
    print(f"\nwrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
