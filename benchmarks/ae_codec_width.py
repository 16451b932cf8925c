"""The AE as a quantized codec: its latent width and each layer's loss, at several budgets.

Compresses the model's targets with ae-data and a quantization stage (as the frontier's
row: `--option epochs=1 --quantize int3:g64`) at each ratio and reports, per family of
targets (q, k, ..., down), the latent width the budget gave and each layer's output error
before rounding (`float_loss`) and as stored (`quantized_loss`): median and worst layer.
The losses are the codec's own: the RMSE of the whitened output error (W - W_hat) L, with
L L^T the mean X^T X of the calibration inputs (train text); no evaluation split is read.
A budget wide enough to reach full rank is where more width can cost more rounding than
it saves.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/ae_codec_width.py \
        --model smollm2-135m --targets q,k,v,o,up,gate,down --ratios 2 3.76 \
        --out benchmarks/results/ae-codec/width.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import markdown_table, provenance, utc_now, write_text

import aecompress
from aecompress.compressed import CompressedModel
from aecompress.models import load_model


def span(values: list[int]) -> str:
    """'a' when all equal, else 'lowest-highest'."""
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def family_rows(ratio: float, cm: CompressedModel) -> list[tuple[str, ...]]:
    """One row per family of targets: the budget's width and the stored one (narrower
    when that stores a lower loss, `narrow_codec`), median float loss (at the budget's
    width), median and worst stored loss (with its layer)."""
    families: dict[str, list[tuple[float, float, str, int, int]]] = {}
    for group in cm.groups:
        info, name, width = group.stored.info, group.group.name, group.stored.width
        assert isinstance(width, int)  # the AE's latent width
        budget_width = info["codec_widths"][0][0] if "codec_widths" in info else width
        entry = (info["quantized_loss"], info["float_loss"], name, budget_width, width)
        families.setdefault(name.split(".")[0], []).append(entry)
    rows: list[tuple[str, ...]] = []
    for family, entries in families.items():
        worst = max(entries)
        rows.append(
            (
                f"1/{ratio:g}",
                family,
                span([e[3] for e in entries]),
                span([e[4] for e in entries]),
                f"{statistics.median(e[1] for e in entries):.5f}",
                f"{statistics.median(e[0] for e in entries):.5f}",
                f"{worst[0]:.5f} ({worst[2]})",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", default="q,k,v,o,up,gate,down")
    parser.add_argument("--ratios", nargs="+", type=float, default=[2.0, 3.76])
    parser.add_argument("--quantize", default="int3:g64")
    parser.add_argument("--epochs", type=int, default=1, help="the float fit's epochs")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file")
    args = parser.parse_args()
    started = utc_now()
    rows: list[tuple[str, ...]] = []
    seconds = []
    for ratio in args.ratios:
        start = time.perf_counter()
        cm = aecompress.compress(
            load_model(args.model),
            method="ae-data",
            ratio=ratio,
            targets=args.targets.split(","),
            options={"epochs": args.epochs},
            quantize=args.quantize,
        )
        seconds.append(f"1/{ratio:g} {time.perf_counter() - start:.0f} s")
        measured = family_rows(ratio, cm)
        for row in measured:
            print(*row, flush=True)
        rows += measured
    header = (
        "ratio",
        "targets",
        "budget's width",
        "stored width",
        "float loss",
        "stored loss",
        "worst stored loss",
    )
    lines = [
        f"# ae-data + {args.quantize}: latent width and loss per layer ({args.model})",
        "",
        f"Float fit: {args.epochs} epoch(s), at the budget's width; the codec stores that "
        "width or a narrower one, whichever loses less (`narrow_codec`, on by default). "
        "Losses: each layer's RMSE of its whitened output "
        "error (W - W_hat) L, L L^T the mean X^T X of the calibration inputs (train text); "
        "median and worst over the layers of a family. No evaluation split is read.",
        "",
        *markdown_table(header, rows),
        "",
        f"Compression time: {', '.join(seconds)}.",
        "",
        *provenance(started),
    ]
    write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
