"""Compress + fine-tune a tiny BERT with a run directory, as a separate process (or under torchrun).

    python tests/_finetune_job.py --run-dir D --out OUT [--layers 4] [--batches 12] [--epochs 30] ...
    torchrun --standalone --nproc-per-node 2 tests/_finetune_job.py --run-dir D --out OUT ...

tests/test_resume.py kills it with SIGKILL and reruns it; tests/test_distributed.py runs it under
torchrun. Everything is seeded and runs on one CPU thread, so two runs of the same command produce
bit-identical weights. Rank 0 saves the fine-tuned model to ``--out`` (`adaptwin.save`) and prints one
JSON line ``{"resumed": [...], "layers": [...], "world": N}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_models sits beside this script


def build(layers: int, width: int) -> torch.nn.Module:
    from tiny_models import reinit
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * width, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0,
                     attn_implementation="sdpa")
    torch.manual_seed(0)
    return reinit(BertModel(cfg), seed=6, std=0.2)


def batches(n: int, size: int, length: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 100, (size, length), generator=gen)
        mask = torch.ones(size, length, dtype=torch.long)
        mask[0, length * 3 // 4:] = 0  # one padded row, so the mask reaches every layer
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="'none' for no run directory")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mode", default="all")
    p.add_argument("--sequential", action="store_true")
    p.add_argument("--storage", default="memory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # bit-reproducible across processes (and across torchrun ranks)
    import torch.distributed as dist

    import adaptwin

    model = build(args.layers, args.width)
    ft = adaptwin.FinetuneConfig(
        epochs=args.epochs, lr=args.lr, mode=args.mode, sequential=args.sequential, holdout=0.25, patience=0,
        storage=args.storage, storage_dir=str(Path(args.run_dir) / "activations") if args.storage == "disk" else None,
        run_dir=None if args.run_dir == "none" else args.run_dir, seed=args.seed, progress=False,
    )
    small = adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.5),
                              calibration=batches(args.batches, args.batch_size, args.length), finetune=ft)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank == 0:
        adaptwin.save(small, args.out)
        report = small.adaptwin_finetune
        print(json.dumps({"resumed": report.resumed, "layers": [r.path for r in report.layers], "world": world}),
              flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
