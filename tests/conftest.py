"""Shared fixtures: tiny configs and a cached batch of embedded images with real MiniLM text embeddings."""
import json

import pytest
import torch
from PIL import Image

from conditions import Conditioned, collate
from config import OFFLINE_TEXT_ENCODER, TexTokConfig
from embedded_sets import ShapesDataset


torch.set_num_threads(1)  # tiny tensors: one thread is as fast and immune to oversubscription


def tiny_config(**overrides) -> TexTokConfig:
    """A TexTok small enough for CPU tests (32 px, patch 4, width 64, 1+1 layers)."""
    base = dict(image_size=32, patch_size=4, width=64, enc_layers=1, dec_layers=1, heads=4, mlp_dim=128,
                num_tokens=8, text_encoder=OFFLINE_TEXT_ENCODER, text_dim=384, text_len=32, num_classes=8)
    return TexTokConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def text_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text_cache")


@pytest.fixture(scope="session")
def batch(text_cache):
    """8 embedded 32 px images with their condition: labels and the captions' real all-MiniLM-L6-v2 embeddings
    (32 tokens), as {"image", "index", "cond"}."""
    ds = Conditioned.for_model(ShapesDataset("train", 32, 8), tiny_config(), text_cache)
    return collate([ds[i] for i in range(8)])


def train_and_val_folders(root) -> None:
    """ROOT/train (10 images) and ROOT/val (2 images): tiny 8 px captioned --data and --val folders."""
    for name, n in (("train", 10), ("val", 2)):
        (root / name).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(root / name / f"{i}.png")
        (root / name / "captions.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "caption": f"c{i}"})
                                                            + "\n" for i in range(n)))
