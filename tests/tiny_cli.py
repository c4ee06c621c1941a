"""The in-process CLI runner, a tiny BERT model folder, and the checks the command-line tests share."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from adaptwin.cli import main

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "the", "cat", "sat", "on"]


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    """``adaptwin ARGS`` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def save_bert_dir(d: Path) -> Path:
    """A 2-layer BERT (hidden 48, 4 heads of 12) saved with save_pretrained into ``d``, plus its tokenizer files."""
    from transformers import BertConfig, BertModel, BertTokenizer

    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    # transformers 5 takes the vocabulary itself (``vocab_file=`` is silently ignored there: a tokenizer of the
    # five special tokens alone, which maps every word to [UNK])
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    assert tokenizer.convert_tokens_to_ids(["the", "z"]) == [VOCAB.index("the"), VOCAB.index("z")]
    tokenizer.save_pretrained(d)
    (d / "README.md").write_text("not a tokenizer file; must not be copied\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=32)
    BertModel(config).save_pretrained(d)
    return d


def load_dense(folder: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, dtype=torch.float32).eval()


def bert_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, len(VOCAB), (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row, so the mask path is compared too
    return {"input_ids": ids, "attention_mask": mask}


@torch.inference_mode()
def assert_same_outputs(a, b, inputs) -> None:
    # Same fp32 weights through the same ops in one process: the results are bit-identical.
    torch.testing.assert_close(a(**inputs).last_hidden_state, b(**inputs).last_hidden_state, rtol=0, atol=0)


def assert_user_error(rc: int, err: str, expected: str) -> None:
    assert rc == 2
    assert "Traceback" not in err, err
    *progress, last = err.strip().splitlines()  # progress notes ("loading ...") may come first
    assert last.startswith("adaptwin compress: error: ") or last.startswith("adaptwin inspect: error: "), err
    assert expected in last and not any("error" in line for line in progress), err
