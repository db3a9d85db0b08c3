"""Speed on one device in one run: inference time per image (Table 5 / Fig. 4 analogue) and tokenizer training
throughput against the same encoder-decoder built from timm's ViT blocks.

Inference, at each resolution, all models with random weights (speed does not depend on them):
  TexTok-N + DiT   text encoding, tokenization, detokenization and DDIM sampling of N tokens. As Table 5,
                   "tokenization" = text + tokenize + detokenize and "generation" = sampling + text + detokenize.
  SD-VAE + DiT/2   the original DiT over the 2D latent, DDIM sampling only: the SD-VAE decoder is not available
                   offline, so the baseline's generation time leaves it out and the speed-up is a lower bound.
On CUDA both DiTs run compiled with CUDA graphs (torch.compile mode="reduce-overhead"; --no-compile for eager), so
sampling is compute-bound, not launch-bound. "speed-up / FLOP ratio" divides the measured generation speed-up by the
ratio of generation FLOPs per image (matmul, conv and attention FLOPs counted by torch.utils.flop_counter): 1.0 is
the speed-up the FLOPs alone allow.
Training: images/s and peak memory of one TexTok training step (steps.generator_step: l2 loss, Adam, App. C)
beside the identical architecture built from `timm` ViT `Block`s (a bench-only dependency: pip install timm); ours
should be at least as fast. On CUDA, model FLOPs utilisation (MFU) of TexTok-Base in bf16 as well.

    python bench/speed.py                 # CPU default, a few minutes: TexTok-Small-32, DiT-S, 4 DDIM steps, batch 2
    python bench/speed.py --resolutions 256 --repeats 1 --timed-steps 1   # CPU, the smallest run (~1 minute)
    python bench/speed.py --paper         # GPU: TexTok-Base, DiT-XL, 250 DDIM steps, batch 32, N = 32 64 128 256
    python bench/speed.py --paper --text-encoder /path/to/t5-v1_1-xl   # the paper's text encoder (§4.1)

Writes OUT/speed.md (the tables, command and machine) and OUT/speed.json, and prints the tables.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import best_seconds, machine  # noqa: E402

from conditions import Cond  # noqa: E402
from config import MODEL_PRESETS, OFFLINE_TEXT_ENCODER, TexTokConfig, TokenizerTrainConfig  # noqa: E402
from diffusion import Diffusion  # noqa: E402
from dit import DIT_SIZES, DiT, DiTConfig  # noqa: E402
from embedded_sets import ShapesDataset  # noqa: E402
from runtime.distributed import autocast  # noqa: E402
from runtime.errors import run_main  # noqa: E402
from runtime.files import atomic_write, save_json  # noqa: E402
from steps import generator_step  # noqa: E402
from text_encoder import TextEncoder  # noqa: E402
from textok import TexTok  # noqa: E402
from tokenizer import patchify, unpatchify  # noqa: E402


# Flag defaults: a CPU run of a few minutes, or the paper's sizes (Table 5 / Fig. 4: TexTok-Base, DiT-XL,
# DDIM 250 steps, batch 32; N from Table 1).
CPU_DEFAULTS = dict(tokens=[32], model_size="small", dit="DiT-S", sampling_steps=4, batch_size=2,
                    train_batch_size=2, train_steps=2)
PAPER_DEFAULTS = dict(tokens=[32, 64, 128, 256], model_size="base", dit="DiT-XL", sampling_steps=250, batch_size=32,
                      train_batch_size=32, train_steps=20)
# Dense bf16 peak of the accelerator, for MFU (vendor datasheets); the first matching name wins.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", action="store_true", help="the paper's sizes (for a GPU) as defaults of the flags below")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    p.add_argument("--num-tokens", type=int, nargs="+", help="TexTok token counts N")
    p.add_argument("--model-size", choices=sorted(MODEL_PRESETS), help="TexTok size (Tab. 4e)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="TexTok patch size; default: a 32x32 patch grid (App. C: 8 at 256 px, 16 at 512 px)")
    p.add_argument("--model", choices=sorted(DIT_SIZES), help="generator size, the same for both systems")
    p.add_argument("--sampling-steps", type=int, help="DDIM steps (App. C: 250)")
    p.add_argument("--batch-size", type=int, help="inference batch (Table 5: 32)")
    p.add_argument("--text-encoder", default=OFFLINE_TEXT_ENCODER,
                   help="HF name or local folder (the paper: T5-XL at 256 px, T5-XXL at 512 px)")
    p.add_argument("--text-len", type=int, default=128, help="N_t (§4.1: 128)")
    p.add_argument("--train-size", type=int, default=256, help="image size of the training-throughput rows")
    p.add_argument("--train-tokens", type=int, default=128, help="N of the training-throughput rows (§4.7: 128)")
    p.add_argument("--train-batch-size", type=int)
    p.add_argument("--timed-steps", type=int, help="timed training steps per repeat")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up; the best is kept")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--no-compile", action="store_true",
                   help="on CUDA, run the DiTs eagerly instead of torch.compile(mode='reduce-overhead') (CUDA graphs)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="accelerator bf16 peak for MFU (default: the known GPUs in PEAK_BF16_FLOPS)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="runs/bench/speed")
    args = p.parse_args(argv)
    for k, v in (PAPER_DEFAULTS if args.paper else CPU_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def count_flops(fn) -> int:
    """Matmul, conv and attention FLOPs of one call of fn (torch.utils.flop_counter; elementwise ops not counted)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def textok_config(args, size: int, tokens: int, text_dim: int) -> TexTokConfig:
    """TexTok of the chosen size (Tab. 4e) at `size` px with N = `tokens`, text in context on both sides (§3.2)."""
    return TexTokConfig(image_size=size, patch_size=args.patch_size or max(1, size // 32), num_tokens=tokens,
                        text_encoder=args.text_encoder, text_dim=text_dim, text_len=args.text_len,
                        **MODEL_PRESETS[args.model_size])


@torch.inference_mode()
def inference_rows(args, size: int, encoder: TextEncoder, device, bar) -> list:
    """Seconds and FLOPs per image of each stage, TexTok-N + DiT for every N and SD-VAE + DiT/2, at `size` px."""
    B, steps = args.batch_size, args.sampling_steps
    captions = ShapesDataset("val", num_images=B).captions  # padded to N_t, so their length does not matter
    images = torch.rand(B, 3, size, size, device=device) * 2 - 1
    labels = torch.randint(0, 1000, (B,), device=device)
    diffusion = Diffusion()  # App. C: 1000 steps, linear schedule, v-prediction

    def sampling(dit, shape):
        """(seconds per image, FLOPs per image) of DDIM sampling with `dit` over tokens of `shape`."""
        x, t = torch.zeros(shape, device=device), torch.zeros(B, dtype=torch.long, device=device)
        flops = steps * count_flops(lambda: dit(x, t, Cond(label=labels))) / B
        if args.compile_dit:
            torch.compiler.reset()  # each DiT compiles afresh: static shapes, no recompile limit across rows
            dit = torch.compile(dit, mode="reduce-overhead")  # compiles and records in best_seconds' warm-up call

        def run():
            return diffusion.ddim_sample(lambda x, t: dit(x, t, Cond(label=labels)), shape, steps, device)

        return best_seconds(run, args.repeats, device) / B, flops

    rows = []
    with autocast(device, args.precision):
        text_s = best_seconds(lambda: encoder(captions), args.repeats, device) / B
        text_flops = count_flops(lambda: encoder(captions)) / B
        text, mask = encoder(captions)
        for N in args.num_tokens:
            bar.set_postfix_str(f"{size} px, TexTok-{N} + {args.model}")
            torch.manual_seed(0)
            model = TexTok(textok_config(args, size, N, encoder.dim)).to(device).eval()
            Z = model.encode(images, Cond(text, mask))
            tok_s = best_seconds(lambda: model.encode(images, Cond(text, mask)), args.repeats, device) / B
            detok_s = best_seconds(lambda: model.decode(Z, Cond(text, mask)), args.repeats, device) / B
            detok_flops = count_flops(lambda: model.decode(Z, Cond(text, mask))) / B
            dit = DiT(DiTConfig(num_tokens=N, in_channels=model.cfg.token_dim, **DIT_SIZES[args.model])).to(device).eval()
            dit_s, dit_flops = sampling(dit, (B, N, model.cfg.token_dim))
            rows.append(dict(size=size, system=f"TexTok-{N} + {args.model}", tokens=N, text=text_s, tokenize=tok_s,
                             detokenize=detok_s, dit=dit_s, tokenization=text_s + tok_s + detok_s,
                             generation=dit_s + text_s + detok_s,
                             generation_flops=dit_flops + text_flops + detok_flops))
            del model, dit
            bar.update()
        # The original DiT: DiT/2 over the SD-VAE latent (size/8)^2 x 4. Patch size 2 makes every token a 2x2x4
        # patch, so DiT/2's patch embedding (Conv2d 4 -> hidden, kernel 2, stride 2) is a linear map of 16 channels per
        # token: our DiT over (size/16)^2 tokens of 16 channels computes the same (256 tokens at 256 px, 1024 at
        # 512 px). Its output layer predicts 16 values per token where DiT's also learns the variance (32): negligible.
        bar.set_postfix_str(f"{size} px, SD-VAE + {args.model}/2")
        n2 = (size // 16) ** 2
        dit = DiT(DiTConfig(num_tokens=n2, in_channels=16, **DIT_SIZES[args.model])).to(device).eval()
        base_s, base_flops = sampling(dit, (B, n2, 16))
        rows.append(dict(size=size, system=f"SD-VAE + {args.model}/2 (DiT only)", tokens=n2, text=None, tokenize=None,
                         detokenize=None, dit=base_s, tokenization=None, generation=base_s,
                         generation_flops=base_flops))
        bar.update()
    for row in rows:
        row["speedup"] = base_s / row["generation"]
        row["speedup_per_flop_ratio"] = row["speedup"] / (base_flops / row["generation_flops"])
    return rows


class TimmEncoderDecoder(nn.Module):
    """TexTok's tokenizer + detokenizer (§3.2, text in context on both sides) built from timm's ViT `Block`s: the same
    layers, widths and parameter count, the reference for training throughput."""

    def __init__(self, cfg: TexTokConfig):
        super().__init__()
        from timm.models.vision_transformer import Block
        width, s, hw = cfg.width, cfg.patch_size, cfg.grid ** 2
        self.cfg = cfg

        def blocks(depth):
            return nn.ModuleList(Block(width, cfg.heads, cfg.mlp_dim / width, qkv_bias=True) for _ in range(depth))

        self.patch_embed, self.pos_embed = nn.Linear(3 * s * s, width), nn.Parameter(torch.zeros(1, hw, width))
        self.L = nn.Parameter(torch.zeros(1, cfg.num_tokens, width))
        self.enc_text, self.enc = nn.Linear(cfg.text_dim, width), blocks(cfg.enc_layers)
        self.enc_norm = nn.LayerNorm(width)
        self.to_Z = nn.Linear(width, cfg.token_dim)
        self.P_prime = nn.Parameter(torch.zeros(1, hw, width))
        self.z_proj, self.z_pos = nn.Linear(cfg.token_dim, width), nn.Parameter(torch.zeros(1, cfg.num_tokens, width))
        self.dec_text, self.dec = nn.Linear(cfg.text_dim, width), blocks(cfg.dec_layers)
        self.dec_norm = nn.LayerNorm(width)
        self.to_pixels = nn.Linear(width, 3 * s * s)
        for p in (self.pos_embed, self.L, self.P_prime, self.z_pos):
            nn.init.trunc_normal_(p, std=0.02)

    @staticmethod
    def _vit(blocks, norm, x, T, T_mask):
        """[x, T] through the blocks with padded text keys masked out; returns the outputs at x's positions."""
        S = x.shape[1]
        mask = torch.cat([torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), T_mask], 1)[:, None, None]
        h = torch.cat([x, T], 1)
        for block in blocks:
            h = block(h, attn_mask=mask)
        return norm(h)[:, :S]

    def forward(self, images, cond):
        """images [B, 3, H, W], cond: Cond(text [B, N_t, C], text_mask [B, N_t]) -> (reconstruction, Z, 0)."""
        text, text_mask = cond.text, cond.text_mask
        P = self.patch_embed(patchify(images, self.cfg.patch_size)) + self.pos_embed
        x = torch.cat([P, self.L.expand(len(P), -1, -1)], 1)
        Z = self.to_Z(self._vit(self.enc, self.enc_norm, x, self.enc_text(text), text_mask)[:, P.shape[1]:])
        x = torch.cat([self.P_prime.expand(len(Z), -1, -1), self.z_proj(Z) + self.z_pos], 1)
        out = self._vit(self.dec, self.dec_norm, x, self.dec_text(text), text_mask)
        recon = unpatchify(self.to_pixels(out[:, : self.P_prime.shape[1]]), self.cfg.patch_size)
        return recon, Z, Z.new_zeros(())  # TexTok.forward's (images_hat, Z, vq_loss)


def train_flops_per_image(cfg: TexTokConfig) -> float:
    """Model FLOPs of one training step per image: 3x the forward's matmul FLOPs (forward + backward, as PaLM's MFU),
    tokenizer and detokenizer over hw patches + N tokens + N_t text tokens each (in-context, §3.2)."""
    width, M, s, hw, N, N_t = cfg.width, cfg.mlp_dim, cfg.patch_size, cfg.grid ** 2, cfg.num_tokens, cfg.text_len
    S = hw + N + N_t

    def vit(layers):  # q, k, v, out projections + MLP, and the two attention matmuls (QK^T, AV)
        return layers * (2 * S * (4 * width * width + 2 * width * M) + 4 * S * S * width)

    embed = 2 * hw * 3 * s * s * width * 2 + 2 * N_t * cfg.text_dim * width * 2 + 2 * N * width * cfg.token_dim * 2
    return 3 * (vit(cfg.enc_layers) + vit(cfg.dec_layers) + embed)


def training_row(name: str, build, cfg: TexTokConfig, args, device, precision: str) -> dict:
    """Images/s (best of `repeats` blocks of `train_steps` steps, after a warm-up step) and peak memory of training
    the model `build()` returns on random images and text (steps.generator_step: l2 loss, Adam with App. C's betas)."""
    B = args.train_batch_size
    precision = "bf16" if precision == "bf16" or (precision == "auto" and device.type == "cuda") else "fp32"
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(B, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1).to(device)
    text = torch.randn(B, cfg.text_len, cfg.text_dim, generator=gen).to(device)
    lengths = torch.randint(cfg.text_len // 4, cfg.text_len + 1, (B,), generator=gen)
    mask = (torch.arange(cfg.text_len)[None] < lengths[:, None]).to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # inputs and other models
    torch.manual_seed(0)
    model = build(cfg).to(device).train()
    tc = TokenizerTrainConfig(perceptual_weight=0.0)  # App. C's weights and Adam betas; ℓ2 only (no VGG, no disc)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=True)
    micro_batches = [({"image": images, "cond": Cond(text, mask)}, True)]

    def block():  # train.py's generator step before disc_start
        for _ in range(args.timed_steps):
            generator_step(model, model, opt, None, None, tc, micro_batches, precision, gan_on=False)

    seconds = best_seconds(block, args.repeats, device)
    row = dict(model=name, size=cfg.image_size, tokens=cfg.num_tokens, batch=B, precision=precision,
               params_m=sum(p.numel() for p in model.parameters()) / 1e6,
               images_per_s=B * args.timed_steps / seconds,
               peak_mem_gib=(torch.cuda.max_memory_allocated(device) - resident) / 2 ** 30 if device.type == "cuda"
               else None)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (f for key, f in PEAK_BF16_FLOPS if device.type == "cuda" and key in torch.cuda.get_device_name(device)), None)
    row["mfu"] = train_flops_per_image(cfg) * row["images_per_s"] / peak if peak and precision == "bf16" else None
    del model, opt
    return row


def training_rows(args, text_dim: int, device) -> list:
    """Ours against timm's blocks at the chosen size; on CUDA also TexTok-Base in bf16 for MFU."""
    cfg = textok_config(args, args.train_size, args.train_tokens, text_dim)
    label = f"TexTok-{args.model_size.capitalize()}-{args.train_tokens}"
    specs = [(f"{label} (ours)", TexTok, cfg, args.precision)]
    try:
        import timm  # noqa: F401
    except ImportError:
        print("timm is not installed, so the timm row is skipped: pip install timm (a bench-only dependency)")
    else:
        specs.append((f"{label} (timm ViT blocks)", TimmEncoderDecoder, cfg, args.precision))
    if device.type == "cuda" and (args.model_size != "base" or args.precision == "fp32"):
        base = dataclasses.replace(cfg, **MODEL_PRESETS["base"])
        specs.append((f"TexTok-Base-{args.train_tokens} (ours, MFU)", TexTok, base, "bf16"))
    return [training_row(name, build, c, args, device, precision)
            for name, build, c, precision in tqdm(specs, desc="training rows")]


def fmt(v, digits=4) -> str:
    return "–" if v is None else f"{v:.{digits}g}"


def tables(inference: list, training: list, args) -> str:
    """The two markdown tables."""
    compiled = "DiT compiled with CUDA graphs" if args.compile_dit else "DiT eager"
    lines = [f"Inference, seconds and GFLOP per image (batch {args.batch_size}, {args.sampling_steps} DDIM steps, text "
             f"encoder {args.text_encoder}, N_t {args.text_len}, {compiled}):", "",
             "| px | system | tokens | text | tokenize | detokenize | DiT sampling | tokenization (Tab. 5) | "
             "generation (Tab. 5) | generation GFLOP | generation speed-up | speed-up / FLOP ratio |",
             "|" + "---|" * 12]
    for r in inference:
        lines.append(f"| {r['size']} | {r['system']} | {r['tokens']} | {fmt(r['text'])} | {fmt(r['tokenize'])} | "
                     f"{fmt(r['detokenize'])} | {fmt(r['dit'])} | {fmt(r['tokenization'])} | {fmt(r['generation'])} | "
                     f"{r['generation_flops'] / 1e9:.4g} | {r['speedup']:.2f}x | {r['speedup_per_flop_ratio']:.2f} |")
    lines += ["", "Tokenizer training throughput (steps.generator_step before disc_start: forward, l2 loss, backward, "
              "clipping, Adam):", "",
              "| model | px | tokens | batch | precision | params (M) | images/s | peak memory (GiB) | MFU | "
              "vs timm |", "|" + "---|" * 10]
    timm_rate = next((r["images_per_s"] for r in training if "timm" in r["model"]), None)
    for r in training:
        ratio = f"{r['images_per_s'] / timm_rate:.2f}x" if timm_rate and "MFU" not in r["model"] else "–"
        mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['model']} | {r['size']} | {r['tokens']} | {r['batch']} | {r['precision']} | "
                     f"{r['params_m']:.1f} | {r['images_per_s']:.3g} | {fmt(r['peak_mem_gib'], 3)} | {mfu} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.compile_dit = device.type == "cuda" and not args.no_compile
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    command = "python bench/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{machine(device)}; TexTok-{args.model_size}, {args.model}")
    encoder = TextEncoder(args.text_encoder, args.text_len, device)
    with tqdm(total=len(args.resolutions) * (len(args.num_tokens) + 1), desc="inference rows") as bar:
        inference = [row for size in args.resolutions for row in inference_rows(args, size, encoder, device, bar)]
    training = training_rows(args, encoder.dim, device)
    text = tables(inference, training, args)
    notes = ("SD-VAE + DiT/2: DDIM sampling only (the SD-VAE decoder is not available offline), so its generation "
             "time is an underestimate and TexTok's speed-up a lower bound. Random weights throughout. Peak memory: "
             "CUDA only (weights, gradients, Adam states and activations of the training step).")
    out = Path(args.out)
    atomic_write(out / "speed.md", lambda tmp: Path(tmp).write_text(
        f"# Speed\n\nCommand: `{command}`\nMachine: {machine(device)}\n\n{text}\n\n{notes}\n"))
    save_json({"command": command, "machine": machine(device), "settings": vars(args), "inference": inference,
               "training": training}, out / "speed.json")
    print("\n" + text + "\n\n" + notes + f"\nwritten: {out / 'speed.md'}, {out / 'speed.json'}")
    return inference, training


if __name__ == "__main__":
    run_main(main)
