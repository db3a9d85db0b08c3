"""The row store's caches on disk (issue 27): a corrupt or truncated text store or latent cache is one line that says
to delete it (and no "Exception ignored in NpyRows.__del__"), and a killed build resumes from its last whole chunk."""
import gc
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_config

import latents
from conditions import Conditioned
from config import OFFLINE_TEXT_ENCODER
from embedded_sets import ShapesDataset
from runtime.errors import InputError
from runtime.rowstore import NpyRows, build_once
from text_encoder import cached_text_embeddings
from textok import TexTok


def raises_one_line(match, fn, *args, **kwargs) -> str:
    """The InputError `fn(*args)` raises (one line, matching `match`), with every object of the failed call freed
    and no exception ignored on the way (sys.unraisablehook)."""
    ignored = []
    hook, sys.unraisablehook = sys.unraisablehook, ignored.append
    try:
        with pytest.raises(InputError, match=match) as err:
            fn(*args, **kwargs)
        message = str(err.value)
        del err  # its traceback holds the frames of the failed call
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert not ignored, [f"{u.exc_type.__name__}: {u.exc_value} in {u.object}" for u in ignored]
    assert "\n" not in message
    return message


def header_claiming(path, shape):
    """`path` rewritten as a float16 .npy whose header claims `shape` (a negative size too) over its old data."""
    raw = np.lib.format.open_memmap(path, mode="r")
    offset, data = raw.offset, path.read_bytes()
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": shape})
        f.write(data[offset:])


@pytest.mark.parametrize("name,damage", [(n, d) for d in ("garbage", "truncated") for n in ("emb", "mask")]
                         + [("emb", f"C={c}") for c in (-384, 0, 100)])
def test_a_corrupt_text_store_is_one_line_that_says_to_delete_it(tmp_path, name, damage):
    """A store cut short, overwritten, or whose emb header gives C other than the encoder's 384 (a ValueError or a
    matmul's RuntimeError at step 0 before): one line naming the file and the folder to delete."""
    captions = ["a red circle", "a blue star", "a green ring"]
    emb, mask = cached_text_embeddings(OFFLINE_TEXT_ENCODER, 8, captions, tmp_path, batch_size=2)
    path = emb.path if name == "emb" else mask.path
    del emb, mask
    raw = path.read_bytes()
    if damage.startswith("C="):
        header_claiming(path, (3, 8, int(damage[2:])))
    else:
        path.write_bytes(b"not a numpy file" if damage == "garbage" else raw[: len(raw) - 5])
    message = raises_one_line(rf"{name}\.npy: ", cached_text_embeddings, OFFLINE_TEXT_ENCODER, 8, captions, tmp_path)
    assert ("truncated" in message) == (damage == "truncated") and "delete" in message and str(path.parent) in message


def test_a_text_store_row_that_is_not_finite_is_one_line_when_read(tmp_path):
    """NaN in a built store's emb.npy reached step 0 as a non-finite loss: the row is refused as it is read, naming
    the store to delete (no pass over the whole store when it is opened)."""
    captions = ["a red circle", "a blue star", "a green ring"]
    emb, _ = cached_text_embeddings(OFFLINE_TEXT_ENCODER, 8, captions, tmp_path / "text", batch_size=2)
    NpyRows(emb.path, writable=True).write(1, np.full((1, 8, 384), np.nan))
    data = Conditioned(None, captions, [0, 0, 0], OFFLINE_TEXT_ENCODER, 8, tmp_path)
    assert data.condition(0).text.isfinite().all()
    raises_one_line(rf"^{emb.path}: row 1 holds non-finite values; delete {emb.path.parent} to recompute it$",
                    data.condition, 1)


def test_a_file_that_is_not_npy_is_one_line_and_nothing_ignored(tmp_path):
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY garbage")
    raises_one_line(r"x\.npy: not a readable \.npy file", NpyRows, tmp_path / "x.npy")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other shape"])
def test_a_corrupt_latent_cache_is_one_line_that_says_to_delete_it(tmp_path, damage):
    """Stage 2's Z.npy (latents.encode_latents) cut short, overwritten or of another shape: one line naming it."""
    torch.manual_seed(0)
    cfg = tiny_config(conditioning="none")
    tok, data = TexTok(cfg).eval(), Conditioned.for_model(ShapesDataset("train", 32, 6), cfg, tmp_path)
    Z = latents.encode_latents(tok, data, torch.device("cpu"), "fp32", tmp_path / "Z", batch_size=4)
    path = tmp_path / "Z" / "Z.npy"
    if damage == "other shape":
        np.save(path, np.zeros((5, *Z.shape[1:]), np.float32))
    else:
        raw = path.read_bytes()
        path.write_bytes(b"garbage" if damage == "garbage" else raw[:-4])
    message = raises_one_line(r"Z\.npy: ", latents.encode_latents, tok, data, torch.device("cpu"), "fp32",
                              tmp_path / "Z", batch_size=4)
    assert "delete" in message and str(tmp_path / "Z") in message


ARRAYS = {"x": ((10, 2), np.float32), "y": ((10,), np.int64)}  # 4 chunks of 3 rows


def fill_rows(computed, kill_at=None, half=False):
    """A build's fill: each chunk's rows as their index (x: 2 per row), recorded in `computed`; a KeyboardInterrupt
    when chunk `kill_at` is reached (with `half`, after writing part of it, before recording it)."""
    def fill(files, chunks):
        for c in chunks:
            rows = chunks.rows(c)
            if c == kill_at and not half:
                raise KeyboardInterrupt
            files["x"].write(rows.start, np.arange(2 * rows.start, 2 * rows.stop).reshape(-1, 2))
            if c == kill_at:
                raise KeyboardInterrupt
            files["y"].write(rows.start, np.arange(rows.start, rows.stop))
            computed.append(c)
            chunks.done(c)
    return fill


@pytest.mark.parametrize("half", [False, True], ids=["between chunks", "inside a chunk"])
def test_a_killed_build_resumes_at_the_chunks_it_had_not_finished(tmp_path, half):
    computed = []
    with pytest.raises(KeyboardInterrupt):
        build_once(tmp_path / "store", ARRAYS, fill_rows(computed, kill_at=2, half=half), chunk_rows=3)
    assert computed == [0, 1] and not (tmp_path / "store").exists()
    computed.clear()
    folder = build_once(tmp_path / "store", ARRAYS, fill_rows(computed), chunk_rows=3)
    assert computed == [2, 3]  # only the chunks the killed build had not recorded
    whole = build_once(tmp_path / "whole", ARRAYS, fill_rows([]), chunk_rows=3)
    for name in ARRAYS:
        assert np.array_equal(np.load(folder / f"{name}.npy"), np.load(whole / f"{name}.npy"))
    assert sorted(p.name for p in folder.iterdir()) == ["x.npy", "y.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "whole"]


def test_a_killed_build_of_other_arrays_or_chunks_starts_afresh(tmp_path):
    computed = []
    with pytest.raises(KeyboardInterrupt):
        build_once(tmp_path / "store", ARRAYS, fill_rows(computed, kill_at=2), chunk_rows=3)
    computed.clear()
    build_once(tmp_path / "store", ARRAYS, fill_rows(computed), chunk_rows=2)  # other chunks: rows 0-5 redone
    assert computed == [0, 1, 2, 3, 4]


def test_an_encoder_giving_non_finite_embeddings_is_one_line_and_no_store(tmp_path, monkeypatch):
    """An encoder whose output overflows fp16 (inf) for one caption: refused as the store is built, naming it."""
    import text_encoder
    real = text_encoder.TextEncoder.__call__

    def overflowing(self, batch, *args):
        e, m = real(self, batch, *args)
        return e * torch.tensor([1e6 if "star" in c else 1.0 for c in batch])[:, None, None], m
    monkeypatch.setattr(text_encoder.TextEncoder, "__call__", overflowing)
    captions = ["a red circle", "a blue star", "a green ring"]
    raises_one_line(r"^text encoder 'all-MiniLM-L6-v2': non-finite embeddings of caption 1 \('a blue star'\) in fp16$",
                    cached_text_embeddings, OFFLINE_TEXT_ENCODER, 8, captions, tmp_path, batch_size=2)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("what", ["done.npy", "the folder"])
def test_a_killed_builds_file_that_is_a_symlink_is_never_written_through(tmp_path, what):
    """A killed build's done.npy a link to a user's .npy of the right shape (the resumed build set its [0] to 1):
    the build starts afresh, the user's file as it was. The temporary folder itself a link: one line."""
    with pytest.raises(KeyboardInterrupt):
        build_once(tmp_path / "store", ARRAYS, fill_rows([], kill_at=2), chunk_rows=3)
    user, tmp = tmp_path / "user", tmp_path / ".store.tmp"
    user.mkdir()
    np.save(user / "done.npy", np.zeros(4, np.uint8))
    before = (user / "done.npy").read_bytes()
    if what == "done.npy":
        (tmp / "done.npy").unlink()
        (tmp / "done.npy").symlink_to(user / "done.npy")
        computed = []
        build_once(tmp_path / "store", ARRAYS, fill_rows(computed), chunk_rows=3)
        assert computed == [0, 1, 2, 3]
    else:
        (user / "spec.json").write_bytes((tmp / "spec.json").read_bytes())
        (user / "x.npy").write_bytes((tmp / "x.npy").read_bytes())
        (user / "y.npy").write_bytes((tmp / "y.npy").read_bytes())
        shutil.rmtree(tmp)
        tmp.symlink_to(user)
        raises_one_line(rf"^{tmp}: a symbolic link where this project keeps its own file", build_once,
                        tmp_path / "store", ARRAYS, fill_rows([]), chunk_rows=3)
    assert (user / "done.npy").read_bytes() == before


def test_a_killed_build_recomputes_chunks_recorded_done_that_are_not_finite(tmp_path):
    """NaN rows in a chunk a killed build recorded done: that chunk is computed again, not kept."""
    with pytest.raises(KeyboardInterrupt):
        build_once(tmp_path / "store", ARRAYS, fill_rows([], kill_at=3), chunk_rows=3)
    NpyRows(tmp_path / ".store.tmp" / "x.npy", writable=True).write(4, np.full((1, 2), np.nan))  # chunk 1
    computed = []
    folder = build_once(tmp_path / "store", ARRAYS, fill_rows(computed), chunk_rows=3)
    assert computed == [1, 3] and np.isfinite(np.load(folder / "x.npy")).all()


def test_a_killed_text_store_build_encodes_only_the_missing_batches(tmp_path, monkeypatch):
    """cached_text_embeddings killed after 2 of 4 batches: the rebuild encodes batches 3 and 4 only, and the store
    equals one built without a kill."""
    import text_encoder
    captions = [f"a {c} {s}" for c in ("red", "blue", "green", "grey") for s in ("circle", "star")]  # 8: 4 batches
    encoded, real = [], text_encoder.TextEncoder.__call__

    def encode(self, batch, *args, kill_after=None):
        if len(encoded) == kill_after:
            raise KeyboardInterrupt
        encoded.append(list(batch))
        return real(self, batch, *args)
    monkeypatch.setattr(text_encoder.TextEncoder, "__call__", lambda self, b, *a: encode(self, b, *a, kill_after=2))
    with pytest.raises(KeyboardInterrupt):
        cached_text_embeddings(OFFLINE_TEXT_ENCODER, 8, captions, tmp_path / "killed", batch_size=2)
    assert encoded == [captions[0:2], captions[2:4]]
    encoded.clear()
    monkeypatch.setattr(text_encoder.TextEncoder, "__call__", encode)
    emb, mask = cached_text_embeddings(OFFLINE_TEXT_ENCODER, 8, captions, tmp_path / "killed", batch_size=2)
    assert encoded == [captions[4:6], captions[6:8]]
    emb2, mask2 = cached_text_embeddings(OFFLINE_TEXT_ENCODER, 8, captions, tmp_path / "whole", batch_size=2)
    assert np.array_equal(emb.read(0, 8), emb2.read(0, 8)) and np.array_equal(mask.read(0, 8), mask2.read(0, 8))
