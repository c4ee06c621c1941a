"""``adaptwin compress``: its flags, and the run from a model folder to a save directory.

    adaptwin compress MODEL_DIR --out DIR --ratio 0.45
    adaptwin compress MODEL_DIR --out DIR --ratio 0.45 --calib DATA --epochs 40 [--keep-size 0.6]
    torchrun --nproc-per-node N -m adaptwin compress ...      (fine-tuned layers spread over N ranks)

Bad flags fail in milliseconds, before the model is loaded; `adaptwin.cli.main` turns the errors into one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from adaptwin._files import remove_dead_temps, temp_prefix
from adaptwin.flags import _csv, _site_kinds, parse_method_option, parse_override
from adaptwin.inspection import RANK_FLAGS as _RANK_FLAGS
from adaptwin.inspection import _fmt_bytes, _fmt_int, _table
from adaptwin.progress import EpochProgress
from adaptwin.sources import (
    DEFAULT_MAX_LENGTH,
    UsageError,
    calibration_for,
    check_out_dir,
    check_run_dir_flag,
    extra_files,
    hub_extra_files,
    is_speech_set,
    load_model,
    note,
    read_calibration_text,
    read_speech_set,
    resolve_model,
)

# Flags that are FinetuneConfig fields of the same name; None (not given) keeps the config's default.
_FINETUNE_FIELDS = ("epochs", "lr", "mode", "init", "sequential", "holdout", "patience", "storage",
                    "storage_dtype", "run_dir")
_CALIB_ONLY = (*_FINETUNE_FIELDS, "batch_size", "max_length", "keep_size", "max_error", "calib_speaker")
DEFAULT_BATCH_SIZE = 16


# ---------------------------------------------------------------------------------------------- parsing


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``compress`` sub-command to the ``adaptwin`` parser."""
    from adaptwin.finetune.config import INITS, MODES, STORAGE_DTYPES, STORAGES, FinetuneConfig

    d = FinetuneConfig()  # the defaults the help names

    c = sub.add_parser("compress", help="compress a model folder (or hub id) and save it",
                       description="Compress a Hugging Face model and save weights, config and tokenizer files.")
    c.add_argument("model", metavar="MODEL_DIR", help="local Hugging Face model folder, or a hub id")
    c.add_argument("--out", required=True, metavar="DIR", help="save directory (created; an old adaptwin save "
                   "there is replaced, any other non-empty folder is refused)")
    c.add_argument("--ratio", type=float, help="fraction in (0, 1) of the targeted parameters to remove, "
                   "planned per component with attention at 0.7x the FFN's compression")
    c.add_argument("--width-multiple", type=int, default=1, metavar="N",
                   help="with --ratio: round every planned width (rank + LoRA) to a multiple of N; 8 makes CPU "
                        "GEMMs faster (default 1: no rounding)")
    for flag in _RANK_FLAGS:
        c.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=int, metavar="N",
                       help=f"explicit {flag.replace('_', ' ')} (instead of --ratio)")
    c.add_argument("--components", type=_csv, metavar="LIST", help="components to compress, e.g. encoder,decoder "
                   "(default: all the architecture has)")
    c.add_argument("--twins", type=_csv, metavar="LIST", help="product twins to form: qk,vo (default); "
                   "rotary models (llama) need vo")
    c.add_argument("--override", action="append", default=[], metavar="PATTERN=key:val,...",
                   help="per-module ranks after planning, e.g. 'model.encoder.layers.0.*=ffn_rank:none' "
                   f"(keys: {', '.join(_RANK_FLAGS)}; repeatable)")
    c.add_argument("--seed", type=int, default=0, help="seed of the LoRA factors' initialisation and of "
                   "fine-tuning's shuffling (default 0)")
    m = c.add_argument_group("compressors (`adaptwin list` names the registered ones)")
    m.add_argument("--attention-method", metavar="NAME", help="compressor of the attention sites: product_twin "
                   "(default, AdaPTwin), residual (ResidualTransformer: shared across layers + low rank + "
                   "diagonal; explicit ranks) or pqm (NF4 + LoRA; --attention-rank is the LoRA rank, 1-4)")
    m.add_argument("--ffn-method", metavar="NAME", help="compressor of the FFN matrices: svd (default), "
                   "residual or pqm")
    m.add_argument("--method-option", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="an option of one compressor, VALUE in JSON (a bare word is a string), e.g. "
                   "residual.group_size=2, 'residual.group_size={\"attention\": 2, \"ffn\": 3}', "
                   "pqm.double_quant=true; repeatable")
    q = c.add_argument_group("quantisation of the low-rank factors (with --calib: trained fake-quantised)")
    q.add_argument("--quantization", choices=("nf4", "int8"), help="store the factors packed: nf4 (4-bit "
                   "NormalFloat, bitsandbytes' layout) or int8 (absmax); default: not quantised")
    q.add_argument("--quant-blocksize", type=int, metavar="N", help="elements per scale (nf4: even, default 64; "
                   "int8: default one scale per row)")
    q.add_argument("--double-quant", action="store_true", help="nf4: quantise the block scales too (8-bit)")
    q.add_argument("--quantize-embeddings", action="store_true", help="store the token embedding (and an output "
                   "head tied to it) packed in the same format; position embeddings stay fp")
    q.add_argument("--quantize-lora", action="store_true", help="quantise the LoRA directions too (default: "
                   "kept in the model's dtype)")

    f = c.add_argument_group("layer-wise fine-tuning (Eq. 9; needs --calib)")
    f.add_argument("--calib", metavar="DATA", help="calibration data; every compressed layer is then trained to "
                   "reproduce the original layer's outputs on it. Text models: a UTF-8 file, one example per line, "
                   "tokenised with MODEL_DIR's tokenizer. Speech models (Whisper, wav2vec2, HuBERT): a speech set as "
                   "`adaptwin eval --data` takes (a JSONL manifest, or an LJ Speech, LibriSpeech or FSDD folder); "
                   "Whisper's decoder is fed each transcript")
    f.add_argument("--calib-speaker", metavar="NAME", help="speech sets: calibrate on this speaker's utterances "
                   "only (the target speaker)")
    f.add_argument("--epochs", type=int, metavar="N",
                   help=f"passes over the calibration batches per layer (default {d.epochs}; 0 only measures "
                        "each compressed layer's output error)")
    f.add_argument("--lr", type=float, metavar="LR", help=f"Adam learning rate (default {d.lr:g})")
    f.add_argument("--mode", choices=MODES, help="ablation: all (SVD + LoRA trainable, default), spectral "
                   "(rank r+l SVD, no LoRA), lora_scratch (rank r+l LoRA from scratch), lora_only (only LoRA trains)")
    f.add_argument("--init", choices=INITS, help="factor initialisation: svd of the weights (default) or whiten "
                   "(SVD of the activation-whitened product, from the calibration data)")
    f.add_argument("--sequential", action="store_true", default=None, help="layer i learns from the already "
                   "fine-tuned layers' outputs (one process; default: independent layers, as in the paper)")
    f.add_argument("--holdout", type=float, metavar="F",
                   help=f"fraction of batches held out for early stopping (default {d.holdout:g})")
    f.add_argument("--patience", type=int, metavar="N", help="epochs without held-out improvement before a "
                   f"layer stops; 0 disables (default {d.patience})")
    f.add_argument("--storage", choices=STORAGES, help="keep captured activations in memory (default) or on "
                   "disk (under --run-dir/activations, else a temporary folder)")
    f.add_argument("--storage-dtype", choices=STORAGE_DTYPES, help="dtype of the stored activations "
                   "(default float32; float16/bfloat16 halve the bytes)")
    f.add_argument("--run-dir", metavar="DIR", help="checkpoint every finished layer here; the same command "
                   "after a kill resumes from them")
    f.add_argument("--batch-size", type=int, metavar="N",
                   help=f"calibration examples per batch (default {DEFAULT_BATCH_SIZE})")
    f.add_argument("--max-length", type=int, metavar="N",
                   help=f"tokens per example, longer ones are truncated (default {DEFAULT_MAX_LENGTH})")
    f.add_argument("--keep-size", type=float, metavar="F", help="after fine-tuning, revert the layers with the "
                   "most error per parameter saved to the original until at most F of the targeted parameters "
                   "are kept (F in (0, 1])")
    f.add_argument("--max-error", type=float, metavar="E", help="after fine-tuning, revert every layer whose "
                   "relative output error exceeds E")
    return c


# ---------------------------------------------------------------------------------------------- compress


def _config_from_args(args: argparse.Namespace):
    from adaptwin import CompressionConfig
    from adaptwin.registry import list_compressors

    overrides = dict(parse_override(text) for text in args.override)
    kwargs: dict[str, Any] = {k: getattr(args, k) for k in _RANK_FLAGS if getattr(args, k) is not None}
    if args.twins is not None:
        kwargs["twins"] = args.twins
    used = {"attention": "product_twin", "ffn": "svd"}
    for kind in used:  # a wrong name or site kind fails here, before the model is loaded
        name = getattr(args, f"{kind}_method")
        if name is not None:
            allowed = [n for n in list_compressors() if kind in _site_kinds(n)]
            if name not in allowed:
                raise UsageError(f"--{kind}-method {name!r} is not a compressor of {kind} sites; allowed: {allowed}")
            kwargs[f"{kind}_method"] = used[kind] = name
    options: dict[str, dict[str, Any]] = {}
    for text in args.method_option:
        name, key, value = parse_method_option(text)
        if name not in used.values():
            raise UsageError(f"--method-option {text!r}: {name!r} compresses nothing here (--attention-method "
                             f"{used['attention']}, --ffn-method {used['ffn']})")
        options.setdefault(name, {})[key] = value
    if options:
        kwargs["method_options"] = options
    return CompressionConfig(ratio=args.ratio, components=args.components, overrides=overrides,
                             seed=args.seed, quantization=args.quantization, quant_blocksize=args.quant_blocksize,
                             double_quant=args.double_quant, quantize_lora=args.quantize_lora,
                             quantize_embeddings=args.quantize_embeddings, width_multiple=args.width_multiple,
                             **kwargs)


def _finetune_from_args(args: argparse.Namespace, world: int):
    """The FinetuneConfig the flags ask for (None without --calib); bad values fail before any loading."""
    given = [k for k in _CALIB_ONLY if getattr(args, k) is not None]
    if args.calib is None:
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --calib DATA (the data to fine-tune on)")
        return None
    from adaptwin import FinetuneConfig
    from adaptwin.finetune.select import check_budget

    for flag in ("batch_size", "max_length"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.keep_size is not None or args.max_error is not None:
        check_budget(args.keep_size, args.max_error)
    if args.sequential and world > 1:
        raise UsageError("--sequential trains layers one after another; run it in one process, not torchrun")
    kwargs = {k: getattr(args, k) for k in _FINETUNE_FIELDS if getattr(args, k) is not None}
    if args.storage == "disk":  # the real folder is made in cmd_compress; this validates the rest now
        kwargs["storage_dir"] = str(Path(args.run_dir) / "activations") if args.run_dir else "(temporary)"
    return FinetuneConfig(seed=args.seed, **kwargs)


def _rank_world() -> tuple[int, int]:
    """This process's rank and the world size: torch.distributed's once initialised, torchrun's env before."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def cmd_compress(args: argparse.Namespace) -> int:
    try:
        return _compress(args)
    finally:  # under torchrun, fine-tuning joined a process group; leave it cleanly
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _compress(args: argparse.Namespace) -> int:
    import contextlib
    import dataclasses
    import tempfile

    import adaptwin

    config = _config_from_args(args)  # bad ratios, ranks, twins and overrides fail here, in milliseconds
    rank, world = _rank_world()
    finetune = _finetune_from_args(args, world)  # and bad fine-tuning flags
    speech_set = finetune is not None and is_speech_set(args.calib)
    if args.calib_speaker is not None and not speech_set:
        raise UsageError(f"--calib-speaker needs a speech set as --calib (a JSONL manifest or a speech folder), got "
                         f"{args.calib}")
    lines = read_calibration_text(args.calib) if finetune is not None and not speech_set else None
    utterances = read_speech_set(args.calib, args.calib_speaker) if speech_set else None
    local = resolve_model(args.model)
    out = Path(args.out).expanduser()
    check_out_dir(out, local)
    if finetune is not None and args.run_dir is None and (args.keep_size is not None or args.max_error is not None):
        try:  # where a budget conflict, known only after fine-tuning, saves the fine-tuned model
            check_out_dir(out.with_name(out.name + "-unselected"), local)
        except UsageError as e:
            raise UsageError(f"{e} (with --keep-size / --max-error and no --run-dir, {out.name}-unselected beside "
                             "--out receives the fine-tuned model if the budgets conflict)") from None
    if args.run_dir is not None:
        check_run_dir_flag(Path(args.run_dir).expanduser(), local, out)
    source = str(local) if local is not None else args.model
    say = note if rank == 0 else (lambda msg: None)

    _disable_progress_bars()
    t0 = time.perf_counter()
    say(f"loading {source} ...")
    model = load_model(source)
    t1 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if finetune is None:
            say(f"compressing {type(model).__name__} ({model.config.model_type}) ...")
            small = adaptwin.compress(model, config, inplace=True)
        else:
            planned = adaptwin.plan(model, config)  # refuse an impossible --keep-size before training
            if args.keep_size is not None:
                from adaptwin.finetune.select import check_keep_size

                total = planned.summary()["total"]
                check_keep_size(args.keep_size, total["params_after"] / total["params_before"])
            batches = calibration_for(model, source, args.calib, lines, utterances,
                                      args.batch_size or DEFAULT_BATCH_SIZE, args.max_length)
            if finetune.storage == "disk" and finetune.run_dir is None:  # (named after this process, so that
                remove_dead_temps(tempfile.gettempdir(), "adaptwin-activations")  # a later run removes it if killed)
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=temp_prefix("adaptwin-activations")))
                finetune = dataclasses.replace(finetune, storage_dir=tmp)
            adapter = adaptwin.get_architecture(planned.architecture)
            layers = [p for p, _ in adapter.layer_paths(model)
                      if any(r["path"].startswith(p + ".") for r in planned.rows)]
            progress = EpochProgress(layers, rank, world)
            say(f"compressing {type(model).__name__} ({model.config.model_type}) and fine-tuning {len(layers)} "
                f"layers on {len(lines or utterances)} {'utterances' if utterances else 'examples'} in "
                f"{len(batches)} batches"
                + (f", spread over {world} ranks" if world > 1 else "") + " ...")
            try:
                small = adaptwin.compress(model, config, calibration=batches, finetune=finetune, progress=progress)
            finally:
                progress.close()
    if rank != 0:  # every rank holds the whole fine-tuned model; one writes it and reports
        return 0
    record = adaptwin.compression_record(small)
    summary = record.summary()  # before any selection: what compressing every planned site achieved
    selection = None
    if finetune is not None and (args.keep_size is not None or args.max_error is not None):
        from adaptwin.finetune.select import BudgetConflictError, select_layers

        try:
            small = select_layers(small, model, keep_size=args.keep_size, max_error=args.max_error, inplace=True)
        except BudgetConflictError as e:  # known only now: keep the fine-tuning's work rather than lose it
            kept = out.with_name(out.name + "-unselected")
            hint = (" rerun with other budgets and the same --run-dir to select again in seconds" if args.run_dir
                    else f" the fine-tuned model, every layer compressed, is saved to {kept} instead; "
                         f"select_layers(adaptwin.load({str(kept)!r}), original, ...) selects from it without training")
            if args.run_dir is None:
                adaptwin.save(small, kept, extra_files=extra_files(local) if local is not None
                              else hub_extra_files(args.model))
            errors = ", ".join(f"{row['path']} {float(row['error_after']):.3f}" for row in record.finetune["layers"])
            raise UsageError(f"{e} (layer errors after fine-tuning: {errors});{hint}") from None
        selection = small.adaptwin_selection
    t2 = time.perf_counter()
    extras = extra_files(local) if local is not None else hub_extra_files(args.model)
    adaptwin.save(small, out, extra_files=extras)
    t3 = time.perf_counter()

    print(f"{type(small).__name__} ({record.architecture}) -> {out}")
    rows = [(name, _fmt_int(s["params_before"]), _fmt_int(s["params_after"]), f"{100 * s['compression']:.1f} %")
            for name, s in summary.items()]
    print(_table(("component", "params before", "params after", "removed"), rows, right=(1, 2, 3)))
    if config.ratio is not None:
        achieved = summary["total"]["compression"]
        print(f"target {100 * config.ratio:.1f} % removed, achieved {100 * achieved:.2f} % "
              f"(of attention + FFN parameters in {', '.join(n for n in summary if n != 'total')})")
    else:
        print("explicit ranks (no target ratio)")
    if selection is not None:
        print(f"(every planned layer compressed, before the selection below: {100 * selection.keep_fraction:.1f} % "
              "of the targeted parameters kept after it)")
    if finetune is not None:
        print()
        print(_finetune_summary(finetune, small.adaptwin_finetune, len(batches), selection))
    written = sorted(p for p in out.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in written)
    print(f"wrote {len(written)} files, {_fmt_bytes(size)}: {', '.join(p.name for p in written)}")
    step = "compress + fine-tune" if finetune is not None else "compress"
    print(f"time: load {t1 - t0:.1f} s, {step} {t2 - t1:.1f} s, save {t3 - t2:.1f} s")
    return 0


def _finetune_summary(cfg, report, n_batches: int, selection) -> str:
    """The per-layer error table (relative output error on held-out batches) and what selection did."""
    n_val = max(1, round(cfg.holdout * n_batches)) if cfg.holdout > 0 and n_batches >= 2 else 0
    lines = [f"fine-tuning: mode {cfg.mode}, init {cfg.init}, lr {cfg.lr:g}, up to {cfg.epochs} epochs"
             f"{f' (patience {cfg.patience})' if cfg.patience and n_val else ''}, {n_batches} batches "
             f"({n_batches - n_val} train, {n_val} held out), "
             f"{'sequential' if cfg.sequential else 'independent'} layers, seed {cfg.seed}"]
    reverted = set(selection.reverted) if selection is not None else set()
    rows = []
    for r in report.layers:
        status = "reverted" if r.path in reverted else ""
        if r.path in report.resumed:
            status = ", ".join(filter(None, ["resumed", status]))
        rows.append((r.path, f"{r.error_before:.4f}", f"{r.error_after:.4f}", str(r.epochs), str(r.best_epoch),
                     f"{r.seconds:.1f}", status))
    header = ("layer", "rel. error before", "after", "epochs", "best epoch", "seconds", "status")
    if not any(row[-1] for row in rows):
        header, rows = header[:-1], [row[:-1] for row in rows]
    lines.append(_table(header, rows, right=(1, 2, 3, 4, 5)))
    if report.layers:
        before = sum(r.error_before for r in report.layers) / len(report.layers)
        after = sum(r.error_after for r in report.layers) / len(report.layers)
        lines.append(f"mean relative output error {before:.4f} -> {after:.4f} "
                     f"({'held-out' if n_val else 'training'} batches, per layer alone)")
    where = f"on disk ({cfg.storage_dtype})" if cfg.storage == "disk" else f"in memory ({cfg.storage_dtype})"
    lines.append(f"captured activations: peak {_fmt_bytes(report.capture_bytes)} {where}"
                 + (f"; {len(report.resumed)} layer(s) resumed from {cfg.run_dir}" if report.resumed else ""))
    if selection is not None:
        budget = ", ".join(f"{k} {v:g}" for k, v in (("keep_size", selection.keep_size),
                                                      ("max_error", selection.max_error)) if v is not None)
        if selection.reverted:
            what = f"reverted {len(selection.reverted)} layer(s) to the original: {', '.join(selection.reverted)}"
        else:
            why = [w for w, on in (("every layer's error is within max_error", selection.max_error is not None),
                                   ("no layer fits keep_size's spare room", selection.keep_size is not None)) if on]
            what = f"nothing reverted ({' and '.join(why)})"
        lines.append(f"selection ({budget}): {what}")
        lines.append(f"  targeted parameters kept {_fmt_int(selection.params_kept)} of "
                     f"{_fmt_int(selection.params_original)} ({100 * selection.keep_fraction:.1f} %, "
                     f"{100 * (1 - selection.keep_fraction):.1f} % removed; every layer compressed: "
                     f"{100 * selection.keep_fraction_before:.1f} % kept); worst compressed layer's error "
                     f"{selection.max_kept_error:.4f}")
    return "\n".join(lines)


def _disable_progress_bars() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
