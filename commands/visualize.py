"""Answer questions about images with a DeFT-LLaVA folder and draw which visual tokens were kept.

    python -m modeling_deft_llava.commands.visualize FOLDER IMAGE [IMAGE ...] --question "What is shown?" --out kept.png

For each image: the answer with compression on, the tokens kept out of N, and the prefill time with
compression on and off (same weights; off = every placeholder, `compression_disabled()`), median of
`--repeats` runs. The PNG shows each image (as the processor resized it) with pruned patches dimmed and kept
patches outlined; it works for any patch grid.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from ..modeling_deft_llava import DeftLlavaForConditionalGeneration
from ..processing.image_depth import to_rgb
from ..processing.processing_deft_llava import DeftLlavaProcessor
from ..training.folders import check_readable_folder

logger = logging.getLogger(__name__)


def overlay_kept_tokens(
    image: Image.Image, kept_indices, grid: tuple[int, int], scale: int = 4
) -> Image.Image:
    """`image` with the patches not in `kept_indices` (row-major over `grid` = (rows, cols)) dimmed and
    the kept ones outlined in red; enlarged `scale` times (nearest) so small images stay readable."""
    rows, cols = grid
    kept = {int(i) for i in kept_indices}
    bad = [i for i in kept if not 0 <= i < rows * cols]
    if bad:
        raise ValueError(f"kept indices {bad[:5]} are outside the {rows}x{cols} patch grid")
    base = to_rgb(image).resize((image.width * scale, image.height * scale), Image.NEAREST)
    pixels = np.asarray(base).astype(np.float32)
    ph, pw = base.height / rows, base.width / cols
    for index in range(rows * cols):
        if index not in kept:
            r, c = divmod(index, cols)
            y0, y1, x0, x1 = round(r * ph), round((r + 1) * ph), round(c * pw), round((c + 1) * pw)
            pixels[y0:y1, x0:x1] = pixels[y0:y1, x0:x1] * 0.25 + 40
    out = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for index in kept:
        r, c = divmod(index, cols)
        draw.rectangle(
            [c * pw, r * ph, (c + 1) * pw - 1, (r + 1) * ph - 1],
            outline=(230, 40, 40),
            width=max(1, scale // 2),
        )
    return out


def processed_image(processor, image: Image.Image) -> Image.Image:
    """The image as the model sees it (resized / cropped by the image processor), for the overlay."""
    pixel = processor.image_processor(image, return_tensors="pt", do_normalize=False, do_rescale=False)[
        "pixel_values"
    ][0]
    array = pixel.permute(1, 2, 0).numpy()
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def paired_prefill_seconds(model, inputs, full_inputs, repeats: int) -> tuple[float, float]:
    """Median prefill seconds with compression on (`inputs`) and off (`full_inputs`, all placeholders), the
    runs alternating on, off, on, off... after one warm-up of each: a burst of load on a shared machine then
    hits both sides alike (measured one side after the other, one such burst once made the compressed side
    30x slower in a whole run)."""
    on, off = paired_prefill_runs(model, inputs, full_inputs, repeats)
    return statistics.median(on), statistics.median(off)


def paired_prefill_runs(model, inputs, full_inputs, repeats: int) -> tuple[list[float], list[float]]:
    """Every timed prefill (seconds) with compression on and off, alternating, after one warm-up of each (the
    warm-up is returned when `repeats` is 0)."""
    on, off = [], []
    with torch.no_grad():
        for _ in range(repeats + 1):
            for times, batch, disabled in ((on, inputs, False), (off, full_inputs, True)):
                context = model.model.compression_disabled() if disabled else contextlib.nullcontext()
                with context:
                    start = time.perf_counter()
                    model(**batch, use_cache=True, logits_to_keep=1)
                    times.append(time.perf_counter() - start)
    if not repeats:
        return on[:1], off[:1]
    return on[1:], off[1:]


def saving_text(on: list[float], off: list[float]) -> str:
    """`(+19% time saved)` when every compressed run was faster than every uncompressed one (or the reverse,
    with its sign), else a note that the runs overlap: a few tiny prefills on a busy machine printed "-24% time
    saved" for a model that saves time."""
    saved = 1 - statistics.median(on) / statistics.median(off)
    if max(on) < min(off) or min(on) > max(off):
        return f"({saved:+.0%} time saved)"
    return (
        f"(no measurable difference: the {len(on)} runs of each overlap; more --repeats on a quiet machine)"
    )


def words_read_as_unknown(tokenizer, text: str) -> list[str]:
    """The words of `text` that `tokenizer` encodes with its unknown token (a word-level vocabulary)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    return [w for w in text.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]


def answer_images(
    folder: str, images, question: str, max_new_tokens: int = 16, repeats: int = 3
) -> list[dict]:
    """Run the model of `folder` on each image; returns answers, kept indices, grid and timings."""
    model = DeftLlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = DeftLlavaProcessor.from_pretrained(folder)
    if not model.config.use_deft:
        raise ValueError(
            f"{folder!r} has use_deft=False: nothing is compressed (convert it or pass a DeFT folder)"
        )
    full_processor = DeftLlavaProcessor.from_pretrained(folder, use_deft=False)
    unknown = words_read_as_unknown(processor.tokenizer, question)
    if unknown:
        logger.warning(
            "the question's word(s) %s are not in the tokenizer's vocabulary and are read as %s",
            unknown,
            processor.tokenizer.unk_token,
        )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    results = []
    for image in images:
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answer = processor.tokenizer.decode(
            generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        full_inputs = full_processor(images=[image], text=[prompt], return_tensors="pt")
        on, off = paired_prefill_runs(model, inputs, full_inputs, repeats)
        grid = model.model._patch_grid(inputs["pixel_values"])
        results.append(
            {
                "answer": answer.strip(),
                "kept_indices": out.kept_indices[0].tolist(),
                "num_tokens": grid[0] * grid[1],
                "grid": grid,
                "prefill_on_s": statistics.median(on),
                "prefill_off_s": statistics.median(off),
                "saving": saving_text(on, off),
                "image": processed_image(processor, image),
            }
        )
    return results


def save_overlays(results: list[dict], path: str, titles: list[str] | None = None) -> None:
    tiles = [overlay_kept_tokens(r["image"], r["kept_indices"], tuple(r["grid"])) for r in results]
    width, height = max(t.width for t in tiles), max(t.height for t in tiles)
    caption = 18
    sheet = Image.new("RGB", (width * len(tiles), height + caption), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, result) in enumerate(zip(tiles, results)):
        sheet.paste(tile, (i * width, caption))
        label = (
            titles[i] + ": " if titles else ""
        ) + f"{result['answer']} ({len(result['kept_indices'])}/{result['num_tokens']})"
        draw.text((i * width + 2, 2), label, fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)


def _open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path!r} is not a readable image ({error})") from error


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a DeFT-LLaVA folder (model + processor)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--question", required=True)
    parser.add_argument("--out", default="kept_tokens.png")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        check_readable_folder(args.folder)
        if not os.path.isfile(os.path.join(args.folder, "config.json")):
            raise ValueError(f"{args.folder!r} is not a model folder (no config.json)")
        missing = [p for p in args.images if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"image file(s) not found: {missing}")
        images = [_open_image(p) for p in args.images]
        results = answer_images(args.folder, images, args.question, args.max_new_tokens, args.repeats)
    except (
        ValueError,
        OSError,
    ) as err:  # a user's mistake (a path, an image, a folder): one line, no traceback
        parser.exit(2, f"error: {err}\n")
    for path, r in zip(args.images, results):
        print(
            f"{path}: {r['answer']!r} | kept {len(r['kept_indices'])}/{r['num_tokens']} visual tokens | prefill "
            f"{r['prefill_on_s'] * 1000:.1f} ms vs {r['prefill_off_s'] * 1000:.1f} ms uncompressed {r['saving']}"
        )
    save_overlays(results, args.out, [os.path.basename(p) for p in args.images])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
