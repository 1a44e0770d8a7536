"""Faults without loss, probed as a careful user and an adversary would (a probe suite, not a test).

    python benchmarks/fault_probes.py [--workdir DIR] [--groups kill,corrupt,bad-input,disk-full,concurrent]
                                      [--write-results]

trains `test`-preset CLIPs for a few steps on a small shapes data set and, per group, does what issue 17 lists:

- kill: SIGKILL a training at a point (between steps, inside each part of a checkpoint write, before its rename,
  while pruning, inside the final export, before the run record), resume with `--resume-from-checkpoint latest`;
  ok when the resumed run ends with the weights of an uninterrupted one, bit for bit, and a whole run record.
- corrupt: damage one file of the newest checkpoint (truncated, same-size garbage, deleted; and two pickles that
  would run code); ok when `latest` skips it and resumes from the one before, an explicit path to it fails with one
  line naming the file, and no code ran.
- bad-input: invalid command lines and files; ok when the command exits 2 with one line naming the argument, and no
  traceback.
- disk-full: a checkpoint, the final export, an index update and generated images on a real 2 MB file system (needs
  root to mount it; skipped otherwise); ok on one line saying "no space left on device", the earlier files intact.
- concurrent: two writers into one folder at once; ok when one is refused at once and the other's run is whole.

Prints one JSON object (rows: group, probe, expected, outcome, ok) and the counts per group; `--write-results` also
writes benchmarks/results/fault_probes.json (history kept). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from common import add_results_flag, machine, save_results

GROUPS = ("kill", "corrupt", "bad-input", "disk-full", "concurrent")
TRAIN = ["--model", "test", "--train-batch-size", "16", "--lr-warmup-steps", "2", "--seed", "0"]
STEPS = ["--max-train-steps", "6", "--checkpointing-steps", "2", "--validation-steps", "0"]


@dataclass
class Probe:
    group: str
    probe: str
    expected: str
    outcome: str
    ok: bool | None  # None: not run here (e.g. no small file system can be mounted)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ running commands


def cli(argv: list[str]) -> tuple[int, str, str]:
    """`clipcond ARGV` in this process: (exit code, stdout, stderr with the log records)."""
    from clipcond import cli as clipcond_cli
    from clipcond.train.loop import reset_accelerate_state

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = clipcond_cli.main(argv)
            except SystemExit as exit_:  # argparse's errors
                code = exit_.code if isinstance(exit_.code, int) else 1
            except Exception as error:  # a traceback a user would see
                import traceback

                traceback.print_exception(error, file=err)
                code = 1
    finally:
        logging.getLogger().removeHandler(handler)
        reset_accelerate_state()
    return code, out.getvalue(), err.getvalue()


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "clip", "--data", str(data), "--output-dir", str(out), *TRAIN, *STEPS, *extra]


def one_line_error(code: int, err: str, *needles: str) -> tuple[bool, str]:
    """Whether a command failed as a user error should: exit 2, no traceback, a last line naming `needles`."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    ok = code == 2 and "Traceback" not in err and all(n in last for n in needles)
    return ok, f"exit {code}: {last[:300]}"


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def reads_whole(folder: Path) -> bool:
    """Whether a run folder's weights load (a half-written file does not)."""
    from safetensors import SafetensorError

    try:
        weights(folder)
    except (OSError, SafetensorError):
        return False
    return True


def same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------------------------------- kill

# Each point patches one function of the child's training and SIGKILLs the process there, with no warning, as the OOM
# killer or a pre-empted node would. `n` counts the calls, so the kill lands in the second checkpoint (step 4).
KILL_POINTS = {
    "after step 1": "step:1",
    "after step 3 (between checkpoints)": "step:3",
    "after step 5 (after the last checkpoint)": "step:5",
    "inside save_state (weights written, optimizer not)": "save_state:2",
    "inside the extra state write": "save_file:2",
    "inside the checkpoint's pretrained/ export": "export_pretrained:2",
    "before the checkpoint's rename": "rename:2",
    "while pruning the oldest checkpoint": "prune:1",
    "inside the final export": "export_final:1",
    "before the run record": "run_record:1",
}


def child(point: str, argv: list[str]) -> int:
    """The killed side of a kill probe: `clipcond train clip ARGV`, SIGKILLed at `point` ("what:n")."""
    from accelerate import Accelerator

    from clipcond import runs
    from clipcond.train import clip as train_clip
    from clipcond.train import loop

    what, n = point.split(":")
    calls = {"n": 0}

    def die_on_call() -> None:
        calls["n"] += 1
        if calls["n"] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name: str, before: bool = False, when: Callable = lambda *a, **k: True) -> None:
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            if before and when(*args, **kwargs):
                die_on_call()
            result = original(*args, **kwargs)
            if not before and when(*args, **kwargs):
                die_on_call()
            return result

        setattr(owner, name, patched)

    if what == "step":
        wrap(train_clip.ClipStage, "after_optimizer_step")
    elif what == "save_state":
        original = Accelerator.save_state

        def half_saved(self, output_dir, **kwargs):  # the model's weights written, then killed
            self.unwrap_model(self._models[0]).clip.save_pretrained(output_dir, safe_serialization=True)
            die_on_call()
            return original(self, output_dir, **kwargs)

        Accelerator.save_state = half_saved
    elif what == "save_file":
        wrap(loop, "save_file", before=True)
    elif what == "export_pretrained":
        wrap(train_clip.ClipStage, "export", when=lambda self, path: path.name == "pretrained")
    elif what == "rename":
        wrap(loop.os, "replace", before=True, when=lambda src, dst: Path(src).name.startswith(".checkpoint-"))
    elif what == "prune":
        original_rmtree = loop.shutil.rmtree

        def half_pruned(path, *args, **kwargs):  # part of the old checkpoint gone, then killed
            if Path(path).name.startswith("checkpoint-"):
                (Path(path) / "model.safetensors").unlink()
                die_on_call()
            return original_rmtree(path, *args, **kwargs)

        loop.shutil.rmtree = half_pruned
    elif what == "export_final":
        wrap(train_clip.ClipStage, "export", when=lambda self, path: path.name.startswith(".export."))
    elif what == "run_record":
        wrap(runs, "write_json_atomic", before=True, when=lambda path, obj: Path(path).name == runs.RUN_RECORD)
    return train_clip.main(argv)


def kill_probes(data: Path, work: Path) -> list[Probe]:
    straight = work / "straight"
    code, _, err = cli(train_argv(data, straight))
    assert code == 0, err[-2000:]
    rows = []
    for name, point in KILL_POINTS.items():
        out = work / f"killed-{point.replace(':', '-')}"
        extra = ["--checkpoints-total-limit", "2"] if point.startswith("prune") else []
        argv = train_argv(data, out, *extra)[2:]
        done = subprocess.run(
            [sys.executable, __file__, "--child", point, "--", *argv], capture_output=True, text=True, timeout=600
        )
        killed = done.returncode == -signal.SIGKILL
        code, _, err = cli(train_argv(data, out, *extra, "--resume-from-checkpoint", "latest"))
        record = out / "clipcond_run.json"
        whole = record.is_file() and json.loads(record.read_text())["summary"]["final_loss"] is not None
        exact = code == 0 and same_weights(out, straight)
        outcome = f"killed: {killed}; resume exit {code}; weights bit-exact: {exact}; run record whole: {whole}"
        rows.append(Probe("kill", name, "resumes to the uninterrupted weights", outcome, killed and exact and whole))
        log(f"kill / {name}: {outcome}")
    return rows


# ------------------------------------------------------------------------------------------------ corrupt


class RunsCode:
    """A pickle that, when loaded with `pickle.load`, would create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def corruptions(marker: Path) -> dict[str, tuple[str, Callable[[Path], None]]]:
    def truncate(p: Path) -> None:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    def garbage(p: Path) -> None:
        p.write_bytes(os.urandom(p.stat().st_size))

    def malicious(p: Path) -> None:
        p.write_bytes(pickle.dumps(RunsCode(marker)))

    files = [
        "model.safetensors",
        "optimizer.bin",
        "scheduler.bin",
        "extra_state.safetensors",
        "random_states_0.pkl",
        "training_state.json",
        "pretrained/model.safetensors",
        "pretrained/config.json",
    ]
    cases = {}
    for f in files:
        cases[f"{f} truncated"] = (f, truncate)
        cases[f"{f} same-size garbage"] = (f, garbage)
        cases[f"{f} deleted"] = (f, lambda p: p.unlink())
    cases["optimizer.bin a code-running pickle"] = ("optimizer.bin", malicious)
    cases["random_states_0.pkl a code-running pickle"] = ("random_states_0.pkl", malicious)
    return cases


def corrupt_probes(data: Path, work: Path) -> list[Probe]:
    base = work / "base"
    code, _, err = cli(train_argv(data, base, "--max-train-steps", "4"))
    assert code == 0, err[-2000:]
    marker = work / "code-ran"
    rows = []
    for name, (file, damage) in corruptions(marker).items():
        run = work / "corrupt"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run)
        (run / "clipcond_run.json").unlink()
        newest = run / "checkpoints" / "checkpoint-4"
        damage(newest / file)
        explicit = cli(train_argv(data, run, "--max-train-steps", "4", "--resume-from-checkpoint", str(newest)))
        named, explicit_outcome = one_line_error(*explicit[::2], "--resume-from-checkpoint", Path(file).name)
        code, _, err = cli(train_argv(data, run, "--max-train-steps", "4", "--resume-from-checkpoint", "latest"))
        record = json.loads((run / "clipcond_run.json").read_text()) if code == 0 else {}
        fell_back = str(record.get("summary", {}).get("resumed_from", "")).endswith("checkpoint-2")
        skipped = f"skipping the damaged checkpoint {newest}" in err
        ran = marker.exists()
        outcome = (
            f"latest: exit {code}, fell back to checkpoint-2: {fell_back}, said so: {skipped}; explicit: "
            f"{explicit_outcome}; code ran: {ran}"
        )
        ok = code == 0 and fell_back and skipped and named and not ran
        rows.append(Probe("corrupt", name, "skipped, named, resumed from the one before", outcome, ok))
        log(f"corrupt / {name}: {'ok' if ok else 'FAILED'} ({outcome})")
    return rows


# ---------------------------------------------------------------------------------------------- bad input


# (probe, command line, words the one-line error must contain). The command lines are templates: {train} is a tiny
# `train clip` on the data set without its --output-dir, {decoder} / {prior} those stages on the probes' CLIP,
# {generate} a `generate` of a decoder that does not exist; {work}, {data}, {clip}, {file} (an existing file) and
# {latin1} (a data set whose metadata is Latin-1) are paths.
BAD_INPUTS = [
    ("train: --learning-rate nan", "{train} --output-dir {work}/o1 --learning-rate nan", "--learning-rate"),
    ("train: --learning-rate inf", "{train} --output-dir {work}/o2 --learning-rate inf", "--learning-rate"),
    ("train: --max-train-steps 0", "{train} --output-dir {work}/o3 --max-train-steps 0", "--max-train-steps"),
    ("train: --max-grad-norm -inf", "{train} --output-dir {work}/o4 --max-grad-norm=-inf", "--max-grad-norm"),
    ("train: --output-dir an existing file", "{train} --output-dir {file}", "--output-dir"),
    ("train: --output-dir under a file", "{train} --output-dir {file}/run", "--output-dir"),
    ("train: --data missing", "train clip --data {work}/nowhere --output-dir {work}/o5", "nowhere"),
    ("train: metadata not UTF-8", "train clip --data {latin1} --output-dir {work}/o6", "metadata.jsonl|line 1"),
    (
        "train: --resume-from-checkpoint missing",
        "{train} --output-dir {work}/o7 --resume-from-checkpoint {work}/x",
        "--resume-from-checkpoint",
    ),
    (
        "train clip: --max-skipped-fraction 2",
        "{train} --output-dir {work}/o8 --max-skipped-fraction 2",
        "--max-skipped-fraction",
    ),
    ("generate: --guidance-scale nan", "{generate} --guidance-scale nan", "--guidance-scale"),
    ("generate: --guidance-scale inf", "{generate} --guidance-scale inf", "--guidance-scale"),
    ("generate: --model missing", "{generate}", "--model"),
    ("generate: --num-inference-steps 0", "{generate} --num-inference-steps 0", "--num-inference-steps"),
    ("generate: --num-images 0", "{generate} --num-images 0", "--num-images"),
    ("generate: --scheduler unknown", "{generate} --scheduler bogus", "--scheduler"),
    ("generate: guidance interval reversed", "{generate} --guidance-start 0.8 --guidance-end 0.2", "guidance"),
    (
        "generate: --prompts-file missing",
        "generate --model {work}/no-decoder --prompts-file {work}/none.txt --output-dir {work}/g",
        "--prompts-file",
    ),
    (
        "train decoder: --clip missing",
        "train decoder --clip {work}/nowhere --data {data} --output-dir {work}/d1",
        "--clip",
    ),
    ("train decoder: --clip not a CLIP", "train decoder --clip {data} --data {data} --output-dir {work}/d2", "--clip"),
    ("train decoder: --snr-gamma nan", "{decoder} --output-dir {work}/d3 --snr-gamma nan", "--snr-gamma"),
    (
        "train decoder: --caption-dropout 1.5",
        "{decoder} --output-dir {work}/d4 --caption-dropout 1.5",
        "--caption-dropout",
    ),
    ("train prior: --ema-decay=-inf", "{prior} --output-dir {work}/p1 --ema-decay=-inf", "--ema-decay"),
    (
        "eval clip: --model an unfinished run",
        "eval clip --model {work}/unfinished --data {data} --output-dir {work}/e1",
        "unfinished",
    ),
    (
        "eval clip: --output-dir an existing file",
        "eval clip --model {clip} --data {data} --output-dir {file}",
        "--output-dir",
    ),
    ("index: FOLDER missing", "index {work}/nowhere --model {clip} --output {work}/i1", "nowhere"),
    ("index: --batch-size 0", "index {data}/test --model {clip} --output {work}/i2 --batch-size 0", "--batch-size"),
    ("index: --output an existing file", "index {data}/test --model {clip} --output {file}", "--output"),
    ("search: --top-k 0", "search 'a red circle' --index {work}/good-index --top-k 0", "--top-k"),
    ("search: --image not an image", "search --image {file} --index {work}/good-index", "a-file"),
    ("search: --index with NaN embeddings", "search 'a red circle' --index {work}/nan-index", "NaN"),
    ("search: --index rows and files differ", "search 'a red circle' --index {work}/short-index", "--index"),
    ("data convert: source missing", "data convert {work}/nowhere --output-dir {work}/c1", "nowhere"),
    ("data convert: --shard-size 0", "data convert {data} --output-dir {work}/c2 --shard-size 0", "--shard-size"),
]


def bad_input_cases(data: Path, clip_run: Path, work: Path) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """`BAD_INPUTS` with their paths filled in: (probe, argv, needles)."""
    a_file = work / "a-file"
    a_file.write_text("x")
    latin1 = work / "latin1"
    (latin1 / "train").mkdir(parents=True, exist_ok=True)
    (latin1 / "train" / "metadata.jsonl").write_bytes('{"file_name": "a.png", "text": "caf\xe9"}\n'.encode("latin-1"))
    stage = f"--clip {clip_run} --data {data}"
    fields = {
        "train": " ".join(["train clip --data", str(data), *TRAIN, *STEPS]),
        "decoder": f"train decoder {stage}",
        "prior": f"train prior {stage}",
        "generate": f"generate --model {work}/no-decoder --prompt 'a red circle' --output-dir {work}/g",
        "work": work,
        "data": data,
        "clip": clip_run,
        "file": a_file,
        "latin1": latin1,
    }
    return [
        (probe, shlex.split(template.format(**fields)), tuple(needles.split("|")))
        for probe, template, needles in BAD_INPUTS
    ]


def crafted_indexes(data: Path, clip_run: Path, work: Path) -> None:
    """An index of the test split, then two copies: one with NaN embeddings, one with a row missing."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = work / "good-index"
    code, _, err = cli(["index", str(data / "test"), "--model", str(clip_run), "--output", str(good), "--no-progress"])
    assert code == 0, err[-2000:]
    for name, change in (("nan-index", lambda e: e.fill_(float("nan"))), ("short-index", lambda e: e[:-1])):
        shutil.copytree(good, work / name)
        path = work / name / "embeddings.safetensors"
        with safe_open(path, framework="pt") as f:
            metadata, embeddings = f.metadata(), f.get_tensor("embeddings")
        save_file({"embeddings": change(embeddings.clone()).contiguous()}, path, metadata=metadata)


def bad_input_probes(data: Path, work: Path) -> list[Probe]:
    clip_run = work / "clip"
    code, _, err = cli(train_argv(data, clip_run, "--max-train-steps", "2"))
    assert code == 0, err[-2000:]
    unfinished = work / "unfinished"
    shutil.copytree(clip_run, unfinished)
    (unfinished / "clipcond_run.json").unlink()
    crafted_indexes(data, clip_run, work)
    rows = []
    for name, argv, needles in bad_input_cases(data, clip_run, work):
        ok, outcome = one_line_error(*cli(argv)[::2], *needles)
        rows.append(Probe("bad-input", name, "exit 2, one line naming " + ", ".join(needles), outcome, ok))
        log(f"bad-input / {name}: {'ok' if ok else 'FAILED'} ({outcome})")
    return rows


# ---------------------------------------------------------------------------------------------- disk full


class CannotMount(Exception):
    pass


@contextlib.contextmanager
def small_filesystem(where: Path, size: str = "2m"):
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        raise CannotMount(done.stderr.decode().strip() or "mount failed")
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=False)


def fill(folder: Path, leave: int = 0) -> None:
    with open(folder / "filler", "wb") as f, contextlib.suppress(OSError):
        f.write(b"\0" * max(0, shutil.disk_usage(folder).free - leave))


def disk_full_probes(data: Path, work: Path) -> list[Probe]:
    from clipcond.train.loop import damage

    rows = []
    expected = "exit 2, one line 'no space left on device', earlier files intact"
    try:
        with small_filesystem(work / "fs1", "24m") as fs:  # a checkpoint (~7 MB) fits; the next does not
            run = fs / "run"
            cli(train_argv(data, run, "--max-train-steps", "2"))
            fill(fs)
            code, _, err = cli(train_argv(data, run, "--max-train-steps", "4", "--resume-from-checkpoint", "latest"))
            ok, outcome = one_line_error(code, err, "no space left on device")
            intact = damage(run / "checkpoints" / "checkpoint-2") is None
            scratch = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
            outcome += f"; checkpoint-2 intact: {intact}; scratch left: {scratch}"
            rows.append(Probe("disk-full", "a checkpoint", expected, outcome, ok and intact and not scratch))
        with small_filesystem(work / "fs4", "24m") as fs:  # the first checkpoint: no earlier one to estimate from
            run = fs / "run"
            (run / "checkpoints").mkdir(parents=True)
            fill(fs)
            ok, outcome = one_line_error(*cli(train_argv(data, run, "--max-train-steps", "2"))[::2], "no space left")
            scratch = [p.name for p in (run / "checkpoints").iterdir()]
            outcome += f"; left in checkpoints/: {scratch}"
            rows.append(Probe("disk-full", "the first checkpoint", expected, outcome, ok and not scratch))
        with small_filesystem(work / "fs2", "24m") as fs:
            run = fs / "run"
            argv = train_argv(data, run, "--max-train-steps", "2", "--checkpointing-steps", "0")
            cli(argv)
            (run / "clipcond_run.json").unlink()  # a second attempt at the export, on a full disk
            fill(fs)
            ok, outcome = one_line_error(*cli(argv)[::2], "no space left on device")
            left = sorted(p.name for p in run.iterdir() if p.name.startswith(".export"))
            earlier = reads_whole(run)  # the first export's weights
            outcome += f"; scratch left: {left}; the earlier model reads: {earlier}"
            rows.append(Probe("disk-full", "the final export", expected, outcome, ok and not left and earlier))
        with small_filesystem(work / "fs3", "1m") as fs:
            clip_run = work / "clip-df"
            cli(train_argv(data, clip_run, "--max-train-steps", "2"))
            images = work / "images"
            shutil.copytree(data / "test", images, dirs_exist_ok=True)
            index = fs / "index"
            argv = ["index", str(images), "--model", str(clip_run), "--output", str(index), "--no-progress"]
            cli(argv)
            for i, p in enumerate(sorted(images.glob("*.png"))):
                shutil.copy(p, images / f"copy{i}.png")
            fill(fs)
            ok, outcome = one_line_error(*cli(argv)[::2], "no space left on device")
            rows.append(Probe("disk-full", "an index update", expected, outcome, ok))
    except CannotMount as error:
        rows.append(
            Probe("disk-full", "(all)", expected, f"not run: cannot mount a small file system ({error})", None)
        )
    for row in rows:
        log(f"disk-full / {row.probe}: {'ok' if row.ok else 'FAILED'} ({row.outcome})")
    return rows


# --------------------------------------------------------------------------------------------- concurrent


def concurrent_probes(data: Path, work: Path) -> list[Probe]:
    out = work / "shared-run"
    procs = []
    for seed in ("0", "1"):
        argv = train_argv(data, out, "--seed", seed)  # the later --seed wins
        command = [sys.executable, "-m", "clipcond", *argv]
        procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        time.sleep(0.5)
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    refused = [err for code, err in results if code == 2]
    finished = out / "clipcond_run.json"
    seed = json.loads(finished.read_text())["args"]["seed"] if finished.is_file() else None
    ok = codes == [0, 2] and refused and "is in use by another run" in refused[0].strip().splitlines()[-1]
    from clipcond.train.loop import damage

    intact = all(damage(p) is None for p in (out / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    outcome = f"exit codes {codes}; refused: {refused[0].strip().splitlines()[-1][:200] if refused else None}; "
    outcome += f"finished run's seed {seed}; its checkpoints intact: {intact}"
    row = Probe(
        "concurrent",
        "two trainings into one --output-dir",
        "one refused at once, one whole run",
        outcome,
        bool(ok and intact),
    )
    log(f"concurrent / {row.probe}: {'ok' if row.ok else 'FAILED'} ({outcome})")
    return [row]


# ------------------------------------------------------------------------------------------------- the entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/fault_probes.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: the killed side of a kill probe
    add_results_flag(parser)
    args, rest = parser.parse_known_args(argv)
    args.rest = rest[1:] if rest[:1] == ["--"] else rest
    groups = [g for g in args.groups.split(",") if g]
    if args.child is None and (unknown := set(groups) - set(GROUPS)):
        raise ValueError(f"`--groups` names unknown groups {sorted(unknown)}; choose from {list(GROUPS)}")
    args.groups = groups
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child(args.child, args.rest)
    from clipcond.data.shapes import write_shapes_dataset

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="clipcond-faults-"))
    data = work / "data"
    if not data.is_dir():
        write_shapes_dataset(data, num_images=276, num_test_images=36, resolution=32, seed=0)
    probes = {
        "kill": kill_probes,
        "corrupt": corrupt_probes,
        "bad-input": bad_input_probes,
        "disk-full": disk_full_probes,
        "concurrent": concurrent_probes,
    }
    started = time.perf_counter()
    rows = []
    for group in args.groups:
        (work / group).mkdir(parents=True, exist_ok=True)
        rows += probes[group](data, work / group)
    counts = {
        g: {
            "ok": sum(r.ok is True for r in rows if r.group == g),
            "of": sum(r.group == g and r.ok is not None for r in rows),
            "not_run": sum(r.group == g and r.ok is None for r in rows),
        }
        for g in args.groups
    }
    report = {
        "benchmark": "fault_probes",
        "command": " ".join(["python", "benchmarks/fault_probes.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "counts": counts,
        "all_ok": all(r.ok is not False for r in rows),
        "rows": [asdict(r) for r in rows],
    }
    print(json.dumps(report, indent=2))
    if args.save_results:
        log(f"wrote {save_results('fault_probes', report)}")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
