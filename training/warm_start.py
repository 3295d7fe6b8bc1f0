"""Label-free warm start of the DeFT scorer: distil a training-free teacher's per-token ranking into DeFT.

A folder written by `convert` holds freshly initialised DeFT modules, whose selection is no better than random
until they are trained with labelled data. This module trains only DeFT's scoring path (SAM, the saliency MLP
the mixture logits and, when present, the grid position input; the RTD is not on that path and is left as it is) on a folder of unlabelled images:

1. the frozen vision tower and projector encode a batch of images (no gradient; the language model never runs);
2. a training-free teacher scores every visual token (`TEACHERS`);
3. DeFT scores the same projected features exactly as at inference (`DeFTModule.score`: per-sample min-max
   normalised saliency and group scores, softmax mixture of the components present without feedback);
4. a listwise loss pulls DeFT's ranking towards the teacher's: with `r_i` the teacher's rank of token i
   scaled to [0, 1] (best token 1) and `s_i` DeFT's mixed score (also in [0, 1]),
   `loss = KL(softmax(r / T) || softmax(s / T))` per image, averaged (ListNet with a shared temperature T;
   T small puts the weight on the top of the ranking, which decides the top-k).

Teachers (the ranking each registered method keeps first):
- `cls_attention`: the head-averaged attention the CLS query pays each patch at the vision feature layer,
  recomputed from that layer's input (`compressors/vision_attention.py`), the score VisionZip keeps its
  dominant tokens by (with `contextual_ratio=0`, VisionZip keeps exactly this top-k). Needs a CLS tower.
- `divprune`: DivPrune's greedy max-min order over the projected features (`method_divprune.py`), turned into
  a rank score (first pick best). The greedy order does not depend on K, so its top-k is DivPrune's selection
  at every budget. Works on any tower.

Ranks rather than raw teacher values make the target scale-free (CLS attention is heavy-tailed, DivPrune has
only an order). Deterministic for a seed on CPU. The result is written with `utilities/atomic_write.py` (built
in a hidden staging folder, renamed into place): a killed run leaves the old folder or the new one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from modeling_deft_llava.configuration.deft_settings import num_kept_tokens
from modeling_deft_llava.configuration.vision_towers import tower_has_cls
from modeling_deft_llava.utilities.atomic_write import place, staged
from modeling_deft_llava.utilities.process_state import restores_process_state
from tqdm.auto import tqdm

from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaProcessor
from modeling_deft_llava.compressors.method_divprune import divprune_indices
from modeling_deft_llava.compressors.vision_attention import cls_attention

from .folders import check_readable_folder

TEACHERS = ("cls_attention", "divprune")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LOG_FILE = "warm_start_log.json"
# the DeFT children on the scoring path; `token_dictionary` (RTD) is not and keeps its weights. The position
# input (`deft_position_aware`) is trained when present; the question input (`deft_question_aware`) is not: there
# is no question without labelled data, so it stays at its zero start (the question-blind ranking) until
# supervised training
SCORING_MODULES = ("semantic_abstraction", "saliency_scorer", "score_mixer", "position_encoding")


@dataclass
class WarmStartArguments:
    """Options of a warm start; the single source of their defaults (the command reads them from here)."""

    model_folder: str = field(
        metadata={"help": "A DeftLlava folder with DeFT modules (e.g. written by commands.convert)."}
    )
    images: str = field(metadata={"help": "Folder of unlabelled training images (png, jpg, ...)."})
    out: str = field(metadata={"help": "Output folder (model, processor, warm_start_log.json)."})
    teacher: str = field(
        default="divprune",
        metadata={
            "help": f"Teacher ranking, one of {TEACHERS}. divprune (default) works on any tower and gave the better "
            "warm start on the dense digits benchmark; cls_attention needs a CLS tower."
        },
    )
    steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Images per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (constant)."})
    temperature: float = field(
        default=0.1, metadata={"help": "Temperature T of the listwise loss (teacher ranks and DeFT scores)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the image order (and of torch)."})
    eval_images: str | None = field(
        default=None,
        metadata={"help": "Held-out image folder: top-k agreement with the teacher before and after."},
    )
    eval_ratio: float | None = field(
        default=None,
        metadata={"help": "Budget of the agreement report (default: the model's deft_retention_ratio)."},
    )
    threads: int | None = field(
        default=None,
        metadata={"help": "torch CPU threads (None: torch's default; 1 is fastest on a busy small CPU)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output folder."})

    def __post_init__(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {self.teacher!r}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"threads must be a positive int or None, got {self.threads!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        for name in ("learning_rate", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.eval_ratio is not None and (
            isinstance(self.eval_ratio, bool)
            or not isinstance(self.eval_ratio, (int, float))
            or not 0 < self.eval_ratio <= 1
        ):
            raise ValueError(f"eval_ratio must be in (0, 1], got {self.eval_ratio!r}")

    @classmethod
    def defaults(cls) -> dict:
        """Field name -> default of every optional field."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


# ------------------------------------------------------------------------------------------ inputs
def list_images(folder: str, what: str = "images") -> list[str]:
    """Sorted image paths of `folder` (not recursive). Raises ValueError for a missing or image-less folder."""
    if not os.path.isdir(folder):
        raise ValueError(f"{what} folder {folder!r} does not exist or is not a folder")
    paths = sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, name))
    )
    if not paths:
        raise ValueError(f"{what} folder {folder!r} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    check_images(paths)
    return paths


def check_images(paths: list[str]) -> None:
    """Read every image's header before any model is loaded: a file that is not a readable image is a
    ValueError naming it (it was found only when training reached it)."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"{path!r} is not a readable image ({error})") from error


def load_images(paths: list[str]) -> list:
    """PIL images in RGB; a file that is not a readable image is a ValueError naming it."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for path in paths:
        try:
            with Image.open(path) as image:
                out.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{path!r} is not a readable image ({error})") from error
    return out


def check_model_folder(folder: str) -> dict:
    """The folder's config.json as a dict, if it is a DeftLlava folder with DeFT modules; ValueError otherwise."""
    check_readable_folder(folder)
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder!r} is not a model folder: it has no config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    model_type = config.get("model_type")
    convert = "python -m modeling_deft_llava.commands.convert STOCK_FOLDER OUT_FOLDER"
    if model_type == "llava":
        raise ValueError(
            f"{folder!r} is a stock LLaVA folder without DeFT modules: convert it first ({convert})"
        )
    if model_type != "deft_llava":
        raise ValueError(
            f"{folder!r} holds a {model_type!r} model, not a DeftLlava (deft_llava) or LLaVA model; a warm start "
            "needs a DeftLlava folder (a stock LLaVA folder: run convert first)"
        )
    method = config.get("compression_method", "deft")
    if not config.get("use_deft", False) or method != "deft":
        raise ValueError(
            f"{folder!r} has use_deft={config.get('use_deft', False)!r} and compression_method={method!r}: it holds no "
            "DeFT modules to warm-start; it needs use_deft=True and compression_method='deft' (run convert)"
        )
    return config


def check_teacher(teacher: str, config) -> None:
    """`cls_attention` needs the CLS token of one feature layer (a CLIP-like tower, strategy "default")."""
    if teacher != "cls_attention":
        return
    layer = config.vision_feature_layer
    has_cls = tower_has_cls(config.vision_config)
    if (
        isinstance(layer, bool)
        or not isinstance(layer, int)
        or has_cls is False
        or config.vision_feature_select_strategy != "default"
    ):
        raise ValueError(
            f"teacher='cls_attention' reads the CLS token of one feature layer: it needs a tower with a CLS "
            f"token, vision_feature_select_strategy='default' and an int vision_feature_layer (this model: "
            f"{getattr(config.vision_config, 'model_type', None)!r}, {config.vision_feature_select_strategy!r}, "
            f"{layer!r}); use teacher='divprune', which works on any tower"
        )


# ------------------------------------------------------------------------------------------ teacher and student
@torch.no_grad()
def encode(model, pixel_values: torch.Tensor, teacher: str) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Frozen vision tower + projector: projected features `(images, N, hidden_size)`, the teacher's rank scores
    `(images, N)` in [0, 1] (1: the teacher's first choice) and the patch grid `(rows, cols)`."""
    inner = model.model
    captured = {}
    hook = None
    if teacher == "cls_attention":
        layer = inner._feature_layer_module()

        def keep_input(module, args, kwargs):
            captured["input"] = args[0] if args else kwargs["hidden_states"]

        hook = layer.register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        with inner.compression_disabled():
            out = inner.get_image_features(pixel_values=pixel_values, return_dict=True)
    finally:
        if hook is not None:
            hook.remove()
    features = torch.stack(list(out.pooler_output))  # (images, N, D)
    grid = inner._patch_grid(pixel_values)
    if teacher == "cls_attention":
        raw = cls_attention(layer, captured["input"])  # (images, N)
    else:
        order = divprune_indices(features, features.shape[1])  # (images, N) pick order
        raw = torch.empty(order.shape, dtype=torch.float32, device=features.device)
        picks = torch.arange(order.shape[1], 0, -1, dtype=torch.float32, device=features.device)  # N .. 1
        raw.scatter_(1, order, picks.expand_as(order))  # first pick scores N
    return features, rank_scores(raw), grid


def rank_scores(raw: torch.Tensor) -> torch.Tensor:
    """`(batch, N)` scores -> their ranks scaled to [0, 1] per row (highest 1, lowest 0; ties by index)."""
    n = raw.shape[1]
    ranks = raw.float().argsort(dim=1, stable=True).argsort(dim=1).float()  # (batch, N): 0 = lowest
    return ranks / max(n - 1, 1)


def deft_scores(model, features: torch.Tensor, grid: tuple) -> torch.Tensor:
    """DeFT's mixed score `(images, N)` as at inference (no feedback component)."""
    scores, _ = model.model.deft.score(features, "image", grid)
    return scores


def listwise_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """`KL(softmax(teacher / T) || softmax(student / T))` per row `(batch, N)`, averaged over rows."""
    target = F.softmax(teacher.float() / temperature, dim=1)
    log_q = F.log_softmax(student.float() / temperature, dim=1)
    return F.kl_div(log_q, target, reduction="batchmean")


def topk_overlap(student: torch.Tensor, teacher: torch.Tensor, ratio: float) -> float:
    """Mean share of the teacher's top-k (k = the model's budget rule) that DeFT's top-k also holds."""
    n = student.shape[1]
    k = num_kept_tokens(n, ratio)
    s = torch.zeros_like(student, dtype=torch.bool).scatter_(1, student.topk(k, dim=1).indices, True)
    t = torch.zeros_like(teacher, dtype=torch.bool).scatter_(1, teacher.topk(k, dim=1).indices, True)
    return float((s & t).sum(1).float().mean() / k)


@torch.no_grad()
def teacher_agreement(
    model, processor, paths: list[str], teacher: str, ratio: float, batch_size: int
) -> float:
    """Top-k overlap between DeFT and the teacher, averaged over the images of `paths`."""
    total = 0.0
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        pixel_values = processor.image_processor(load_images(chunk), return_tensors="pt")["pixel_values"]
        features, target, grid = encode(model, pixel_values.to(model.dtype), teacher)
        total += topk_overlap(deft_scores(model, features, grid), target, ratio) * len(chunk)
    return total / len(paths)


# ------------------------------------------------------------------------------------------ the run
def load_for_warm_start(args: WarmStartArguments):
    """The checked model (eval mode, everything frozen but DeFT's scoring path) and its processor."""
    check_model_folder(args.model_folder)
    model = DeftLlavaForConditionalGeneration.from_pretrained(args.model_folder).eval()
    if getattr(model.model, "deft", None) is None:
        raise ValueError(f"{args.model_folder!r} loaded without DeFT modules (use_deft=True is needed)")
    check_teacher(args.teacher, model.config)
    try:
        processor = DeftLlavaProcessor.from_pretrained(args.model_folder)
    except OSError as error:  # a folder saved without its processor: say what is missing, not a traceback
        raise ValueError(
            f"{args.model_folder!r} holds no processor (the warm start needs its image processor): save the "
            f"processor there (`processor.save_pretrained(folder)`); loading it said: {error}"
        ) from None
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in SCORING_MODULES:
        module = getattr(model.model.deft, name)
        for parameter in module.parameters() if module is not None else ():
            parameter.requires_grad_(True)
    return model, processor


@restores_process_state  # `threads` and the seed apply to this call only
def warm_start(args: WarmStartArguments, progress: bool = True, command: str | None = None) -> dict:
    """Run a warm start and write the output folder; returns the log (also saved as `warm_start_log.json`).

    Raises:
        ValueError: a missing or non-DeftLlava model folder, an image folder without images, an unreadable
            image, a teacher the tower cannot give, a non-empty output folder without `overwrite`.
    """
    started = time.time()
    train_paths = list_images(args.images)
    eval_paths = list_images(args.eval_images, "eval_images") if args.eval_images else []
    not_empty = f"output folder {args.out!r} exists and is not empty; pass overwrite=True (--overwrite)"
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise ValueError(not_empty)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"output {args.out!r} exists and is not a folder")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, processor = load_for_warm_start(args)
    ratio = args.eval_ratio if args.eval_ratio is not None else model.config.deft_retention_ratio
    torch.manual_seed(args.seed)
    agreement = {}
    if eval_paths:
        agreement["eval_before"] = teacher_agreement(
            model, processor, eval_paths, args.teacher, ratio, args.batch_size
        )

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    order, cursor = torch.randperm(len(train_paths), generator=generator).tolist(), 0
    losses, overlaps = [], []
    bar = tqdm(range(args.steps), desc=f"warm start ({args.teacher})", disable=not progress)
    for _ in bar:
        chunk = []
        while len(chunk) < min(args.batch_size, len(train_paths)):
            if cursor == len(order):  # a new epoch, a new order
                order, cursor = torch.randperm(len(train_paths), generator=generator).tolist(), 0
            chunk.append(train_paths[order[cursor]])
            cursor += 1
        pixel_values = processor.image_processor(load_images(chunk), return_tensors="pt")["pixel_values"]
        features, target, grid = encode(model, pixel_values.to(model.dtype), args.teacher)
        scores = deft_scores(model, features, grid)
        loss = listwise_loss(scores, target, args.temperature)
        if not torch.isfinite(loss):
            raise ValueError(f"the warm-start loss became {loss.item()} (lower learning_rate?)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(loss.item())
        overlaps.append(topk_overlap(scores.detach(), target, ratio))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", overlap=f"{overlaps[-1]:.2f}")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if eval_paths:
        agreement["eval_after"] = teacher_agreement(
            model, processor, eval_paths, args.teacher, ratio, args.batch_size
        )
    log = {
        "command": command,
        "arguments": asdict(args),
        "loss": "KL(softmax(teacher_rank / T) || softmax(deft_score / T)), teacher_rank in [0, 1]",
        "num_images": len(train_paths),
        "num_eval_images": len(eval_paths),
        "agreement_ratio": ratio,
        "agreement": agreement,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "loss_every_step": losses,
        "train_overlap_first": overlaps[0],
        "train_overlap_last_10": sum(overlaps[-10:]) / len(overlaps[-10:]),
        "mixture_logits": model.model.deft.score_mixer.mixture_logits.detach().float().tolist(),
        "wall_time_s": time.time() - started,
    }
    save(model, processor, args.out, log, args.overwrite, not_empty)
    return log


def save(model, processor, out: str, log: dict, overwrite: bool, not_empty: str) -> None:
    """Model, processor and the log into a staging folder next to `out`, then renamed into place."""
    target = os.path.abspath(out)
    with staged(target) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        with open(os.path.join(staging, LOG_FILE), "w", encoding="utf-8") as f:
            json.dump(log, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            place(staging, target, overwrite=overwrite)
        except FileExistsError as error:  # another program wrote into the empty folder meanwhile
            raise ValueError(f"{not_empty} ({error})") from error


def command_line(argv) -> str:
    return "python -m modeling_deft_llava.commands.warm_start " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )


__all__ = [
    "TEACHERS",
    "WarmStartArguments",
    "listwise_loss",
    "rank_scores",
    "teacher_agreement",
    "topk_overlap",
    "warm_start",
]
