"""Benchmark: the paper's AE against SVD on all-MiniLM-L6-v2, scored on STS-B test.

Part 1: token embeddings at ratios 3, 10, 25: dense, SVD, SVD with rows weighted by
sqrt(token count + 1) (reference, computed inline), linear AE, non-linear AE, and at ratio
10 the paper's AE settings (`preset: paper`). Part 2, ratio 10: attention keys and FFN
down, `--group none` vs `layers`, SVD vs AE. Every compression is timed (wall clock,
including its calibration statistics: the statistics cache points to a fresh folder).

Metric: Spearman x100 of the cosine of mean-pooled sentence embeddings (mean over the
attention mask, as sentence-transformers all-MiniLM-L6-v2 does) against STS-B test gold
scores. Selection inside the AE never sees the test split (reconstruction error).

Not a sweep recipe because of the inline reference (a row-weighted SVD that is not a
method); recipes/ablations.yaml and paper-grid-quick.yaml hold the AE's other rows.

    PYTHONPATH=src python benchmarks/ae_minilm.py --out benchmarks/results/ae_minilm.md
    PYTHONPATH=src python benchmarks/ae_minilm.py --quick --out /tmp/ae.md  # smoke test
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import Stopwatch, fresh_copy, markdown_table, provenance, utc_now, write_text

import aecompress
from aecompress.calibration import CalibrationConfig, calibration_ids
from aecompress.evaluation.sts import stsb
from aecompress.methods.linalg import truncated_svd
from aecompress.models import LoadedModel, load_model

LINEAR_AE: dict[str, list[int]] = {"encoder": [], "decoder": []}
MEASURED = ["STS-B test", "seconds", "true ratio", "x / rank", "epoch"]
EMBED_HEADER = ["ratio", "method", "options", *MEASURED]
FAMILY_HEADER = ["targets", "group", "method", *MEASURED]


def stsb_spearman(loaded: LoadedModel) -> float:
    """STS-B test Spearman x100 (aecompress.evaluation.sts: the model's own pooling)."""
    assert loaded.tokenizer is not None
    return stsb(loaded.model, loaded.tokenizer, split="test", progress=False)["spearman"]


def embedding_table(loaded: LoadedModel) -> torch.Tensor:
    table = loaded.model.get_input_embeddings().weight
    assert isinstance(table, torch.Tensor)
    return table


def weighted_svd_embeddings(dense: LoadedModel, ratio: float) -> dict[str, Any]:
    """Reference row-weighted SVD of the embedding (weights sqrt(count + 1), token counts
    over the WikiText-2 train text, as the AE's calibration statistics)."""
    loaded = fresh_copy(dense)
    assert loaded.tokenizer is not None
    clock = Stopwatch()
    table = embedding_table(loaded)
    rows, cols = table.shape
    ids = calibration_ids(loaded.tokenizer, CalibrationConfig())
    counts = torch.bincount(ids, minlength=rows).double()
    scale = (counts + 1).sqrt().unsqueeze(1)
    rank = int(rows * cols / ratio // (rows + cols))
    a, b = truncated_svd(table.detach().double() * scale, rank)
    with torch.no_grad():
        table.copy_(((a / scale) @ b).float())
    seconds = clock.seconds()
    true_ratio = rows * cols / (rank * (rows + cols))
    return {"stsb": stsb_spearman(loaded), "seconds": seconds, "ratio": true_ratio, "width": rank}


def run(
    dense: LoadedModel,
    method: str,
    options: dict[str, Any],
    ratio: float,
    targets: list[str],
    group: str,
) -> dict[str, Any]:
    """Compress a fresh copy of the model (timed), then score it on STS-B test."""
    loaded = fresh_copy(dense)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["AECOMPRESS_CACHE"] = cache
        clock = Stopwatch()
        cm = aecompress.compress(
            loaded,
            method=method,
            options=options,
            ratio=ratio,
            targets=targets,
            group=group,
            progress=False,
        )
        seconds = clock.seconds()
    widths = sorted({g.stored.width for g in cm.groups})
    scored = LoadedModel(cm.model, loaded.tokenizer, loaded.source, loaded.auto_class)
    return {
        "stsb": stsb_spearman(scored),
        "seconds": seconds,
        "ratio": cm.totals()["ratio"],
        "width": "/".join(str(w) for w in widths),
        "epoch": "/".join(
            str(g.stored.info["epoch"]) for g in cm.groups if "epoch" in g.stored.info
        ),
    }


def row(*labels: object, result: dict[str, Any]) -> list[object]:
    """A table row: the labels, then what was measured (printed as it comes)."""
    measured = [f"{result['stsb']:.2f}", f"{result['seconds']:.1f}", f"{result['ratio']:.2f}"]
    found = [*labels, *measured, result["width"], result.get("epoch", "")]
    print("| " + " | ".join(map(str, found)) + " |", flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ae_minilm.md"))
    parser.add_argument("--model", default="minilm-l6", help="a sentence encoder")
    parser.add_argument("--ratios", default="3,10,25")
    parser.add_argument("--no-paper", action="store_true", help="skip the slow paper preset")
    parser.add_argument("--no-families", action="store_true", help="skip part 2 (k, down)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: the first ratio, part 1 only, no paper"
    )
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.quick:
        ratios, args.no_paper, args.no_families = ratios[:1], True, True
    started, clock = utc_now(), Stopwatch()
    dense = load_model(args.model)
    reference = stsb_spearman(dense)
    print(f"dense {reference:.2f}", flush=True)

    embeddings = []
    for ratio in ratios:
        shown = f"{ratio:g}"  # 10, not 10.0
        svd = run(dense, "svd", {}, ratio, ["embed"], "none")
        embeddings.append(row(shown, "svd", "", result=svd))
        weighted = weighted_svd_embeddings(dense, ratio)
        embeddings.append(
            row(shown, "svd, rows x sqrt(count+1)", "inline reference", result=weighted)
        )
        linear = run(dense, "ae", LINEAR_AE, ratio, ["embed"], "none")
        embeddings.append(row(shown, "ae linear", "encoder=[] decoder=[]", result=linear))
        default = run(dense, "ae", {}, ratio, ["embed"], "none")
        embeddings.append(row(shown, "ae (default)", "", result=default))
        if ratio == 10 and not args.no_paper:
            paper = run(dense, "ae", {"preset": "paper"}, ratio, ["embed"], "none")
            embeddings.append(row(shown, "ae paper", "preset=paper", result=paper))
    families = [
        row(family, group, method, result=run(dense, method, {}, 10, [family], group))
        for family in ([] if args.no_families else ["k", "down"])
        for group in ("none", "layers")
        for method in ("svd", "ae")
    ]

    lines = [
        f"# AE vs SVD on {args.model} (STS-B test Spearman x100)",
        "",
        *provenance(started),
        "- metric: STS-B test (1,379 pairs), Spearman x100 of the cosine of mean-pooled "
        "sentence embeddings; selection inside the AE by reconstruction error only",
        "- seconds: wall time of the compression (calibration statistics included), "
        "not of the scoring",
        "- seed 0; true ratio = dense bits / stored bits of the group (codes, decoder, norms "
        "all counted); AE fits run on 1 thread (option `threads`), the rest on torch's",
        *(["- **--quick: a smoke test, not a benchmark result**"] if args.quick else []),
        "",
        f"Dense: **{reference:.2f}**",
        "",
        "## Token embeddings ({} x {})".format(*embedding_table(dense).shape),
        "",
        *markdown_table(EMBED_HEADER, embeddings),
    ]
    if families:
        lines += ["", "## Attention keys and FFN down, ratio 10", ""]
        lines += markdown_table(FAMILY_HEADER, families)
    lines += ["", f"Total benchmark time: {clock.seconds():.0f} s.", ""]
    write_text(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
