"""Captions an image folder with a local vision-language model (App. D) into its captions.jsonl (data.py's layout).

    python tools/caption.py /data/imagenet/train --vlm Qwen/Qwen2.5-VL-7B-Instruct --class-names LOC_synset_mapping.txt
    torchrun --nproc_per_node 8 tools/caption.py /data/imagenet/train --vlm Qwen/Qwen2.5-VL-7B-Instruct \\
        --class-names LOC_synset_mapping.txt

Layouts: ImageNet's DIR/<synset>/<image> (label = the synset's index among the sorted synset folders, as
torchvision's ImageFolder and the ImageNet class ids) or a flat DIR/<image> (no labels). The model (any
`AutoModelForImageTextToText` of transformers: a hub name or a local folder; none is bundled) sees the center crop that
training sees. Chat models get App. D's prompt, with the class name from --class-names (ImageNet's
LOC_synset_mapping.txt, `n01440764 tench, Tinca tinca` per line: the first name) or the folder name; plain captioners
(BLIP, GIT: no chat template) caption without a prompt.

Resumable: each rank appends whole lines to OUT.part-RANK (flush + fsync per batch), so a killed run loses at most one
batch; a rerun trims a torn last line and skips every image already captioned in OUT or any part file (any number of
ranks). When all ranks are done, rank 0 merges OUT and the parts into OUT sorted by image path (atomically) and removes
the parts.
"""
import argparse
import json
import os
import re
from datetime import timedelta
from pathlib import Path

import sys
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `python tools/caption.py`
from data import IMAGE_SUFFIXES, jsonl_image_path, jsonl_line, load_image
from runtime.distributed import setup_distributed
from runtime.errors import InputError, MissingInput, run_main, worker_errors
from runtime.files import atomic_write, open_own, read_lines
from text_encoder import refuse_remote_code


REMOTE_CODE_ADVICE = "pass --trust-remote-code to run it (it runs as you: read it first)"
# App. D: the prompt fed to Gemini v1.5 Flash for ImageNet (the image follows it); 75 words by default (§4.1).
PROMPT = ("Describe an image of a {class_name} from the ImageNet dataset in a single continuous detailed paragraph, "
          "using no more than {word_count} words. Include descriptions of the appearance, colors, textures, size, "
          "environment, and any notable features or actions. Make sure to provide a vivid and engaging description "
          "that captures the essence of the {class_name}. Output only the description without any additional words "
          "or commentary and the description must not exceed {word_count} words.")
# The same prompt for a flat folder, where there is no class to name.
FLAT_PROMPT = ("Describe this image in a single continuous detailed paragraph, using no more than {word_count} words. "
               "Include descriptions of the appearance, colors, textures, size, environment, and any notable features "
               "or actions. Make sure to provide a vivid and engaging description. Output only the description "
               "without any additional words or commentary and the description must not exceed {word_count} words.")


def list_images(root) -> tuple[list, list | None, list | None]:
    """(image paths relative to `root`, labels, class folder names) of ImageNet's synset layout, or (paths, None,
    None) for a flat folder; paths sorted."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInput(f"{root}: no such folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        files, labels = [], []
        for label, name in enumerate(classes):
            found = sorted(f"{name}/{p.name}" for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [label] * len(found)
    else:
        files, labels = sorted(p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), None
    if not files:
        raise InputError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it or its class folders")
    return files, labels, classes or None


def class_names(path, classes) -> list:
    """The class name of each class folder: from ImageNet's LOC_synset_mapping.txt format (`synset name, ...` per
    line: its first name), else the folder name with underscores as spaces (WordNet ids then need the file)."""
    if path is None:
        if any(re.fullmatch(r"n\d{8}", c) for c in classes):
            raise InputError(f"class folders are WordNet ids ({classes[0]}, ...): give --class-names FILE (ImageNet's "
                             "LOC_synset_mapping.txt: `n01440764 tench, Tinca tinca` per line)")
        return [c.replace("_", " ") for c in classes]
    if not Path(path).is_file():
        raise MissingInput(f"{path}: class-name file not found")
    names = {}
    for line in read_lines(path):
        if line.strip():
            synset, _, rest = line.strip().partition(" ")
            names[synset] = rest.split(",")[0].strip() or synset
    missing = [c for c in classes if c not in names]
    if missing:
        raise InputError(f"{path}: no name for {len(missing)} class folders ({', '.join(missing[:5])}, ...)")
    return [names[c] for c in classes]


class Captioner:
    """A transformers image-text-to-text model with its processor: `captioner(images, prompts)` -> captions
    (greedy decoding). Chat models get each prompt through their chat template; others caption without one. The
    weights come from a local folder or the hub cache, and from the hub only with `download`; only safetensors
    weights are read, and the model's own code (auto_map) runs only with `trust_remote_code`."""

    def __init__(self, name: str, device="cpu", dtype: str = "auto", max_new_tokens: int = 160,
                 download: bool = False, trust_remote_code: bool = False):
        dtype = {"auto": torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32,
                 "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        self.processor, self.model = load_model(name, dtype, download, trust_remote_code)
        self.model = self.model.to(device).eval()
        self.device, self.max_new_tokens = torch.device(device), max_new_tokens
        self.chat = getattr(self.processor, "chat_template", None) is not None
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # batched decoder-only generation continues from the right end

    @torch.inference_mode()
    def __call__(self, images: list, prompts: list) -> list:
        if self.chat:
            texts = [self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                add_generation_prompt=True, tokenize=False) for p in prompts]
            inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        inputs = {k: v.to(self.device, self.model.dtype if v.is_floating_point() else None) for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if "input_ids" in inputs and not self.model.config.is_encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1]:]  # decoder-only: the prompt comes back first
        return [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def load_model(name: str, dtype, download: bool, trust_remote_code: bool):
    """(processor, model) of an image-text-to-text model: safetensors weights only, its own code only if trusted;
    whatever cannot be loaded is one InputError naming the model."""
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoModelForImageTextToText, AutoProcessor
    if not trust_remote_code:
        refuse_remote_code(name, REMOTE_CODE_ADVICE)
    hub = {"local_files_only": not download, "trust_remote_code": trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(name, **hub)
        return processor, AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, use_safetensors=True, **hub)
    except OSError as e:
        if "safetensors" in str(e):
            raise InputError(f"{name}: no safetensors weights; only safetensors are read (pickled weights, as "
                             "pytorch_model.bin, can run code): convert them to model.safetensors") from None
        raise missing_model(name) from None
    except HFValidationError:
        raise missing_model(name) from None
    except ValueError as e:  # an architecture the Auto class does not know, or custom code not to run
        if "trust_remote_code" in str(e):
            raise InputError(f"{name}: names custom model code (auto_map), which is not run; "
                             f"{REMOTE_CODE_ADVICE}") from None
        raise InputError(f"{name}: not an image-text-to-text model transformers can load "
                         f"({str(e).splitlines()[0]})") from None


def missing_model(name: str) -> MissingInput:
    """The error for a model that is neither a local folder nor in the hub cache (and no network)."""
    if Path(name).is_absolute() or name.startswith(".") or name.count("/") > 1:
        return MissingInput(f"{name}: no such model folder")
    return MissingInput(f"{name}: model weights not found (not a local folder, not in the Hugging Face cache); "
                        f"download them with `hf download {name}` (or add --download), or pass --vlm PATH of a "
                        "local copy")


class _Images(Dataset):
    """(index, center-cropped PIL image) of the images to caption, read in DataLoader workers."""

    def __init__(self, root, files, todo, size):
        self.root, self.files, self.todo, self.size = Path(root), files, todo, size

    def __len__(self):
        return len(self.todo)

    def __getitem__(self, i):
        return self.todo[i], Image.fromarray(load_image(self.root / self.files[self.todo[i]], self.size))


def _transpose(items):
    return list(zip(*items))


def read_rows(path):
    """Yields (image, line) for the complete lines of a captions file (a torn last line, without its newline, is
    left out)."""
    if not Path(path).is_file():
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n") or not line.strip():
                continue
            try:
                yield json.loads(line)["image"], line
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{path}:{n}: not a captions.jsonl line ({e}); remove it to resume") from None


def part_files(out) -> list:
    return sorted(Path(out).parent.glob(f"{Path(out).name}.part-*"))


def trim_torn_line(path) -> None:
    """Cuts a last line that a killed writer left without its newline."""
    path = Path(path)
    if path.is_file() or path.is_symlink():
        with open(open_own(path, os.O_RDWR), "r+b") as f:  # never through a symbolic link
            data = f.read()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                f.truncate(keep)


def caption_share(root, out, files, labels, prompts, captioner, rank=0, world=1, batch_size=16, size=512,
                  workers=4, progress=True) -> int:
    """Captions this rank's share (every world-th image) of those not yet in `out` or its part files, appending
    whole lines to `out`.part-RANK, one fsync per batch. `prompts`: one per class (by label), or one for a flat
    folder. Returns the number of images written; images whose caption comes back empty are left out (and counted in
    a warning)."""
    out = Path(out)
    part = out.parent / f"{out.name}.part-{rank:05d}"
    trim_torn_line(part)
    done = {image for p in [out, *part_files(out)] for image, _ in read_rows(p)}
    todo = [i for i in range(rank, len(files), world) if jsonl_image_path(root, out, files[i]) not in done]
    loader = DataLoader(_Images(root, files, todo, size), batch_size, num_workers=workers,
                        collate_fn=_transpose)
    written = empty = 0
    appended = open_own(part, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # never through a symbolic link
    with open(appended, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc=f"caption (rank {rank})", unit="img",
                                                          disable=not progress) as bar:
        for index, images in worker_errors(loader):
            captions = captioner(list(images), [prompts[0 if labels is None else labels[i]] for i in index])
            lines = [jsonl_line(jsonl_image_path(root, out, files[i]), c, None if labels is None else labels[i])
                     for i, c in zip(index, captions) if c]
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            written, empty = written + len(lines), empty + len(index) - len(lines)
            bar.update(len(index))
    if empty:
        print(f"warning: rank {rank}: {empty} images got an empty caption and are not in {part.name}; "
              "a rerun tries them again")
    return written


def merge_parts(out) -> int:
    """Merges `out` and its part files into `out`, one line per image sorted by path (atomically), then removes the
    parts. Returns the number of lines."""
    out = Path(out)
    parts = part_files(out)
    rows = {image: line for p in [out, *parts] for image, line in read_rows(p)}
    atomic_write(out, lambda tmp: Path(tmp).write_text("".join(rows[k] for k in sorted(rows)), encoding="utf-8"))
    for p in parts:
        p.unlink()
    return len(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Caption an image folder with a vision-language model (App. D) into "
                                                 "captions.jsonl; resumable, sharded over torchrun ranks")
    parser.add_argument("images", help="image folder: DIR/<class>/<image> (labelled) or DIR/<image>")
    parser.add_argument("--vlm", required=True, help="transformers image-text-to-text model: hub name or local "
                                                       "folder (e.g. Qwen/Qwen2.5-VL-7B-Instruct)")
    parser.add_argument("--out", help="captions file (default: IMAGES/captions.jsonl, what --data IMAGES reads)")
    parser.add_argument("--class-names", help="LOC_synset_mapping.txt-style file: `<folder> <name>, ...` per line")
    parser.add_argument("--words", type=int, default=75, help="the prompt's word limit ({word_count}; §4.1: 75)")
    parser.add_argument("--prompt", help="prompt template with {word_count} (and {class_name} for class folders); "
                                         "default: App. D's")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="images per batch over all ranks (each rank: its share)")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--size", type=int, default=512, help="the center crop's side shown to the model")
    parser.add_argument("--workers", type=int, default=4, help="image-decoding DataLoader workers per rank")
    parser.add_argument("--download", action="store_true", help="fetch --model from the Hugging Face hub if it is "
                                                                   "not in the local cache")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the Python code a --vlm folder names (auto_map); it runs as you: read it first")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="auto: bf16 on CUDA, fp32 on CPU")
    args = parser.parse_args(argv)
    files, labels, classes = list_images(args.images)
    out = Path(args.out or Path(args.images) / "captions.jsonl")
    template = args.prompt or (PROMPT if classes else FLAT_PROMPT)
    names = class_names(args.class_names, classes) if classes else None
    try:
        prompts = [template.format(word_count=args.words, class_name=name) for name in names or [""]]
    except (KeyError, IndexError) as e:
        raise InputError(f"--prompt: unknown placeholder {e}; use {{word_count}} and {{class_name}}") from None
    except ValueError as e:  # a lone brace: str.format's own syntax error
        raise InputError(f"--prompt: not a format template ({e}); write a literal brace as {{{{ or }}}}") from None
    rank, world, device = setup_distributed()
    # The end waits for the slowest rank: a gloo group with a timeout no captioning run reaches.
    group = dist.new_group(backend="gloo", timeout=timedelta(days=30)) if world > 1 else None
    captioner = Captioner(args.vlm, device, args.dtype, args.max_new_tokens, args.download, args.trust_remote_code)
    per_rank = -(-args.batch_size // world)  # --batch-size is over all ranks, as train.py's
    caption_share(args.images, out, files, labels, prompts, captioner, rank, world, per_rank, args.size,
                  args.workers, progress=rank == 0)
    if world > 1:
        dist.barrier(group=group)
    if rank == 0:
        n = merge_parts(out)
        print(f"{out}: {n} of {len(files)} images captioned")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
