"""Peak resident memory of the text-embedding cache, building it and looking rows up, at 10k-100k captions: the code
at this commit against the single-file cache that came before it.

    python benchmarks/cache_memory.py [--sizes 10000 100000] [--before-sizes 5000 10000] [--before 31949f1]
                                      [--lookups 50] [--work-dir DIR] [--save-results]

It is storage that is measured, not an encoder: the encoder is a random `CLIPTextModelWithProjection` of a CLIP-L
text width (hidden size 768, context 77, projection 768) without transformer layers (embeddings and the final layer
norm only), so that its outputs cost little to make while every cached caption takes what a CLIP-L text tower's
does, 77 x 768 fp16 states (about 118 KB) plus mask, pooled embedding and length.

Each figure comes from a fresh subprocess (`--worker`), which reports its peak resident set (`VmHWM` of
/proc/self/status) and its resident set just before the phase (after imports, the encoder and the caption list):
- build: `TextEmbeddingCache.build_or_load` into an empty folder (batches of `--encode-batch-size` captions);
- lookup: `build_or_load` finding that cache (the encoder is never run: checked), then `--lookups` batches of
  `--batch-size` random rows (`attended_columns` and `lookup` of all columns, as a training step takes them);
- lookup_mmap (this commit only): the same rows read from the row store with `mmap=True`, to show what memory
  mapping leaves counted in the resident set (every page touched, until the kernel reclaims it), against the
  default of reading rows with `os.preadv` into fresh tensors (what a lookup needs, nothing more).
The "before" code is `git archive` of `--before` (the last commit with the single-file cache), imported by the
worker in place of this tree's. The resident set does not count the kernel's page cache, which keeps what was
written or read while memory is free (shared and reclaimable) in both versions.

Sizes whose cache does not fit the free disk (or, for the code that reads the whole cache into memory, whose build
would need more than half the available memory: it holds about five times the rows while it concatenates and
serialises them) are skipped, with the reason in the results. `--save-results` writes
benchmarks/results/cache_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_results_flag, command_line, machine, save_results

ROOT = Path(__file__).resolve().parents[1]
WIDTH, CONTEXT = 768, 77  # CLIP ViT-L/14's text tower
MiB = 2**20
WORDS = [
    *("a", "an", "the", "red", "blue", "green", "yellow", "purple", "orange", "black", "white", "small", "big"),
    *("large", "tiny", "huge", "circle", "square", "triangle", "star", "heart", "cross", "ring", "dot", "line"),
    *("left", "right", "top", "bottom", "above", "below", "beside", "near", "far", "two", "three", "four", "five"),
    *("many", "bright", "dark", "pale", "striped", "spotted", "shiny", "dull", "round", "sharp", "soft"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/cache_memory.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="captions, this commit")
    parser.add_argument(
        "--before-sizes", type=int, nargs="+", default=[5_000, 10_000], help="captions, the --before code"
    )
    parser.add_argument("--before", default="31949f1", help="git revision of the single-file cache ('none': skip)")
    parser.add_argument("--lookups", type=int, default=50, help="random batches looked up")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per looked-up batch")
    parser.add_argument("--encode-batch-size", type=int, default=256, help="captions per encoder call")
    parser.add_argument("--work-dir", default=None, help="where the caches are written (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a phase, in a subprocess
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--num-captions", type=int, default=None, help=argparse.SUPPRESS)
    add_results_flag(parser)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ the worker


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def captions_for(n: int, seed: int) -> list[str]:
    """`n` distinct captions of 4-24 words (numbered: distinct), the same for a seed in every process."""
    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choices(WORDS, k=rng.randint(4, 24))) for i in range(n)]


def encoder_and_tokenizer(seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from clipcond.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(captions_for(2000, seed), vocab_size=1024, context_length=CONTEXT)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        intermediate_size=8,
        num_hidden_layers=0,  # storage is measured, not the encoder: embeddings and the final layer norm only
        num_attention_heads=1,
        max_position_embeddings=CONTEXT,
        projection_dim=WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval().requires_grad_(False), tokenizer


def worker(args: argparse.Namespace) -> dict:
    import torch

    import clipcond
    from clipcond.conditioning import TextEmbeddingCache

    torch.set_num_threads(1)
    encoder, tokenizer = encoder_and_tokenizer(args.seed)
    calls = []
    encoder.register_forward_hook(lambda *_: calls.append(1))
    captions = captions_for(args.num_captions, args.seed)
    build = {"batch_size": args.encode_batch_size, "progress": False}
    result = {"clipcond": str(Path(clipcond.__file__).parent)}
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    if args.worker == "build":
        cache = TextEmbeddingCache.build_or_load(encoder, tokenizer, captions, args.cache_dir, **build)
        result["encoder_calls"] = len(calls)
    elif args.worker in ("lookup", "lookup_mmap"):
        rng = torch.Generator().manual_seed(args.seed)
        batches = [torch.randint(0, len(captions), (args.batch_size,), generator=rng) for _ in range(args.lookups)]
        if args.worker == "lookup":
            cache = TextEmbeddingCache.build_or_load(encoder, tokenizer, captions, args.cache_dir, **build)
            result["load_s"] = round(time.perf_counter() - start, 3)
            result["encoder_calls"] = len(calls)  # 0: found, not rebuilt
            start = time.perf_counter()
            for rows in batches:
                text = cache.lookup(rows, cache.attended_columns(rows, with_empty=True))
                assert text.hidden_states.shape[0] == args.batch_size
        else:
            from clipcond.row_store import RowStore

            (path,) = [p for p in Path(args.cache_dir).iterdir() if p.is_dir()]
            store = RowStore(path, mmap=True)
            result["load_s"] = round(time.perf_counter() - start, 3)
            start = time.perf_counter()
            for rows in batches:
                store.read(rows, ["hidden_states", "attention_mask", "pooled"])
        result["lookup_ms_per_batch"] = round(1000 * (time.perf_counter() - start) / max(args.lookups, 1), 2)
    else:
        raise ValueError(f"`--worker` must be build, lookup or lookup_mmap; got {args.worker!r}")
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["rss_before_mib"] = round(before / 1024, 1)
    result["peak_rss_mib"] = round(_status_kib("VmHWM") / 1024, 1)
    result["peak_above_before_mib"] = round(result["peak_rss_mib"] - result["rss_before_mib"], 1)
    return result


# ------------------------------------------------------------------------------------------------ the driver


def row_bytes() -> int:
    """Bytes a caption takes in the cache: fp16 states and pooled, uint8 mask (and a 16-bit length after)."""
    return CONTEXT * WIDTH * 2 + CONTEXT + WIDTH * 2 + 2


def checkout(revision: str, into: Path) -> Path:
    """The tree of `revision` as an importable package folder (`clipcond.train` and `clipcond.pipelines` mapped as
    pyproject maps them)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    for name in ("train", "pipelines"):
        (into / "clipcond" / name).symlink_to(into / name)
    return into


def run_worker(phase: str, n: int, cache_dir: Path, args: argparse.Namespace, pythonpath: Path | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", phase, "--cache-dir", str(cache_dir)]
    argv += ["--num-captions", str(n), "--seed", str(args.seed), "--lookups", str(args.lookups)]
    argv += ["--batch-size", str(args.batch_size), "--encode-batch-size", str(args.encode_batch_size)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=pythonpath or ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"the {phase} worker at {n} captions failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(version: str, n: int, work: Path, args: argparse.Namespace, pythonpath: Path | None) -> dict:
    cache_dir = work / f"{version}-{n}"
    size = n * row_bytes()
    free = shutil.disk_usage(work).free
    if size * 1.1 > free:
        return {"skipped": f"the cache takes {size / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on {work}"}
    if version == "before" and 5 * size > available_bytes() / 2:
        return {
            "skipped": f"the single-file cache holds about five times its {size / 2**30:.1f} GiB of rows while it "
            f"builds; {available_bytes() / 2**30:.1f} GiB available on a shared machine"
        }
    try:
        case = {"captions": n, "cache_mib": round(size / MiB, 1)}
        case["build"] = run_worker("build", n, cache_dir, args, pythonpath)
        case["disk_mib"] = round(sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file()) / MiB, 1)
        case["lookup"] = run_worker("lookup", n, cache_dir, args, pythonpath)
        if version == "after":
            case["lookup_mmap"] = run_worker("lookup_mmap", n, cache_dir, args, pythonpath)
        return case
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    report = {
        "benchmark": "cache_memory",
        "unit": "MiB",
        "goal": "the cache's memory does not grow with the number of captions: building holds a shard, a lookup "
        "its rows; before, both held the whole cache",
        "method": "VmHWM (peak resident set) of a fresh subprocess per phase; page cache not counted",
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("save_results", "worker", "cache_dir")},
        "command": command_line("cache_memory", argv),
        "text_width": WIDTH,
        "context": CONTEXT,
        "bytes_per_caption": row_bytes(),
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="cache-memory-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        versions = [("after", None, args.sizes)]
        if args.before != "none":
            versions.insert(0, ("before", checkout(args.before, work / "before-code"), args.before_sizes))
        for version, pythonpath, sizes in versions:
            for n in sorted(set(sizes)):
                name = f"{version}_{n}"
                report["cases"][name] = {"version": args.before if version == "before" else "this commit"}
                report["cases"][name] |= measure(version, n, work, args, pythonpath)
                print(name, json.dumps(report["cases"][name]), file=sys.stderr, flush=True)
    after = {c["captions"]: c for name, c in report["cases"].items() if name.startswith("after") and "build" in c}
    if len(after) >= 2:
        small, large = after[min(after)], after[max(after)]
        report["after_growth"] = {
            "captions": [min(after), max(after)],
            "build_peak_above_before_mib": [
                small["build"]["peak_above_before_mib"],
                large["build"]["peak_above_before_mib"],
            ],
            "lookup_peak_above_before_mib": [
                small["lookup"]["peak_above_before_mib"],
                large["lookup"]["peak_above_before_mib"],
            ],
        }
        report["meets_goal"] = (
            large["build"]["peak_above_before_mib"] < 0.1 * large["cache_mib"]
            and large["lookup"]["peak_above_before_mib"] < 0.1 * large["cache_mib"]
        )
    print(json.dumps(report, indent=2))
    if args.save_results:
        save_results("cache_memory", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
