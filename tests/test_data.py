"""Embedded shapes set, JSONL layout, text encoder and embedding cache."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import text_encoder
from config import OFFLINE_TEXT_ENCODER
from data import JsonlDataset, class_caption_pool, make_datasets, split_indices
from embedded_sets import SHAPES, ShapesDataset, render
from runtime.errors import InputError
from text_encoder import TextEncoder, cached_text_embeddings


def test_shapes_dataset_is_deterministic_and_captioned():
    a, b = ShapesDataset("train", 32, 16), ShapesDataset("train", 32, 16)
    assert a.captions == b.captions and a.labels == b.labels
    assert torch.equal(a[3]["image"], b[3]["image"])
    item = a[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    for cap, scene, label in zip(a.captions, a.scenes, a.labels):
        assert SHAPES[label] == scene["objects"][0]["shape"]
        for o in scene["objects"]:
            assert f"{o['size']} {o['colour']} {o['shape']}" in cap
        assert scene["background"] in cap


def test_images_hold_detail_the_caption_does_not_state():
    """Two scenes with identical captions still render differently (jitter, rotation, shading, noise)."""
    ds = ShapesDataset("train", 32, 400)
    seen = {}
    for i, c in enumerate(ds.captions):
        if c in seen:
            assert not np.array_equal(render(ds.scenes[i], 32), render(ds.scenes[seen[c]], 32))
            return
        seen[c] = i
    pytest.fail("no two scenes shared a caption in 400 draws")


def test_splits_do_not_share_seeds():
    train, val = make_datasets(None, size=16, num_images=64)
    assert len(val) == 64
    assert all(not torch.equal(train[i]["image"], val[i]["image"]) for i in range(8))
    pool = class_caption_pool(None, num_classes=8, per_class=4)
    assert sorted(pool) == list(range(8)) and all(len(v) == 4 for v in pool.values())
    assert pool[0][0] not in set(train.captions)


def test_split_indices_fixed_and_disjoint():
    tr, va = split_indices(100, 0.1, seed=0)
    assert len(va) == 10 and not set(tr) & set(va) and sorted(tr + va) == list(range(100))
    assert (tr, va) == split_indices(100, 0.1, seed=0)


def write_folder(root, rows, size=(40, 30)):
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(root / "img" / f"{i}.png")
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_jsonl_layout_center_crops_and_resizes(tmp_path):
    write_folder(tmp_path, [{"image": f"img/{i}.png", "caption": f"gray {i}", "label": i} for i in range(3)])
    ds = JsonlDataset(tmp_path, 16)
    assert ds.captions == ["gray 0", "gray 1", "gray 2"] and ds.labels.tolist() == [0, 1, 2]
    assert ds[1]["image"].shape == (3, 16, 16)
    assert torch.allclose(ds[1]["image"], torch.full((3, 16, 16), 40 / 127.5 - 1))


def test_jsonl_errors_name_the_file(tmp_path):
    write_folder(tmp_path, [{"image": "img/0.png", "caption": "  "}])
    with pytest.raises(ValueError, match=r"captions.jsonl:1: missing or empty caption for img/0.png"):
        JsonlDataset(tmp_path, 16)
    write_folder(tmp_path, [{"image": "img/0.png", "caption": "ok"}, {"image": "img/9.png", "caption": "gone"},
                            {"image": "img/bad.png", "caption": "corrupt"}])
    (tmp_path / "img" / "bad.png").write_bytes(b"not a png at all")
    ds = JsonlDataset(tmp_path, 16)
    with pytest.raises(FileNotFoundError, match=r"9.png: image file not found"):
        ds[1]
    with pytest.raises(ValueError, match=r"bad.png: cannot read image"):
        ds[2]
    with pytest.raises(FileNotFoundError, match="captions.jsonl: not found"):
        JsonlDataset(tmp_path / "nowhere", 16)


def test_offline_text_encoder_is_real_and_per_token():
    enc = TextEncoder(OFFLINE_TEXT_ENCODER, max_length=16)
    emb, mask = enc(["a red circle in the center", "a red circle in the center, on a navy background"])
    assert emb.shape == (2, 16, 384) and mask.shape == (2, 16)
    assert mask[0].sum() < mask[1].sum() < 16
    assert (emb[0][~mask[0]] == 0).all()
    # Real weights: the same words get the same per-token vectors whatever the batch, and distinct captions differ.
    alone, _ = enc(["a red circle in the center"])
    torch.testing.assert_close(alone[0], emb[0], atol=1e-4, rtol=1e-4)
    a, b = emb[0, 1], enc(["a blue square"])[0][0, 1]
    assert torch.cosine_similarity(a, b, dim=0) < 0.99
    with pytest.raises(ValueError, match="caption 1 is empty"):
        enc(["fine", " "])


def test_missing_weights_give_one_clear_error():
    with pytest.raises(InputError, match=r"^text encoder '/nonexistent/t5-v1_1-xl': no such folder$"):
        TextEncoder("/nonexistent/t5-v1_1-xl")


def test_embedding_cache_computes_once(tmp_path, monkeypatch):
    caps = ["a red circle", "a small blue star at the top", "a green ring"]
    emb, mask = cached_text_embeddings(OFFLINE_TEXT_ENCODER, 16, caps, tmp_path, batch_size=2)
    assert emb.shape == (3, 16, 384) and emb.dtype == np.float16 and mask.dtype == bool
    direct, direct_mask = TextEncoder(OFFLINE_TEXT_ENCODER, 16)(caps[2:])  # the second batch, read back row by row
    assert np.array_equal(emb[2], direct[0].half().numpy()) and np.array_equal(mask[2], direct_mask[0].numpy())
    monkeypatch.setattr(text_encoder, "TextEncoder", lambda *a, **k: pytest.fail("encoder ran again"))
    emb2, _ = cached_text_embeddings(OFFLINE_TEXT_ENCODER, 16, caps, tmp_path)
    assert np.array_equal(emb.read(0, 3), emb2.read(0, 3))
    assert [p.name for p in tmp_path.iterdir()] == [emb.path.parent.name]  # one store, no leftovers
    assert sorted(p.name for p in emb.path.parent.iterdir()) == ["emb.npy", "mask.npy"]


def test_scan_reports_bad_files_and_their_count(tmp_path):
    rows = [{"image": f"img/{i}.png", "caption": f"gray {i}"} for i in range(3)]
    rows += [{"image": f"img/missing{i}.png", "caption": "gone"} for i in range(12)]
    write_folder(tmp_path, rows)
    (tmp_path / "img" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(InputError, match=r"captions.jsonl: 13 of 15 listed images are bad: .*1.png: cannot read image"
                                         r".*missing0.png: image file not found.*; \.\.\.$"):
        JsonlDataset(tmp_path, 16).scan()
    JsonlDataset(tmp_path, 16, indices=[0, 2]).scan()  # the good subset passes


def test_class_caption_pool_errors_name_the_line(tmp_path):
    (tmp_path / "class_captions.jsonl").write_text('{"label": 0, "caption": "a dog"}\n{"caption": "no label"}\n')
    with pytest.raises(InputError, match=r"class_captions.jsonl:2: expected"):
        class_caption_pool(tmp_path)


def test_one_object_sets_are_deterministic_and_the_caption_fixes_the_layout():
    from embedded_sets import OBJECT_SETS, ObjectDataset
    for family in OBJECT_SETS:
        a, b = ObjectDataset(family, "val", 32, 12), ObjectDataset(family, "val", 32, 12)
        assert np.array_equal(a.images, b.images) and a.captions == b.captions and a.labels == b.labels
        assert a.images.shape == (12, 32, 32, 3) and a.masks.shape == (12, 32, 32)
        for cap, scene, label, mask in zip(a.captions, a.scenes, a.labels, a.masks):
            assert OBJECT_SETS[family][label] == scene["object"]
            for part in (scene["object"], scene["colour"], scene["place"], scene["background"]):
                assert part in cap
            assert 0.05 < (mask > 0.5).mean() < 0.7  # one large object
        assert not np.array_equal(a.images, ObjectDataset(family, "train", 32, 12).images)


def test_one_object_caption_styles_and_class_pool_name_the_class():
    """Tab. 4a's caption styles on a one-object set, and class-conditional sampling's held-out captions per class."""
    from embedded_sets import OBJECT_SETS, ObjectDataset, object_caption
    full, short, name = (ObjectDataset("glyphs", "val", 32, 8, captions=c) for c in ("full", "short", "class"))
    assert np.array_equal(full.images, short.images) and full.identity() != short.identity() != name.identity()
    for scene, f, s, c in zip(full.scenes, full.captions, short.captions, name.captions):
        assert f == object_caption(scene) and scene["place"] in f and scene["place"] not in s
        assert s.startswith(f"A {scene['colour']} ") and scene["colour"] not in c and scene["object"] in c
    for family in OBJECT_SETS:
        classes = len(OBJECT_SETS[family])
        pool = class_caption_pool(None, num_classes=classes, per_class=3, family=family)
        assert sorted(pool) == list(range(classes)) and all(len(v) == 3 for v in pool.values())
        for label, captions in pool.items():  # each caption names its class's object
            name = OBJECT_SETS[family][label]
            assert all(f" {name} " in c or f" {name}," in c for c in captions), (label, captions)
    with pytest.raises(InputError, match="8 classes, not 9"):
        class_caption_pool(None, num_classes=9, family="one-shape")


def test_shuffled_captions_move_every_caption_the_same_way_each_time():
    train, val = make_datasets(family="glyphs", num_images=64)
    s_train, s_val = make_datasets(family="glyphs", num_images=64, shuffle_captions=True)
    again = make_datasets(family="glyphs", num_images=64, shuffle_captions=True)[0]
    for plain, shuffled in ((train, s_train), (val, s_val)):
        assert sorted(shuffled.captions) == sorted(plain.captions)  # the same text, other images
        assert all(shuffled.captions[i] != plain.captions[i] or plain.captions.count(plain.captions[i]) > 1
                   for i in range(len(plain)))
        assert (shuffled.perm != np.arange(len(plain))).all()  # a derangement: no image keeps its caption
        assert shuffled.labels == plain.labels and np.array_equal(shuffled.masks, plain.masks)
        assert torch.equal(shuffled[5]["image"], plain[5]["image"])
    assert again.captions == s_train.captions  # seeded: the same pairing in every run
    assert not np.array_equal(s_train.perm[:64], s_val.perm)  # each split has its own permutation
    assert s_train.identity() != train.identity()  # never shares a latent cache with the real pairing


def many_lines(root, M, files=4):
    """A JSONL folder of M lines over `files` tiny images (line i shows image i % files), labels i % 10."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    for k in range(files):
        Image.new("RGB", (8, 8), (60 * k, 0, 0)).save(root / "img" / f"{k}.png")
    with open(root / "captions.jsonl", "w") as f:
        for i in range(M):
            f.write(json.dumps({"image": f"img/{i % files}.png", "caption": f"caption number {i}", "label": i % 10})
                    + "\n")


def held_by(build):
    """(Python objects the garbage collector tracks, bytes allocated) that `build()`'s result holds."""
    import gc
    import tracemalloc
    gc.collect()
    before = len(gc.get_objects())
    tracemalloc.start()
    kept = build()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return len(gc.get_objects()) - before, held, kept


def test_a_jsonl_set_holds_no_python_object_per_line(tmp_path):
    """Paths, captions, lines and labels are packed arrays: the objects and bytes the two splits hold do not grow
    per line beyond the caption and path text (a DataLoader worker that reads them copies nothing)."""
    many_lines(tmp_path / "small", 200)
    many_lines(tmp_path / "large", 4200)
    small, large = (held_by(lambda: make_datasets(tmp_path / name, size=8)) for name in ("small", "large"))
    assert large[0] - small[0] < 50  # Python objects: not one per line
    text = sum(len(f"img/{i % 4}.png caption number {i}") for i in range(200, 4200))
    assert large[1] - small[1] < text + 4000 * 8 * 8  # the text, and 7 int64 per line (index, line, label, offsets)
    train, val = large[2]
    assert isinstance(train.labels, np.ndarray) and train.labels.dtype == np.int64 and len(train) + len(val) == 4200
    i = int(train.indices[7])
    assert train.captions[7] == f"caption number {i}" and train.files[7] == tmp_path / "large" / f"img/{i % 4}.png"
    assert train.labels[7] == i % 10 and train.lines[7] == i + 1


def test_captions_jsonl_is_read_once_for_both_splits(tmp_path, monkeypatch):
    import builtins
    import io
    many_lines(tmp_path, 30)
    opened, real = [], io.open

    def counting_open(file, *args, **kwargs):
        if str(file).endswith("captions.jsonl"):
            opened.append(file)
        return real(file, *args, **kwargs)
    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(builtins, "open", counting_open)
    train, val = make_datasets(tmp_path, size=8)
    assert len(opened) == 1 and len(train) == 27 and len(val) == 3


def test_jsonl_identity_is_the_hash_it_always_was(tmp_path):
    """identity() (the latent cache's key) keeps its value: the sha1 of captions.jsonl's sha1, the selected rows as a
    Python list, the size, and each image's path, size and mtime."""
    import hashlib
    many_lines(tmp_path, 12)
    path = tmp_path / "captions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]

    def old_identity(indices, size):
        h = hashlib.sha1(f"{hashlib.sha1(path.read_bytes()).hexdigest()}|{indices}|{size}".encode())
        for i in indices:
            f = tmp_path / rows[i]["image"]
            h.update(f"|{f}|{f.stat().st_size}|{f.stat().st_mtime_ns}".encode())
        return f"{tmp_path.name}-{h.hexdigest()[:16]}"
    train, val = make_datasets(tmp_path, size=8)
    assert train.identity() == old_identity(split_indices(12)[0], 8)
    assert val.identity() == old_identity(split_indices(12)[1], 8)
    assert JsonlDataset(tmp_path, 16).identity() == old_identity(list(range(12)), 16)


def test_captions_round_trip_any_text(tmp_path):
    """Captions and paths come back as written: non-ASCII, U+2028, a lone surrogate escaped in JSON."""
    many_lines(tmp_path, 1)
    texts = ["café au lait", "line\u2028separator", "lone \ud800 surrogate", "日本語のキャプション"]
    with open(tmp_path / "captions.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"image": "img/0.png", "caption": t}) + "\n")
    ds = JsonlDataset(tmp_path, 8)
    assert list(ds.captions) == texts and ds.captions == texts and ds.labels.tolist() == [-1] * 4
    assert ds.captions[1:3] == texts[1:3] and ds.captions[np.array([3, 0])] == [texts[3], texts[0]]


def test_shuffled_captions_of_a_jsonl_set_stay_packed(tmp_path):
    many_lines(tmp_path, 40)
    plain, _ = make_datasets(tmp_path, size=8)
    shuffled, _ = make_datasets(tmp_path, size=8, shuffle_captions=True)
    assert type(shuffled.captions) is type(plain.captions)  # a view of the same buffer, no list of strings
    assert sorted(shuffled.captions) == sorted(plain.captions) and shuffled.captions != plain.captions
    assert all(shuffled.captions[i] == plain.captions[j] for i, j in enumerate(shuffled.perm))


def test_a_second_launch_neither_scans_nor_restats_the_images(tmp_path, monkeypatch):
    """Issue 31: the header scan runs once per data set (a record in --cache-dir under the data set's identity), and
    a launch stats each image once (the identity, shared by the scan record and stage 2's latent cache key); an image
    replaced in place (its size or mtime changes) is scanned again."""
    import pathlib
    from types import SimpleNamespace

    import PIL.Image
    import train
    from conftest import tiny_config
    folder = tmp_path / "data"
    write_folder(folder, [{"image": f"img/{i % 3}.png", "caption": f"c {i}"} for i in range(3)])
    args = SimpleNamespace(data=str(folder), val=None, num_images=0, captions="full", set="shapes", preset="tiny",
                           shuffle_captions=False, stage="dit", cache_dir=str(tmp_path / "cache"), text_cache="on",
                           precision="fp32", download=False)
    cfg, cpu = tiny_config(conditioning="none", image_size=8, patch_size=4), torch.device("cpu")
    train.datasets_for(args, cfg, cpu)  # the first launch scans
    opened, stated, real_open, real_stat = [], [], PIL.Image.open, pathlib.Path.stat
    monkeypatch.setattr(PIL.Image, "open", lambda f, *a, **k: opened.append(f) or real_open(f, *a, **k))
    monkeypatch.setattr(pathlib.Path, "stat", lambda p, *a, **k: (stated.append(p) if p.suffix == ".png" else None)
                        or real_stat(p, *a, **k))
    train_set, _ = train.datasets_for(args, cfg, cpu)
    train_set.items.identity()  # stage 2's latent cache key
    assert opened == [] and len(stated) == 3  # train 2 + val 1, once each
    (folder / "img" / "1.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"1\.png: cannot read image"):
        train.datasets_for(args, cfg, cpu)
