"""Benchmark: the paper's AE against SVD on all-MiniLM-L6-v2, scored on STS-B test.

Part 1: token embeddings at ratios 3, 10, 25: dense, SVD, SVD with rows weighted by
sqrt(token count + 1) (reference, computed inline), linear AE, non-linear AE, and at ratio
10 the paper's AE settings (`preset: paper`). Part 2, ratio 10: attention keys and FFN
down, `--group none` vs `layers`, SVD vs AE. Every compression is timed (wall clock,
including its calibration statistics: the statistics cache points to a fresh folder).

Metric: Spearman x100 of the cosine of mean-pooled sentence embeddings (mean over the
attention mask, as sentence-transformers all-MiniLM-L6-v2 does) against STS-B test gold
scores. Selection inside the AE never sees the test split (reconstruction error).

    PYTHONPATH=src python benchmarks/ae_minilm.py --out benchmarks/results/ae_minilm.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import aecompress
from aecompress.calibration import CalibrationConfig, calibration_ids
from aecompress.evaluation.sts import stsb
from aecompress.methods.svd import truncated_svd
from aecompress.models import load_model

LINEAR_AE = {"encoder": [], "decoder": []}


def stsb_spearman(model: Any, tokenizer: Any) -> float:
    """STS-B test Spearman x100 (aecompress.evaluation.sts: the model's own pooling)."""
    return stsb(model, tokenizer, split="test", progress=False)["spearman"]


def weighted_svd_embeddings(ratio: float) -> dict[str, Any]:
    """Reference row-weighted SVD of the embedding (weights sqrt(count + 1), token counts
    over the WikiText-2 train text, as the AE's calibration statistics)."""
    loaded = load_model("minilm-l6")
    start = time.perf_counter()
    table = loaded.model.get_input_embeddings().weight
    rows, cols = table.shape
    ids = calibration_ids(loaded.tokenizer, CalibrationConfig())
    counts = torch.bincount(ids, minlength=rows).double()
    scale = (counts + 1).sqrt().unsqueeze(1)
    rank = int(rows * cols / ratio // (rows + cols))
    a, b = truncated_svd(table.detach().double() * scale, rank)
    with torch.no_grad():
        table.copy_(((a / scale) @ b).float())
    seconds = time.perf_counter() - start
    stsb = stsb_spearman(loaded.model, loaded.tokenizer)
    true_ratio = rows * cols / (rank * (rows + cols))
    return {"stsb": stsb, "seconds": seconds, "ratio": true_ratio, "width": rank}


def run(
    method: str, options: dict[str, Any], ratio: float, targets: list[str], group: str
) -> dict[str, Any]:
    """Compress a fresh minilm-l6 (timed), then score it on STS-B test."""
    loaded = load_model("minilm-l6")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["AECOMPRESS_CACHE"] = cache
        start = time.perf_counter()
        cm = aecompress.compress(
            loaded,
            method=method,
            options=options,
            ratio=ratio,
            targets=targets,
            group=group,
            progress=False,
        )
        seconds = time.perf_counter() - start
    x = sorted({g.stored.width for g in cm.groups})
    return {
        "stsb": stsb_spearman(cm.model, loaded.tokenizer),
        "seconds": seconds,
        "ratio": cm.totals()["ratio"],
        "width": "/".join(str(v) for v in x),
        "epoch": "/".join(
            str(g.stored.info["epoch"]) for g in cm.groups if "epoch" in g.stored.info
        ),
    }


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ae_minilm.md"))
    parser.add_argument("--ratios", default="3,10,25")
    parser.add_argument("--no-paper", action="store_true", help="skip the slow paper preset")
    parser.add_argument("--no-families", action="store_true", help="skip part 2 (k, down)")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    began = time.perf_counter()
    dense_model = load_model("minilm-l6")
    dense = stsb_spearman(dense_model.model, dense_model.tokenizer)
    print(f"dense {dense:.2f}", flush=True)

    lines = [
        "# AE vs SVD on all-MiniLM-L6-v2 (STS-B test Spearman x100)",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine()}; other processes (other engineers' jobs) may have been "
        "running at the same time, so wall times are upper bounds",
        f"- command: `PYTHONPATH=src python benchmarks/ae_minilm.py --ratios {args.ratios}"
        + (" --no-paper" if args.no_paper else "")
        + (" --no-families" if args.no_families else "")
        + "`",
        "- metric: STS-B test (1,379 pairs), Spearman x100 of the cosine of mean-pooled "
        "sentence embeddings; selection inside the AE by reconstruction error only",
        "- seconds: wall time of the compression (calibration statistics included), "
        "not of the scoring",
        "- seed 0; ratio = original / stored numbers of the group (codes, decoder, norms "
        "all counted); AE fits run on 1 thread (option `threads`), the rest on torch's",
        "",
        f"Dense: **{dense:.2f}**",
        "",
        "## Token embeddings (30522 x 384)",
        "",
        "| ratio | method | options | STS-B test | seconds | true ratio | x / rank | epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(ratio: float, name: str, options: str, result: dict[str, Any]) -> None:
        lines.append(
            f"| {ratio:g} | {name} | {options} | {result['stsb']:.2f} | "
            f"{result['seconds']:.1f} | {result.get('ratio', float('nan')):.2f} | "
            f"{result.get('width', '')} | {result.get('epoch', '')} |"
        )
        print(lines[-1], flush=True)

    for ratio in ratios:
        row(ratio, "svd", "", run("svd", {}, ratio, ["embed"], "none"))
        row(ratio, "svd, rows x sqrt(count+1)", "inline reference", weighted_svd_embeddings(ratio))
        linear = run("ae", LINEAR_AE, ratio, ["embed"], "none")
        row(ratio, "ae linear", "encoder=[] decoder=[]", linear)
        row(ratio, "ae (default)", "", run("ae", {}, ratio, ["embed"], "none"))
        if ratio == 10 and not args.no_paper:
            paper = run("ae", {"preset": "paper"}, ratio, ["embed"], "none")
            row(ratio, "ae paper", "preset=paper", paper)

    if not args.no_families:
        lines += [
            "",
            "## Attention keys and FFN down, ratio 10",
            "",
            "| targets | group | method | STS-B test | seconds | true ratio | x / rank | epoch |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for family in ("k", "down"):
            for group in ("none", "layers"):
                for method in ("svd", "ae"):
                    result = run(method, {}, 10, [family], group)
                    lines.append(
                        f"| {family} | {group} | {method} | {result['stsb']:.2f} | "
                        f"{result['seconds']:.1f} | {result['ratio']:.2f} | "
                        f"{result['width']} | {result['epoch']} |"
                    )
                    print(lines[-1], flush=True)

    lines += ["", f"Total benchmark time: {time.perf_counter() - began:.0f} s.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
