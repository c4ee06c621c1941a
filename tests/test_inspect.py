"""`adaptwin inspect` on saves whose method is not product twins: what it says about PQM's NF4 base + LoRA."""

from __future__ import annotations

import json

from tiny_speech import run_cli, whisper

import adaptwin
from adaptwin.compressors.pqm import quantize


def test_inspect_describes_pqm_as_nf4_plus_lora(tmp_path):
    """PQM keeps every weight (NF4) and adds LoRA: inspect shows the LoRA rank and the bytes saved, not product
    twins or an r+l split, and says how much smaller the stored modules are than their float32 originals."""
    small = quantize(whisper(), 3, double_quant=True)
    adaptwin.save(small, tmp_path / "pqm")
    rc, text, err = run_cli("inspect", tmp_path / "pqm")
    assert rc == 0, err
    head = text.splitlines()[0]
    assert "pqm: NF4 base (block 64, double quant) + LoRA rank 3 on attention, ffn" in head
    assert "twins" not in head and "ranks" not in head
    meta = json.loads((tmp_path / "pqm" / "adaptwin.json").read_text())
    for site in meta["compression"]["sites"]:
        line = next(x for x in text.splitlines() if x.startswith(site["path"] + " "))
        assert " LoRA 3 " in line and "+" not in line
    data = json.loads(run_cli("inspect", tmp_path / "pqm", "--json")[1])
    assert data["original_dtype"] == "F32"
    assert {m["layout"] for m in data["modules"]} == {"nf4 block 64 dq + LoRA r=3"}
    before = meta["summary"]["total"]["params_before"]
    stored = sum(m["bytes"] for m in data["modules"])
    assert stored == sum(t.numel() * t.element_size() for n, t in small.state_dict().items()
                         if any(n.startswith(m["path"] + ".") for m in data["modules"]))
    assert f"size: their original {before:,} parameters in F32 {4 * before / 1024:.1f} KiB, stored now " \
           f"{stored / 1024:.1f} KiB ({4 * before / stored:.2f}x smaller)" in text
