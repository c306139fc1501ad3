"""The GPU check: everything the fake-device tests prove on CPUs, once on a real GPU, and the
speed figures, in one table. Run by scripts/gpu_check.sh (which sets up MPI); writes into OUT:
table.md (the table), results.json (the same, with figures) and log.txt (every command's output).

    python scripts/gpu_check.py OUT [--rehearse]

`--rehearse` runs the same steps on CPUs under the strict fake CuPy (tests/fakegpu) with small
benchmark shapes: the script's own logic is checked where GPU time costs nothing, so the minutes
on a GPU are spent measuring, not debugging the script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = "--layers 4 --d-model 256 --heads 4 --seq-len 256 --global-batch 16 --microbatches 4"
TINY = "--layers 4 --d-model 32 --heads 2 --seq-len 16 --global-batch 8 --microbatches 4"
COMMON = "--steps 3 --eval-batches 1 --eval-every 0 --log-every 1 --timeout-s 120 --backend cupy"
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zbv")


class Check:
    def __init__(self, out: Path, rehearse: bool) -> None:
        self.out, self.rehearse = out, rehearse
        self.rows: list[dict[str, object]] = []
        self.log = (out / "log.txt").open("w")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        path = [str(ROOT)]
        if rehearse:
            path.insert(0, str(ROOT / "tests" / "fakegpu"))
        self.env["PYTHONPATH"] = os.pathsep.join([*path, self.env.get("PYTHONPATH", "")])
        self.model = TINY if rehearse else SMALL
        self.mpiexec = shutil.which("mpiexec")

    def sh(self, args: list[str], limit: float = 240) -> tuple[int, str]:
        """Run `args` (output logged); a timeout counts as failure (status 124)."""
        self.log.write(f"\n$ {' '.join(args)}\n")
        self.log.flush()
        try:
            r = subprocess.run(
                args, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=limit
            )
            code, text = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            code, text = 124, f"{e.stdout or ''}{e.stderr or ''}\n[timed out after {limit} s]"
        self.log.write(text if isinstance(text, str) else text.decode())
        self.log.flush()
        return code, text if isinstance(text, str) else text.decode()

    def train(self, name: str, n: int, flags: str) -> list[dict[str, float]] | None:
        """Train on `n` ranks sharing the GPU (staged transport); the metrics, or None."""
        metrics = self.out / "runs" / f"{name}.jsonl"
        metrics.parent.mkdir(exist_ok=True)
        metrics.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "mpipipe", "train", *self.model.split(), *COMMON.split()]
        cmd += [*flags.split(), "--metrics-file", str(metrics), "--share-gpus", "yes"]
        if n > 1:
            if self.mpiexec is None:
                return None
            cmd = [self.mpiexec, "-n", str(n), *cmd]
        code, _ = self.sh(cmd)
        if code != 0 or not metrics.exists():
            return None
        return [json.loads(line) for line in metrics.read_text().splitlines()]

    def row(self, check: str, fn: Callable[[], tuple[bool | None, str]]) -> None:
        t0 = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as e:  # one broken check must not cost the others
            ok, detail = False, f"{type(e).__name__}: {e}"
        row = {"check": check, "ok": ok, "detail": detail, "s": round(time.perf_counter() - t0)}
        self.rows.append(row)
        print(f"{check}: {'ok' if ok else 'n/a' if ok is None else 'FAILED'} {detail}", flush=True)


def losses(recs: list[dict[str, float]] | None) -> list[tuple[float, float]] | None:
    return None if recs is None else [(r["loss"], r["grad_norm"]) for r in recs]


def rel_diff(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    return max(
        abs(x - y) / abs(y) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True)
    )


def equal_runs(
    c: Check, ref: str, runs: dict[str, tuple[int, str]], tol: float = 0.0
) -> tuple[bool, str]:
    """Each run's losses and gradient norms equal to the 1-rank run `ref`'s: bitwise, or to
    `tol` relative (a reduction over replicas sums in another order)."""
    want = losses(c.train("ref-" + ref.replace(" ", ""), 1, ref))
    if want is None:
        return False, "the 1-rank reference run failed (log.txt)"
    bad = []
    for k, (n, f) in runs.items():
        got = losses(c.train(k, n, f"{ref} {f}"))
        if got is None or (got != want if tol == 0 else rel_diff(got, want) > tol):
            bad.append(k)
    how = "bitwise =" if tol == 0 else f"within {tol:g} of"
    return not bad, f"{len(runs) - len(bad)}/{len(runs)} {how} 1 rank" + (
        f"; differ: {', '.join(bad)}" if bad else ""
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--rehearse", action="store_true", help="fake CuPy on CPUs, small shapes")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    c = Check(args.out, args.rehearse)
    py = sys.executable

    def environment() -> tuple[bool, str]:
        gpu = "fake" if c.rehearse else c.sh(["nvidia-smi", "-L"])[1].strip().splitlines()[0]
        code, text = c.sh([py, "-m", "mpipipe", "doctor"])
        cuda = [line.strip() for line in text.splitlines() if "CuPy" in line or "CUDA" in line]
        return code == 0, f"{gpu}; {'; '.join(cuda[:2])}"

    def layers() -> tuple[bool, str]:
        code, text = c.sh(
            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
        )
        tail = text.strip().splitlines()[-1] if text.strip() else "no output"
        return code == 0 and "skipped" not in tail, tail.strip("= ")

    def numpy_vs_cupy() -> tuple[bool, str]:
        gpu = losses(c.train("f64-cupy", 1, "--dtype float64"))
        cpu = losses(c.train("f64-numpy", 1, "--dtype float64 --backend numpy"))
        if gpu is None or cpu is None:
            return False, "a run failed (log.txt)"
        worst = rel_diff(gpu, cpu)
        return worst <= 1e-10, f"float64 loss/grad-norm max rel diff {worst:.1e} (bound 1e-10)"

    def half(dtype: str) -> Callable[[], tuple[bool, str]]:
        def run() -> tuple[bool, str]:
            steps = "--steps 20 --lr 1e-3"
            ref, got = (
                c.train("fp32-20", 1, steps),
                c.train(f"{dtype}-20", 1, f"{steps} --dtype {dtype}"),
            )
            if ref is None or got is None:
                return False, "a run failed (log.txt)"
            gap = abs(got[-1]["loss"] - ref[-1]["loss"])
            return (
                gap < 0.05,
                f"loss after 20 steps {got[-1]['loss']:.4f} vs fp32 {ref[-1]['loss']:.4f}",
            )

        return run

    def checkpoint() -> tuple[bool, str]:
        ckpt = c.out / "runs" / "ckpt"
        shutil.rmtree(ckpt, ignore_errors=True)
        whole = losses(c.train("ckpt-whole", 1, "--steps 4"))
        c.train("ckpt-save", 2, f"--steps 4 --pp 2 --checkpoint-dir {ckpt} --save-every 2")
        step2 = sorted(ckpt.glob("step_*"))[:1]  # the first of step 2 and step 4
        resumed = losses(c.train("ckpt-resume", 1, f"--steps 4 --resume {step2[0]}"))
        ok = whole is not None and resumed is not None and resumed == whole[2:]
        code_e, _ = c.sh([py, "-m", "mpipipe", "eval", "--resume", str(ckpt)])
        code_g, text = c.sh(
            [
                py,
                "-m",
                "mpipipe",
                "generate",
                "--resume",
                str(ckpt),
                "--prompt",
                "def ",
                "--tokens",
                "20",
            ]
        )
        return ok and code_e == 0 and code_g == 0, (
            f"saved on pp 2, resumed on 1 rank: steps 3-4 {'bitwise =' if ok else 'DIFFER from'} "
            f"an uninterrupted run; eval exit {code_e}, generate exit {code_g}"
        )

    def timing() -> tuple[bool, str]:
        trace = c.out / "runs" / "trace.json"
        recs = c.train("time", 2, f"--steps 3 --pp 2 --partition time --trace {trace}")
        text = (c.out / "log.txt").read_text().rsplit("$ ", 1)[-1]
        clock = next((k for k in ("CUDA events", "perf_counter") if f"timed by {k}" in text), "?")
        events = len(json.loads(trace.read_text()).get("traceEvents", [])) if trace.exists() else 0
        mfu = recs[-1].get("mfu") if recs else None
        ok = recs is not None and events > 0 and mfu is not None and clock == "CUDA events"
        return ok, f"--partition time by {clock}; trace {events} events; MFU {mfu}"

    c.row("GPU, CuPy, CUDA (doctor)", environment)
    c.row("every layer on CuPy vs NumPy float64 (tests/test_gpu.py)", layers)
    c.row("1 rank: CuPy float64 = NumPy float64", numpy_vs_cupy)
    pp2 = {f"pp2-{s}": (2, f"--pp 2 --schedule {s}") for s in SCHEDULES}
    c.row(
        "2 pipeline ranks sharing the GPU (staged), every schedule, fp32",
        lambda: equal_runs(c, "--steps 3", pp2),
    )
    c.row(
        "2 data-parallel ranks (staged all-reduce), float64",
        lambda: equal_runs(c, "--dtype float64", {"dp2": (2, "--pp 1 --dp 2")}, tol=1e-12),
    )
    c.row(
        "fp16: 2 ranks = 1 rank",
        lambda: equal_runs(c, "--steps 3 --dtype fp16", {"fp16-pp2": (2, "--pp 2")}),
    )
    c.row(
        "recompute full / selective = none (fp32, 1 rank)",
        lambda: equal_runs(
            c,
            "--steps 3",
            {"full": (1, "--recompute full"), "selective": (1, "--recompute selective")},
        ),
    )
    c.row("bf16 within 0.05 nats of fp32", half("bf16"))
    c.row("fp16 within 0.05 nats of fp32", half("fp16"))
    c.row("checkpoint on pp 2 resumed on 1 rank; eval; generate", checkpoint)
    c.row("device timers, trace, MFU", timing)

    bench = c.out / "runs" / "bench.json"
    shapes = "--shapes 64x16,64x32" if c.rehearse else "--shapes 1024x1024,2048x2048,4096x2048"
    c.row(
        "speed (benchmarks/bench_gpu.py)",
        lambda: (
            c.sh([py, "benchmarks/bench_gpu.py", *shapes.split(), "--json", str(bench)], 420)[0]
            == 0,
            "see the speed table",
        ),
    )

    speed = json.loads(bench.read_text()) if bench.exists() else {}
    lines = ["| check | result | detail | s |", "|---|---|---|---|"]
    for r in c.rows:
        result = "ok" if r["ok"] else "n/a" if r["ok"] is None else "**FAILED**"
        lines.append(f"| {r['check']} | {result} | {r['detail']} | {r['s']} |")
    lines += ["", *speed.get("table", [])]
    (c.out / "table.md").write_text("\n".join(lines) + "\n")
    (c.out / "results.json").write_text(json.dumps({"rows": c.rows, "speed": speed}, indent=1))
    print("\n".join(lines))
    return 0 if all(r["ok"] is not False for r in c.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
