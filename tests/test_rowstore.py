"""The row store's caches on disk (issue 27): a corrupt or truncated text store or latent cache is one line that says
to delete it (and no "Exception ignored in NpyRows.__del__"), and a killed build resumes from its last whole chunk."""
import gc
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


@pytest.mark.parametrize("name", ["emb", "mask"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_text_store_is_one_line_that_says_to_delete_it(tmp_path, name, damage):
    captions = ["a red circle", "a blue star", "a green ring"]
    emb, mask = cached_text_embeddings(OFFLINE_TEXT_ENCODER, 8, captions, tmp_path, batch_size=2)
    path = emb.path if name == "emb" else mask.path
    del emb, mask
    raw = path.read_bytes()
    path.write_bytes(b"not a numpy file" if damage == "garbage" else raw[: len(raw) - 5])
    message = raises_one_line(rf"{name}\.npy: ", cached_text_embeddings, OFFLINE_TEXT_ENCODER, 8, captions, tmp_path)
    assert ("truncated" in message) == (damage == "truncated") and "delete" in message and str(path.parent) in message


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
