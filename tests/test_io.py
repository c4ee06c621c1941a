"""save/load: identical outputs, atomic writes, and clear refusals of damaged or mismatched directories."""

import json
import os

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import adaptwin
from adaptwin import io as aio


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16)
    return BertModel(cfg).eval()


@pytest.fixture(scope="module")
def small(bert):
    return adaptwin.compress(bert, adaptwin.CompressionConfig(attention_rank=4, attention_lora_rank=2, ffn_rank=8))


def _out(model):
    ids = torch.arange(2 * 10).reshape(2, 10) % 50
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def test_round_trip_identical(small, tmp_path):
    extra = tmp_path / "tokenizer_config.json"
    extra.write_text("{}")
    out = adaptwin.save(small, tmp_path / "m", extra_files=[extra])
    assert sorted(os.listdir(out)) == ["adaptwin.json", "model.safetensors", "tokenizer_config.json"]
    again = adaptwin.load(out)
    assert torch.equal(_out(again), _out(small))
    assert again.adaptwin_record.to_dict() == small.adaptwin_record.to_dict()
    assert not any(p.is_meta for p in again.parameters())


def test_accounting_matches_the_modules(small, bert):
    # The record's predicted counts are what the modules really hold, so reported compression is exact.
    record = small.adaptwin_record
    after = sum(p.numel() for path in record.modules for p in small.get_submodule(path).parameters())
    assert after == sum(row["params_after"] for row in record.sites)
    before_total = sum(p.numel() for p in bert.parameters())
    now_total = sum(p.numel() for p in small.parameters())
    assert before_total - now_total == sum(r["params_before"] - r["params_after"] for r in record.sites)


def test_tied_weights_stay_tied(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=16)).eval()
    small = adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.4))
    adaptwin.save(small, tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "adaptwin.json").read_text())
    assert meta["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    again = adaptwin.load(tmp_path / "g")
    assert again.lm_head.weight is again.transformer.wte.weight
    ids = torch.arange(12)[None] % 40
    with torch.no_grad():
        assert torch.equal(again(ids).logits, small(ids).logits)


def test_save_refuses_foreign_dir_and_dense_model(small, bert, tmp_path):
    foreign = tmp_path / "docs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an adaptwin save"):
        adaptwin.save(small, foreign)
    assert os.listdir(foreign) == ["notes.txt"]
    with pytest.raises(ValueError, match="not compressed by adaptwin"):
        adaptwin.save(bert, tmp_path / "dense")
    assert not (tmp_path / "dense").exists()


def test_a_save_holding_files_it_did_not_write_is_not_replaced(small, tmp_path):
    """Replacing a save swaps the whole folder: a file the user put there would be deleted with it, so such a
    folder is refused (the save lists its files in adaptwin.json); the save's own files are replaced as before."""
    target = adaptwin.save(small, tmp_path / "m")
    assert sorted(os.listdir(target)) == adaptwin.read_meta(target)["files"]
    adaptwin.save(small, target)  # its own files only: replaced
    (target / "my_notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files its adaptwin save did not write \\(my_notes.txt\\)"):
        adaptwin.save(small, target)
    assert (target / "my_notes.txt").read_text() == "mine"


def test_failed_save_leaves_previous_save_intact(small, tmp_path, monkeypatch):
    target = adaptwin.save(small, tmp_path / "m")
    before = {p: (target / p).read_bytes() for p in os.listdir(target)}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(aio, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        adaptwin.save(small, target)
    assert {p: (target / p).read_bytes() for p in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary folder left behind


_KILLED_SAVE = """
import os, signal, sys, torch
import adaptwin
from adaptwin import io as aio
from transformers import BertConfig, BertModel

torch.manual_seed(0)
bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=16)).eval()
small = adaptwin.compress(bert, adaptwin.CompressionConfig(attention_rank=4, ffn_rank=8))
real = aio.save_file
def save_then_die(tensors, path, **kw):
    real(tensors, path, **kw)
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 with the weights half-way to their folder
aio.save_file = save_then_die
adaptwin.save(small, sys.argv[1])
"""


def test_a_save_killed_mid_write_is_cleaned_up_by_the_next(small, tmp_path):
    """kill -9 during a save leaves its temporary folder (nothing can run then); the next save to the same
    path removes it, because the process that wrote it is gone. A live writer's folder is left alone."""
    import subprocess
    import sys

    from adaptwin._files import remove_dead_temps, temp_prefix

    target = adaptwin.save(small, tmp_path / "m")
    before = {p: (target / p).read_bytes() for p in os.listdir(target)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(target)], stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err.decode()
    left = [p for p in os.listdir(tmp_path) if p != "m"]
    assert len(left) == 1 and left[0].startswith(f".m.tmp-{proc.pid}@")
    assert (tmp_path / left[0] / "model.safetensors").is_file()  # the killed writer's half-built save
    assert {p: (target / p).read_bytes() for p in os.listdir(target)} == before  # the old save is whole
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a temporary named after a process that still runs: another save in flight
        live = tmp_path / f"{temp_prefix('m').replace(str(os.getpid()), str(alive.pid))}abc"
        live.mkdir()
        other_host = tmp_path / f".m.tmp-{proc.pid}@elsewhere-abc"  # another machine on a shared filesystem
        other_host.mkdir()
        adaptwin.save(small, target)
        assert sorted(os.listdir(tmp_path)) == sorted(["m", live.name, other_host.name])
        assert adaptwin.load(target) is not None
    finally:
        alive.kill()
        alive.wait()
    assert remove_dead_temps(tmp_path, "m") == [live]  # its writer is gone now


def test_a_replace_killed_between_its_renames_is_undone(small, tmp_path, monkeypatch):
    """Where no atomic swap exists, replacing moves the old save aside, then renames the new one in. A writer
    killed between the two leaves no save at `path`; the next write to it puts the old one back first."""
    import subprocess
    import sys

    from adaptwin import _files

    target = adaptwin.save(small, tmp_path / "m")
    before = {p: (target / p).read_bytes() for p in os.listdir(target)}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".m.old-{int(dead.stdout)}@{_files._host()}-xyz"
    aside.mkdir()
    os.rename(target, aside / "old")  # the state a kill between the renames leaves
    assert _files.remove_dead_temps(tmp_path, "m") == [aside]
    assert {p: (target / p).read_bytes() for p in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["m"]
    # and the two-rename path itself (what runs where renameat2 cannot swap) replaces cleanly
    monkeypatch.setattr(_files, "exchange", lambda a, b: False)
    adaptwin.save(small, target, extra_files=[])
    assert sorted(os.listdir(tmp_path)) == ["m"] and adaptwin.load(target) is not None


def test_exchange_swaps_two_folders_atomically(tmp_path):
    import sys

    from adaptwin._files import exchange

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("b")
    if not exchange(tmp_path / "a", tmp_path / "b"):
        assert not sys.platform.startswith("linux"), "renameat2(RENAME_EXCHANGE) should work on Linux tmpfs/ext4"
        pytest.skip("no atomic exchange on this platform (replace_dir falls back to two renames)")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"
    with pytest.raises(FileNotFoundError):
        exchange(tmp_path / "a", tmp_path / "missing")


def test_weights_file_bytes_do_not_depend_on_the_process(tmp_path):
    """safetensors writes its metadata from a hash map, in an order that changes from process to process (two
    saves of one model gave different files and SHA-256s); save rewrites the header with the keys sorted."""
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    files = []
    for i, order in enumerate(((("producer", "x"), ("format", "pt")), (("format", "pt"), ("producer", "x")))):
        path = tmp_path / f"{i}.safetensors"
        save_file(tensors, str(path), metadata=dict(order))
        raw = path.read_bytes()  # the order as written: force the one this case wants, at the same length
        text = raw[8:8 + int.from_bytes(raw[:8], "little")].decode()
        want = '{"__metadata__":{' + ",".join(f'"{k}":"{v}"' for k, v in order) + "}"
        start = text.index('{"__metadata__":{')
        end = text.index("}", start) + 1
        path.write_bytes(raw[:8] + (text[:start] + want + text[end:]).encode() + raw[8 + len(text):])
        with open(path, "rb+") as f:
            aio._canonical_header(f)
        files.append(path.read_bytes())
        assert all(torch.equal(load_file(str(path))[k], v) for k, v in tensors.items())
    assert files[0] == files[1]


@pytest.fixture
def saved(small, tmp_path):
    return adaptwin.save(small, tmp_path / "m")


def test_truncated_weights_refused(saved):
    w = saved / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        adaptwin.load(saved)


def test_tampered_weights_refused(saved):
    w = saved / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        adaptwin.load(saved)


def test_mismatched_config_refused(saved):
    cfg = saved / "adaptwin.json"
    meta = json.loads(cfg.read_text())
    path = next(p for p, e in meta["compression"]["modules"].items() if e["compressor"] == "svd")
    meta["compression"]["modules"][path]["spec"]["rank"] += 1
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shapes do not match"):
        adaptwin.load(saved)


@pytest.mark.parametrize(
    "edit, message",
    [
        (None, "not valid JSON"),  # truncated file
        (lambda m: m.update(format_version=99), "format_version 99"),
        (lambda m: m.update(format="other"), "not an adaptwin config"),
        (lambda m: m.pop("weights"), "lacks the 'weights' section"),
        (lambda m: (m.clear(), m.update(x=[1, 2])), "format field None"),
        (lambda m: m["compression"].update(architecture="nope"), "unsupported model type 'nope'"),
        (lambda m: m["model"].update({"class": "os.system"}), "not a transformers model class"),
        # the audit of 2026-11-26: each of these raised a bare KeyError / TypeError / AttributeError, or loaded
        (lambda m: m.update(weights="model.safetensors"), "the 'weights' section must be a JSON object"),
        (lambda m: m.update(aliases=[]), "the 'aliases' section must be a JSON object"),
        (lambda m: m["weights"].update(file=None), "weights.file must be a file name inside the save directory"),
        (lambda m: m["weights"].update(file="../model.safetensors"), "weights.file must be a file name inside"),
        (lambda m: m["weights"].update(file="/etc/hostname"), "weights.file must be a file name inside"),
        (lambda m: m["weights"].update(bytes=str(m["weights"]["bytes"])), "weights.bytes must be a JSON integer"),
        (lambda m: next(iter(m["compression"]["modules"].values())).pop("spec"),
         "module .* cannot be rebuilt \\(missing key 'spec'\\)"),
        (lambda m: m["compression"]["modules"].update({next(iter(m["compression"]["modules"])): "svd"}),
         "module .* cannot be rebuilt"),
        (lambda m: m["model"].pop("config"), "the 'model' section cannot be rebuilt \\(missing key 'config'\\)"),
        (lambda m: m["compression"]["config"].update(ratio=5), "ratio must lie strictly between 0 and 1"),
        (lambda m: m["compression"]["config"].update(colour="red"), "unknown CompressionConfig fields \\['colour'\\]"),
        (lambda m: next(e for e in m["compression"]["modules"].values() if e["compressor"] == "svd")["spec"]
         .update(rank=-1), "module .* cannot be rebuilt"),
        # a config far larger than the save: refused from a meta-device build, before any allocation
        (lambda m: m["model"]["config"].update(vocab_size=10 ** 12),
         "describes a model of 32,000,000,0.*embeddings.word_embeddings.weight \\(1000000000000, 32\\)"),
        (lambda m: m["model"]["config"].update(intermediate_size=10 ** 9), "describes a model of"),
    ],
)
def test_damaged_config_refused(saved, edit, message):
    cfg = saved / "adaptwin.json"
    if edit is None:
        cfg.write_text(cfg.read_text()[:50])
    else:
        meta = json.loads(cfg.read_text())
        edit(meta)
        cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        adaptwin.load(saved)


def test_stored_dtypes_checked(saved):
    """Packed codes must keep their integer dtype and every other tensor must be floating: an edited file
    (re-hashed) with other dtypes is refused by name instead of loading and failing at the first forward."""
    from safetensors.torch import load_file, save_file

    w = saved / "model.safetensors"
    tensors = load_file(str(w))
    name = next(k for k in tensors if k.endswith("bias"))
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, str(w))
    cfg = saved / "adaptwin.json"
    meta = json.loads(cfg.read_text())
    meta["weights"].update(bytes=w.stat().st_size, sha256=aio._sha256(w))
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"tensor dtypes do not match the model .*{name}.*torch.int32"):
        adaptwin.load(saved)


def test_missing_files_refused(saved, tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        adaptwin.load(tmp_path / "absent")
    (saved / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):
        adaptwin.load(saved)
    (saved / "adaptwin.json").unlink()
    with pytest.raises(ValueError, match="adaptwin.json is missing"):
        adaptwin.load(saved)


@pytest.fixture
def umask():
    """Set the process umask for one test, and restore it."""
    saved_mask = os.umask(0o022)
    os.umask(saved_mask)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(saved_mask)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_saved_files_get_the_mode_open_would_give(small, tmp_path, umask, mask):
    # mkdtemp (0700), mkstemp and safetensors (0600) would leave a model only its owner can read; every
    # published file and folder gets 0666 / 0777 less the umask, as open() and mkdir give.
    from safetensors.torch import save_file

    from adaptwin._files import umask as read_umask
    from adaptwin.finetune.checkpoint import write_atomic
    from adaptwin.speech.audio import write_wav
    from benchmarks.digits import atomic_dir

    umask(mask)
    assert read_umask() == mask
    extra = tmp_path / "tokenizer_config.json"
    extra.write_text("{}")
    out = adaptwin.save(small, tmp_path / "m", extra_files=[extra])
    adaptwin.save(small, out, extra_files=[extra])  # the replacing path too
    write_atomic(tmp_path / "ckpt.safetensors", {"w": torch.ones(2)}, {"step": 1})
    write_atomic(tmp_path / "run.json", None, {"step": 1})
    write_wav(tmp_path / "a.wav", torch.zeros(160).numpy(), 16000)
    with atomic_dir(tmp_path / "trained") as folder:  # the benchmarks' model folders
        save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))  # as save_pretrained writes it
        (folder / "sub").mkdir(mode=0o700)
    files = [out / name for name in os.listdir(out)]
    files += [tmp_path / name for name in ("ckpt.safetensors", "run.json", "a.wav", "trained/model.safetensors")]
    assert len(files) == 7
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~mask) for p in files}
    for folder in (out, tmp_path / "trained", tmp_path / "trained" / "sub"):
        assert oct(folder.stat().st_mode & 0o777) == oct(0o777 & ~mask)
    assert sorted(os.listdir(tmp_path)) == ["a.wav", "ckpt.safetensors", "m", "run.json", "tokenizer_config.json",
                                            "trained"]
