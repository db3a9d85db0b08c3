"""The row store's caches on disk (issue 27): a corrupt or truncated text store or latent cache is one line that says
to delete it (and no "Exception ignored in NpyRows.__del__"), and a killed build resumes from its last whole chunk."""
import gc
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_config

import train
from conditions import Conditioned
from config import OFFLINE_TEXT_ENCODER
from embedded_sets import ShapesDataset
from errors import InputError
from rowstore import NpyRows
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
    """Stage 2's Z.npy (train.encode_latents) cut short, overwritten or of another shape: one line naming it."""
    torch.manual_seed(0)
    cfg = tiny_config(conditioning="none")
    tok, data = TexTok(cfg).eval(), Conditioned.for_model(ShapesDataset("train", 32, 6), cfg, tmp_path)
    Z = train.encode_latents(tok, data, torch.device("cpu"), "fp32", tmp_path / "Z", batch_size=4)
    path = tmp_path / "Z" / "Z.npy"
    if damage == "other shape":
        np.save(path, np.zeros((5, *Z.shape[1:]), np.float32))
    else:
        raw = path.read_bytes()
        path.write_bytes(b"garbage" if damage == "garbage" else raw[:-4])
    message = raises_one_line(r"Z\.npy: ", train.encode_latents, tok, data, torch.device("cpu"), "fp32",
                              tmp_path / "Z", batch_size=4)
    assert "delete" in message and str(tmp_path / "Z") in message
