"""Speed and memory benchmark (issue 13): dense against compressed runtimes, at run time.

SmolLM2-135M with its MLP matrices (up, gate, down: 90 matrices; attn-dims: the attention
matrices q, k, v, o; slicegpt: every linear layer of the blocks) compressed at each ratio
by each method, saved as an artifact, then loaded in a fresh process per configuration:
the dense base, the method's runtime modules (`aecompress.load(ART)`: LowRankLinear for
svd, DecodedLinear for the AE with `runtime: decoder`, a dense nn.Linear for sparse
methods, slicegpt's smaller model as it is) and the decoded model
(`aecompress.load(ART, decode=True)`). Measured per configuration: the compressed modules
alone (inputs of 512 tokens and of 1 token, summed over the modules; the dense model's
same modules beside them) and their bytes; the whole model's prefill latency (1 x 512 and
8 x 128 tokens), greedy token-by-token decode latency with the KV cache (128 new tokens
after a 32-token prompt), the bytes of its parameters and buffers, and the process's
resident memory after loading minus that after the imports. Times are medians of
--repeats runs after warm-up, under torch.inference_mode, with a fixed number of threads.
Every configuration is measured --rounds times, in turn (the dense model first in each
round), so that a slow minute of the machine does not land on one configuration: the
report gives the median over rounds, and each whole-model speed-up against the dense
model of its own round, lowest to highest. Speed-ups and memory ratios are against the
mean of the dense model's measurements in the same run (one per round and one at the
end). Writes speed.json and speed.md (date, machine, load average, command) into --out.

    PYTHONPATH=src python benchmarks/speed.py --out benchmarks/results/speed
    PYTHONPATH=src python benchmarks/speed.py --quick --threads 1 --ratios 2 --methods svd

Not a sweep recipe: a sweep cell compresses and evaluates tasks in memory; this measures
saved artifacts loaded in fresh processes, at run time.

Compression settings are the cheapest valid ones (speed does not depend on quality): the
AE trains one epoch, sparsegpt calibrates on few windows, every method runs the
independent pipeline. The widths, and so the shapes timed, are those of any run at the
same ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import inspect
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import busy_cores, command, fp32_copy, load_average, machine, run_process

MODEL = "smollm2-135m"
TARGETS = ["up", "gate", "down"]
# Structured methods (whole neurons of up, gate and down together; head dims of q, k, v, o;
# slicegpt: the residual stream every linear layer reads or writes): their targets, and
# the matrices timed as "modules alone". Their artifact is also exported as a plain
# smaller model (`export --dense`), timed as a dense model (`exported` rows).
STRUCTURED_TARGETS: dict[str, list[str]] = {
    "ffn-neurons": ["ffn"],
    "attn-dims": ["attn"],
    "slicegpt": [],  # its own: every linear layer of the blocks
}
MATRICES: dict[str, list[str]] = {
    "ffn-neurons": TARGETS,
    "attn-dims": ["q", "k", "v", "o"],
    "slicegpt": ["q", "k", "v", "o", *TARGETS],
}
METHODS = ("svd", "ae", "sparsegpt")
RATIOS = (1.25, 2.0, 4.0)
# Method options for this benchmark (cheapest valid; quality is not measured here). The
# AE keeps codes + decoder in its modules (`runtime: decoder`); decode=True still gives
# the decoded model from the same artifact.
OPTIONS: dict[str, dict[str, Any]] = {
    "ae": {"epochs": 1, "selection": "last", "runtime": "decoder"},
    "ae-data": {"epochs": 1, "selection": "last", "runtime": "decoder"},
    "attn-dims": {"pairs": "low"},  # one window of rotary pairs: a plain export, same shapes
}
SPARSE = ("sparsegpt", "wanda", "prune")  # served decoded: dense kernels
PREFILL = ((1, 512), (8, 128))  # (batch, tokens)
MODULE_TOKENS = (512, 1)
PROMPT = 32  # tokens before the timed decode
TARGET_RATIO, TARGET_SPEEDUP, TARGET_MEMORY = 2.0, 1.6, 0.55
TARGET_QUANTIZED_MEMORY = 0.3  # issue 27: packed modules / their dense bf16 bytes
MIB = 2**20
BUSY = 0.3  # cores other processes may keep busy for a run to count as on an idle machine


# --- in a child process ---------------------------------------------------------------


def settled_rss() -> int:
    """This process's resident bytes after collecting garbage and returning freed heap
    memory to the system (glibc's malloc_trim, where there is one)."""
    import psutil

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind `tensors` (shared or tied ones counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def module_tensors(modules: Iterable[Any]) -> list[Any]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def timed(run: Callable[[], object], repeats: int, warmup: int, sync: Callable[[], None]) -> list:
    """Wall times (ms) of `repeats` calls of `run` after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return times


def summary(times: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(times), "min": min(times), "times": times}


def copy_model(spec: dict[str, Any]) -> dict[str, Any]:
    """SmolLM2-135M de-quantised once into a plain fp32 folder."""
    return {"folder": str(fp32_copy(MODEL, Path(spec["folder"])))}


def compress(spec: dict[str, Any]) -> dict[str, Any]:
    """Compress the model's MLPs with one method at one ratio; save the artifact."""
    import aecompress

    start = time.perf_counter()
    cm = aecompress.compress(
        spec["model"],
        progress=False,
        method=spec["method"],
        options=spec["options"],
        ratio=spec["ratio"],
        targets=STRUCTURED_TARGETS.get(spec["method"], TARGETS),
        pipeline="independent",
        calibration=spec["calibration"],
    )
    cm.save_pretrained(spec["artifact"])
    if spec["method"] in STRUCTURED_TARGETS:
        aecompress.export_dense(spec["artifact"], f"{spec['artifact']}-plain")
    return {"stored_ratio": cm.totals()["ratio"], "seconds": time.perf_counter() - start}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one configuration in this (fresh) process and time it; see the module doc."""
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers

    import aecompress
    from aecompress.artifact import load_manifest
    from aecompress.models import load_model
    from aecompress.targets import Target, covered_names, resolve_targets

    folder, runtime = spec["folder"], spec["runtime"]
    config = transformers.AutoConfig.from_pretrained(folder)
    getattr(transformers, config.architectures[0])  # its modeling code: imported before
    floor = settled_rss()
    start = time.perf_counter()
    model: Any  # a transformers model
    if runtime in ("dense", "exported"):  # exported: a plain model of smaller matrices
        model = load_model(folder).model
        sets = {m: [t.path for t in resolve_targets(model, m.split(","))] for m in spec["matrices"]}
        with torch.no_grad():  # own memory, as an artifact's (not pages mapped from the file)
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.clone()
    else:
        model = aecompress.load(folder, decode=runtime == "decoded")
        manifest = load_manifest(folder)
        members = [
            Target(m.path, g.family, m.layer, m.kind, m.part)
            for g in manifest.groups
            for m in g.members
        ]
        sets = {spec["matrices"][0]: [n for member in members for n in covered_names(member)]}
        if manifest.sliced:  # no groups: the model's own smaller matrices
            sets = {m: [t.path for t in resolve_targets(model, m.split(","))] for m in sets}
    load_seconds = time.perf_counter() - start
    loaded_rss = settled_rss() - floor
    model.eval()
    device = torch.device(spec["device"])
    sync: Callable[[], None] = lambda: None  # noqa: E731
    device_bytes = None
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        model.to(device)
        device_bytes = torch.cuda.memory_allocated(device) - before

        def sync() -> None:
            torch.cuda.synchronize(device)

    repeats, warmup = spec["repeats"], spec["warmup"]
    generator = torch.Generator().manual_seed(0)
    figures: dict[str, Any] = {}
    by_set: dict[str, Any] = {}
    with torch.inference_mode():
        for name, paths in sets.items():
            modules: list[Any] = [model.get_submodule(p) for p in dict.fromkeys(paths)]
            by_set[name] = {
                "paths": len(modules),
                "module_classes": sorted({type(m).__name__ for m in modules}),
                "modules_bytes": storage_bytes(module_tensors(modules)),
                **time_modules(modules, generator, device, (repeats, warmup), sync),
            }
        vocab = model.config.vocab_size
        keep = {} if spec["all_logits"] else {"logits_to_keep": 1}
        for batch, tokens in PREFILL:
            ids = torch.randint(vocab, (batch, tokens), generator=generator).to(device)

            def prefill(ids: torch.Tensor = ids) -> None:
                model(input_ids=ids, use_cache=True, **keep)

            figures[f"prefill_{batch}x{tokens}"] = summary(timed(prefill, repeats, warmup, sync))
        prompt = torch.randint(vocab, (1, PROMPT), generator=generator).to(device)
        decode(model, prompt, 2, sync)  # warm-up
        per_token = [
            decode(model, prompt, spec["new_tokens"], sync) for _ in range(spec["decode_repeats"])
        ]
        figures["decode_per_token"] = summary(per_token)
    return {
        "modules": by_set,
        "model_bytes": storage_bytes([*model.parameters(), *model.buffers()]),
        "rss_bytes": loaded_rss,
        "rss_floor_bytes": floor,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device_bytes": device_bytes,
        "load_seconds": load_seconds,
        "torch_threads": torch.get_num_threads(),
        "figures": figures,
    }


def time_modules(
    modules: list[Any], generator: Any, device: Any, runs: tuple[int, int], sync: Callable
) -> dict[str, Any]:
    """Wall times of the modules alone, called one after another on random inputs of each
    of MODULE_TOKENS tokens, summed: {"modules_512": summary, "modules_1": summary}."""
    import torch

    figures = {}
    for tokens in MODULE_TOKENS:
        inputs: dict[int, torch.Tensor] = {}
        calls = []
        for module in modules:
            width = int(module.in_features)
            if width not in inputs:
                inputs[width] = torch.randn(1, tokens, width, generator=generator).to(device)
            calls.append((module, inputs[width]))

        def run_modules(calls: list = calls) -> None:
            for module, x in calls:
                module(x)

        figures[f"modules_{tokens}"] = summary(timed(run_modules, *runs, sync))
    return figures


def decode(model: Any, prompt: Any, new_tokens: int, sync: Callable[[], None]) -> float:
    """Greedy decoding with the KV cache after `prompt`: ms per new token (prompt untimed)."""
    # transformers 5 names the cache argument `cache`, earlier versions `past_key_values`
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    sync()
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{name: out[name]})
        token = out.logits[:, -1:].argmax(-1)
    sync()
    return (time.perf_counter() - start) * 1000 / new_tokens


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "copy": copy_model,
    "compress": compress,
    "measure": measure,
}


# --- the parent: configurations, report -------------------------------------------------


def child(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Run one step in a fresh process; its JSON result, or {"error": last stderr line}."""
    finished = run_process([sys.executable, __file__, "--child", json.dumps(spec)], env)
    wall = {"wall_seconds": round(finished.seconds, 1)}  # the whole process
    if finished.returncode == 0:
        result: dict[str, Any] = json.loads(finished.last_line("stdout"))
        return result | wall
    return {"error": finished.last_line("stderr")[:300]} | wall


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=10, help="timed runs (prefill, modules)")
    parser.add_argument("--decode-repeats", type=int, default=3, help="timed decodes")
    parser.add_argument(
        "--rounds", type=int, help="times every configuration is measured, in turn (3; --quick 1)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--new-tokens", type=int, default=128, help="decoded tokens")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    parser.add_argument("--all-logits", action="store_true", help="prefill: every position's")
    parser.add_argument("--calibration-samples", type=int, default=16, help="for sparsegpt")
    parser.add_argument("--model", default=MODEL, help="smollm2-135m or a local Llama folder")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 run, 8 tokens")
    parser.add_argument("--work", type=Path, help="keep artifacts here (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="folder for speed.json and speed.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one step
    args = parser.parse_args()
    if args.child:
        return args
    from aecompress.catalog import WHOLE_MODEL
    from aecompress.methods import METHODS as REGISTERED

    known = {*REGISTERED, *WHOLE_MODEL}
    if unknown := set(args.methods) - known:
        parser.error(f"unknown methods {sorted(unknown)}: use {sorted(known)}")
    if any(not r > 1 for r in args.ratios):
        parser.error("ratios must be greater than 1")
    if args.quick:
        args.repeats, args.decode_repeats, args.warmup = 1, 1, 1
        args.new_tokens, args.calibration_samples = 8, 4
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if min(args.repeats, args.decode_repeats, args.new_tokens, args.threads, args.rounds) < 1:
        parser.error(
            "--repeats, --decode-repeats, --new-tokens, --threads and --rounds must be >= 1"
        )
    return args


def device_line(name: str) -> tuple[str, str]:
    """The device to measure on, and one line saying so."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("speed.py: error: --device cuda, but no CUDA device is available")
        return name, f"GPU: {torch.cuda.get_device_name(torch.device(name))}"
    return "cpu", "no GPU measured: CPU only" + (
        "" if torch.cuda.is_available() else " (no CUDA device on this machine)"
    )


def run(args: argparse.Namespace, device: str, work: Path) -> list[dict[str, Any]]:
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(args.threads),
        "AECOMPRESS_CACHE": str(work / "cache"),  # calibration statistics of this run only
    }
    model = args.model
    if model == MODEL:
        folder = Path(tempfile.gettempdir()) / "aecompress-smollm2-fp32"
        copied = child({"kind": "copy", "folder": str(folder)}, env)
        if "error" in copied:
            raise SystemExit(f"speed.py: error: fp32 copy of {MODEL}: {copied['error']}")
        model = copied["folder"]
    common = {
        "kind": "measure",
        "threads": args.threads,
        "device": device,
        "repeats": args.repeats,
        "decode_repeats": args.decode_repeats,
        "warmup": args.warmup,
        "new_tokens": args.new_tokens,
        "all_logits": args.all_logits,
    }
    records: list[dict[str, Any]] = []
    planned: list[tuple[dict[str, Any], str, str]] = []  # measured again in later rounds

    def measured(given: dict[str, Any], folder: str, runtime: str) -> dict[str, Any]:
        spec = {**common, "folder": folder, "runtime": runtime, "matrices": given["matrices"]}
        record = {**given, "runtime": runtime, **child(spec, env)}
        records.append(record)
        shown = {k: record.get(k) for k in ("method", "ratio", "runtime", "round", "error")}
        figures = record.get("figures", {})
        shown |= {k: round(v["median"], 2) for k, v in figures.items()}
        print(json.dumps(shown), flush=True)
        if given["method"] != "dense" and given["round"] == 1:
            planned.append((given, folder, runtime))
        return record

    dense = {"method": "dense", "ratio": None, "matrices": matrix_sets(args.methods)}
    measured({**dense, "when": "start", "round": 1}, model, "dense")
    calibration = {"samples": args.calibration_samples, "seq_len": 128 if args.quick else 256}
    for ratio in args.ratios:
        for method in args.methods:
            artifact = work / f"{method}-{ratio}"
            spec = {
                "kind": "compress",
                "model": model,
                "method": method,
                "options": OPTIONS.get(method, {}),
                "ratio": ratio,
                "calibration": calibration,
                "artifact": str(artifact),
            }
            made = child(spec, env)
            base = {
                "method": method,
                "ratio": ratio,
                "options": spec["options"],
                "matrices": [matrices_of(method)],
                "round": 1,
            }
            if "error" in made:
                records.append({**base, "runtime": "compress", **made})
                print(json.dumps(records[-1]), flush=True)
                continue
            base |= {
                "stored_ratio": made["stored_ratio"],
                "compress_seconds": made["seconds"],
                "compress_wall_seconds": made["wall_seconds"],
            }
            served = measured(base, str(artifact), "runtime")
            if module_classes(served) == ["Linear"]:  # runtime modules are decoded ones
                records.append({**base, "runtime": "decoded", "same_as": "runtime"})
            else:
                measured(base, str(artifact), "decoded")
            if method in STRUCTURED_TARGETS:
                measured(base, f"{artifact}-plain", "exported")
    for number in range(2, args.rounds + 1):
        measured({**dense, "when": f"round {number}", "round": number}, model, "dense")
        for given, where, runtime in list(planned):
            measured({**given, "round": number}, where, runtime)
    measured({**dense, "when": "end", "round": args.rounds}, model, "dense")
    return records


def matrices_of(method: str) -> str:
    """The matrices a method compresses here, comma-joined (its modules-alone set)."""
    return ",".join(MATRICES.get(method, TARGETS))


def matrix_sets(methods: list[str]) -> list[str]:
    """The distinct sets of matrices the methods compress, in order (matrices_of)."""
    return list(dict.fromkeys(matrices_of(m) for m in methods))


def module_classes(record: dict[str, Any]) -> list[str]:
    """The classes of a compressed configuration's modules (none for a failed one)."""
    return [c for found in record.get("modules", {}).values() for c in found["module_classes"]]


# --- report ---------------------------------------------------------------------------

TIMES = ("modules_512", "modules_1", "prefill_1x512", "prefill_8x128", "decode_per_token")
SIZES = ("modules_bytes", "model_bytes", "rss_bytes")
MODULE_TIMES = tuple(f"modules_{tokens}" for tokens in MODULE_TOKENS)


def pooled(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records as the report reads them: the dense model's measurements as they are,
    each compressed configuration once, in its first place."""
    rows: list[dict[str, Any] | tuple[Any, ...]] = []
    rounds: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        if r["method"] == "dense":
            rows.append(r)
            continue
        key = (r["method"], r["ratio"], r["runtime"])
        if key not in rounds:
            rows.append(key)
        rounds.setdefault(key, []).append(r)
    return [merged(rounds[row]) if isinstance(row, tuple) else row for row in rows]


def merged(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's measurements in one record: each time the median over rounds of
    each round's median; `rounds` keeps them."""
    measured = [r for r in rounds if "figures" in r]
    if len(measured) < 2:
        return measured[0] if measured else rounds[0]

    def over_rounds(found: list[dict[str, Any]], key: str) -> dict[str, float]:
        return {"median": statistics.median(f[key]["median"] for f in found)}

    first = measured[0]
    figures = {k: over_rounds([r["figures"] for r in measured], k) for k in first["figures"]}
    modules = {
        name: {
            **found,
            **{k: over_rounds([r["modules"][name] for r in measured], k) for k in MODULE_TIMES},
        }
        for name, found in first["modules"].items()
    }
    return {**first, "figures": figures, "modules": modules, "rounds": measured}


def round_speedups(records: list[dict[str, Any]]) -> list[str]:
    """Each pooled configuration's whole-model speed-ups against the dense model measured
    at the start of the same round, lowest to highest."""
    dense: dict[int, dict[str, Any]] = {}
    for r in records:
        if r["method"] == "dense" and "figures" in r:
            dense.setdefault(r.get("round", 1), r)
    lines = []
    for r in records:
        if len(r.get("rounds", [])) < 2:
            continue
        spans = []
        for key, name in (("prefill_1x512", "prefill 1x512"), ("decode_per_token", "decode")):
            found = [
                dense[m["round"]]["figures"][key]["median"] / m["figures"][key]["median"]
                for m in r["rounds"]
                if m["round"] in dense
            ]
            spans.append(f"{name} {min(found):.2f}x-{max(found):.2f}x")
        lines.append(f"- {r['method']} at ratio {r['ratio']:g}, {served_as(r)}: {', '.join(spans)}")
    if not lines:
        return []
    count = max(len(r.get("rounds", [])) for r in records)
    return [
        "- Whole-model speed-ups in each round against the dense model measured at the start "
        f"of that round (up to {count} rounds), lowest to highest:",
        *[f"  {line}" for line in lines],
    ]


def view(record: dict[str, Any], matrices: str | None = None) -> dict[str, Any]:
    """A record as the report reads it: the modules-alone figures, bytes and classes of one
    set of its matrices (default: its own, a dense record's first) beside its whole-model
    figures."""
    if "modules" not in record:  # failed, or not measured again
        return record
    found = dict(record["modules"][matrices or record["matrices"][0]])
    times = {k: found.pop(k) for k in MODULE_TIMES}
    return {**record, **found, "figures": {**record["figures"], **times}}


def reference(records: list[dict[str, Any]], matrices: str) -> dict[str, float]:
    """The dense figures, with the modules alone of `matrices`: mean over the dense
    measurements (the start of each round and the end of the run)."""
    dense = [view(r, matrices) for r in records if r["method"] == "dense" and "error" not in r]
    if not dense:
        return {}
    ref = {k: statistics.mean(r["figures"][k]["median"] for r in dense) for k in TIMES}
    return ref | {k: statistics.mean(r[k] for r in dense) for k in SIZES}


def references(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """reference() for each set of matrices of the run."""
    sets = dict.fromkeys(m for r in records for m in r.get("matrices", []))
    return {m: reference(records, m) for m in sets}


def own(refs: dict[str, dict[str, float]], record: dict[str, Any]) -> dict[str, float]:
    """The reference of a compressed record's own matrices."""
    return refs[record["matrices"][0]]


def speedups(record: dict[str, Any], ref: dict[str, float]) -> dict[str, float]:
    """Speed-ups (dense time / time) and memory ratios (bytes / dense bytes)."""
    found = {k: ref[k] / record["figures"][k]["median"] for k in TIMES}
    return found | {k: record[k] / ref[k] for k in SIZES if ref[k]}


def verdict(record: dict[str, Any], ref: dict[str, float]) -> str:
    """The issue's target, for the runtime modules at its ratio (decoded rows: a control)."""
    if record["ratio"] != TARGET_RATIO or "figures" not in record:
        return "-"
    if record["runtime"] != "runtime":
        return "n/a (decoded)"
    ratios = speedups(record, ref)
    met = ratios["modules_512"] >= TARGET_SPEEDUP and ratios["modules_bytes"] <= TARGET_MEMORY
    return "met" if met else "not met"


def served_as(record: dict[str, Any]) -> str:
    if "when" in record:
        return f"dense, {record['when']} of the run"
    classes = ", ".join(record.get("module_classes", []))
    return f"{record['runtime']} ({classes})" if classes else record["runtime"]


def _time(record: dict[str, Any], key: str, ratios: dict[str, float]) -> str:
    return f"{record['figures'][key]['median']:.1f} ({ratios[key]:.2f}x)"


def _size(record: dict[str, Any], key: str, ratios: dict[str, float]) -> str:
    return f"{record[key] / MIB:.1f} ({ratios[key]:.2f}x)"


def tables(rows: list[dict[str, Any]], refs: dict[str, dict[str, float]]) -> list[str]:
    """One ratio's tables: the modules alone of each set of matrices (dense: the same
    modules), then the whole model."""
    lines = []
    for matrices, ref in refs.items():
        lines += [
            f"Compressed modules alone (the {matrices} matrices, summed; ms, speed-up vs dense; "
            "MiB, memory vs dense):",
            "",
            "| method | served as | stored ratio | 512 tokens ms | 1 token ms | MiB "
            f"| target (ratio {TARGET_RATIO:g}) |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            if matrices in r.get("matrices", []):
                lines.append(modules_row(view(r, matrices), ref))
        lines.append("")
    lines += [
        "Whole model (ms, speed-up vs dense; MiB, memory vs dense):",
        "",
        "| method | served as | prefill 1x512 ms | prefill 8x128 ms | decode ms/token "
        "| weights MiB | RSS after load MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(whole_row(view(r), own(refs, r)))
    return [*lines, ""]


def modules_row(r: dict[str, Any], ref: dict[str, float]) -> str:
    label = f"| {r['method']} | {served_as(r)} |"
    if "error" in r:
        return f"{label} failed: {r['error']} | | | | |"
    if "same_as" in r:
        note = f"same modules as `{r['same_as']}` (not measured again)"
        return f"{label} {r['stored_ratio']:.3f} | {note} | | | |"
    ratios = speedups(r, ref)
    stored = f"{r['stored_ratio']:.3f}" if r.get("stored_ratio") else "-"
    return (
        f"{label} {stored} | {_time(r, 'modules_512', ratios)} | "
        f"{_time(r, 'modules_1', ratios)} | {_size(r, 'modules_bytes', ratios)} | "
        f"{verdict(r, ref)} |"
    )


def whole_row(r: dict[str, Any], ref: dict[str, float]) -> str:
    label = f"| {r['method']} | {served_as(r)} |"
    if "error" in r:
        return f"{label} failed | | | | |"
    if "same_as" in r:
        return f"{label} same modules as `{r['same_as']}` (not measured again) | | | | |"
    ratios = speedups(r, ref)
    return (
        f"{label} {_time(r, 'prefill_1x512', ratios)} | {_time(r, 'prefill_8x128', ratios)} | "
        f"{_time(r, 'decode_per_token', ratios)} | {_size(r, 'model_bytes', ratios)} | "
        f"{_size(r, 'rss_bytes', ratios)} |"
    )


def notes(records: list[dict[str, Any]], refs: dict[str, dict[str, float]]) -> list[str]:
    """Targets and what the numbers say about each kind of runtime (from the data)."""
    records = [view(r) for r in records]
    lines = [
        f"## Targets: compressed modules at ratio {TARGET_RATIO:g} >= {TARGET_SPEEDUP}x "
        f"faster (512 tokens) and <= {TARGET_MEMORY}x the memory of the dense matrices",
        "",
    ]
    at_target = [
        r
        for r in records
        if r["ratio"] == TARGET_RATIO and "figures" in r and r["runtime"] == "runtime"
    ]
    for r in at_target:
        ratios = speedups(r, own(refs, r))
        lines.append(
            f"- {r['method']}, {served_as(r)}: speed-up {ratios['modules_512']:.2f}x, memory "
            f"{ratios['modules_bytes']:.2f}x: **{verdict(r, own(refs, r))}** (whole model: prefill "
            f"1x512 {ratios['prefill_1x512']:.2f}x, decode {ratios['decode_per_token']:.2f}x, "
            f"weights {ratios['model_bytes']:.2f}x)"
        )
    if not at_target:
        lines.append(f"- ratio {TARGET_RATIO:g} was not measured in this run")
    lines.append(
        "- the targets are for the runtime modules (`aecompress.load(ART)`); decoded rows are "
        "full-size dense matrices"
    )
    lines += ["", "## Notes", ""]
    sparse = [r for r in records if r["method"] in SPARSE and "figures" in r]
    if sparse:
        found = ", ".join(
            f"ratio {r['ratio']:g}: {speedups(r, own(refs, r))['modules_512']:.2f}x speed, "
            f"{speedups(r, own(refs, r))['modules_bytes']:.2f}x memory"
            for r in sparse
        )
        lines.append(
            "- Sparse methods store kept values + positions, but are served decoded: each "
            "matrix becomes a dense nn.Linear at load, zeros included, run by dense kernels. "
            f"**Sparse storage gives no speed-up and no memory saving at run time** ({found}); "
            "it only makes the artifact smaller."
        )
    decoder = [r for r in records if r.get("module_classes") == ["DecodedLinear"]]
    if decoder:
        found = ", ".join(
            f"ratio {r['ratio']:g}: {speedups(r, own(refs, r))['modules_512']:.2f}x / "
            f"decode {speedups(r, own(refs, r))['decode_per_token']:.2f}x"
            for r in decoder
        )
        lines.append(
            "- The AE's `runtime: decoder` (DecodedLinear) rebuilds its dense weight from the "
            "codes and the decoder on every forward pass, then multiplies with it: it saves "
            f"memory but costs time ({found}). `decode=True` serves the same artifact as "
            "dense matrices."
        )
    quantized = [r for r in records if "QuantizedLinear" in r.get("module_classes", [])]
    for r in quantized:  # issue 27: against the matrices' bf16 bytes (dense here is fp32)
        ratios = speedups(r, own(refs, r))
        lines.append(
            f"- {r['method']} at ratio {r['ratio']:g}, served packed (QuantizedLinear): its "
            f"modules hold {r['modules_bytes'] / MIB:.1f} MiB, "
            f"{2 * ratios['modules_bytes']:.3f}x the bf16 bytes of the dense matrices "
            f"(target <= {TARGET_QUANTIZED_MEMORY}x: "
            f"**{'met' if 2 * ratios['modules_bytes'] <= TARGET_QUANTIZED_MEMORY else 'not met'}"
            f"**); against the fp32 dense model: prefill 1x512 {ratios['prefill_1x512']:.2f}x, "
            f"8x128 {ratios['prefill_8x128']:.2f}x, decode {ratios['decode_per_token']:.2f}x "
            "(speed-ups)."
        )
    lines.append(
        "- `decoded` rows hold full-size dense matrices (the control: dense speed and "
        "memory expected); `runtime` rows are what `aecompress.load(ART)` gives."
    )
    return [*lines, *round_speedups(records)]


def markdown(facts: dict[str, Any], records: list[dict[str, Any]]) -> str:
    records = pooled(records)
    refs = references(records)
    dense = [r for r in records if r["method"] == "dense"]
    settings = facts["settings"]
    lines = [
        f"# Speed and memory: {facts['model']}, "
        + " / ".join(f"{', '.join(t)}" for t in facts["matrices"])
        + " compressed",
        "",
        f"- started {facts['date']}, {facts['minutes']:.1f} min; machine: {facts['machine']}",
        f"- load average at start {facts['load_start']}, at end {facts['load_end']} (1 / 5 / 15"
        " min; other processes may share the CPUs: times are upper bounds)",
        f"- {facts['device_line']}",
        f"- command: `{facts['command']}`",
        f"- times: median over {settings['rounds']} rounds (every configuration measured "
        "once per round, in turn, the dense model first) of the median of "
        f"{settings['repeats']} runs after {settings['warmup']} warm-up "
        f"(decode: {settings['decode_repeats']} runs of {settings['new_tokens']} new tokens "
        f"after a {PROMPT}-token prompt, greedy, KV cache, ms per new token), "
        f"torch.inference_mode, {settings['threads']} torch threads; prefill computes "
        f"{'every position' if settings['all_logits'] else 'the last position'}'s logits; "
        "random token ids",
        "- modules alone: the compressed modules (dense: the same nn.Linear modules) called "
        "one after another on random inputs of [1, 512, in] and [1, 1, in], summed; MiB: "
        "their parameters and buffers (float32 at run time, whatever the storage dtype)",
        "- whole model: weights = distinct parameter and buffer storages; RSS after load = "
        "resident memory after loading minus that after importing torch, transformers, "
        "aecompress (garbage collected, malloc_trim); the dense model's weights, which "
        "transformers memory-maps from the safetensors file, are copied into the process's "
        "own memory after loading, as an artifact's are",
        "- dense figures: mean of the dense model's measurements (at the start of each round "
        "and at the end of the run): "
        + "; ".join(
            f"prefill 1x512 {r['figures']['prefill_1x512']['median']:.1f} ms, decode "
            f"{r['figures']['decode_per_token']['median']:.1f} ms/token"
            for r in dense
            if "figures" in r
        ),
        "- compression: cheapest valid settings (quality is not measured and does not change "
        f"the shapes): {settings['compression']}",
    ]
    if max(facts["busy_start"], facts["busy_end"]) >= BUSY:
        lines.append(
            f"- **the machine was not idle** (other processes kept {facts['busy_start']:.1f} "
            f"of {facts['cores']} cores busy at the start, {facts['busy_end']:.1f} at the end): "
            "with as many torch threads as cores, OpenMP threads "
            "wait on each other when other processes hold a core, and times can be several "
            "times too slow (one 576 x 1536 Linear on 1 token measured 0.27 ms with 1 thread, "
            "12 ms with 2, on this 2-core machine at load 7.5); these numbers are not a "
            "benchmark result"
        )
    if facts.get("quick"):
        lines.append("- **--quick: a smoke test, not a benchmark result**")
    lines.append("")
    dense_rows = [r for r in records if r["method"] == "dense"]
    for ratio in facts["ratios"]:
        rows = dense_rows + [r for r in records if r["ratio"] == ratio]
        sets = {m for r in rows if r["method"] != "dense" for m in r["matrices"]}
        shown = {m: ref for m, ref in refs.items() if m in sets}
        lines += [f"## Ratio {ratio:g}", "", *tables(rows, shown or refs)]
    return "\n".join([*lines, *notes(records, refs)]) + "\n"


def main() -> None:
    args = parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(CHILDREN[spec.pop("kind")](spec)), flush=True)
        return
    device, line = device_line(args.device)
    print(line, flush=True)
    load_start = load_average(2)
    busy = busy_cores()
    if busy >= BUSY:
        print(f"warning: other processes keep {busy:.1f} cores busy: not idle", flush=True)
    began, start = datetime.now(UTC), time.perf_counter()
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        records = run(args, device, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="aecompress-speed-") as work:
            records = run(args, device, Path(work))
    compression = {m: {"pipeline": "independent", **OPTIONS.get(m, {})} for m in args.methods}
    compression["calibration (data-aware methods only)"] = {
        "samples": args.calibration_samples,
        "seq_len": 128 if args.quick else 256,
    }
    facts = {
        "model": args.model,
        "matrices": [m.split(",") for m in matrix_sets(args.methods)],
        "ratios": args.ratios,
        "methods": args.methods,
        "quick": args.quick,
        "date": f"{began:%Y-%m-%d %H:%M} UTC",
        "minutes": (time.perf_counter() - start) / 60,
        "machine": machine(),
        "load_start": load_start,
        "busy_start": busy,
        "cores": os.cpu_count(),
        "load_end": load_average(2),
        "busy_end": busy_cores(),
        "device": device,
        "device_line": line,
        "command": command(),
        "settings": {
            "repeats": args.repeats,
            "decode_repeats": args.decode_repeats,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "all_logits": args.all_logits,
            "compression": json.dumps(compression),
        },
    }
    out = args.out or Path(tempfile.mkdtemp(prefix="speed-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps({"facts": facts, "records": records}, indent=2))
    (out / "speed.md").write_text(markdown(facts, records))
    print(f"wrote {out / 'speed.md'}")


if __name__ == "__main__":
    main()
