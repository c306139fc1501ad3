"""Mutation testing over hand-written mutants: does the suite notice a plausible bug?

    python scripts/mutants.py                 # every mutant; prints the score and the survivors
    python scripts/mutants.py --fast          # only mutants whose tests run without mpiexec
    python scripts/mutants.py --only zbv      # mutants whose id contains 'zbv'
    python scripts/mutants.py --list          # the mutants and the tests that should catch them

Each mutant replaces one exact piece of text (it must occur exactly once, so the list cannot rot
silently) in a copy of the tree under a temporary directory, runs the test files chosen for it
with a timeout and `-x`, and counts the mutant killed when they fail. The working tree is never
touched. Why our own list and not mutmut or cosmic-ray (both install here, Python 3.11): they
generate every syntactic mutant, about 5,400 for the core modules, most of them in error messages
and logging, and run a test command per mutant; with tests that need mpiexec that is days of
2 cores. A short list of bugs someone could really write, each aimed at the fast tests that
should catch it, runs in minutes and says which test is missing when one survives.

A survivor is either a test gap (write the test) or listed with `why`: equivalent (it cannot
change behaviour) or covered by an issue. Two scores are printed: over every mutant, and over the
mutants that can change behaviour (equivalent survivors left out: the usual mutation score).
Not run in CI (too slow); its last result is in the README's Measured table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the test files that catch each area, fastest first
PINS = ["tests/test_schedule_pins.py", "tests/test_lowering.py"]
SCHED = [*PINS, "tests/test_schedule.py"]
OPTIM = ["tests/test_optim.py"]
KERNELS = ["tests/test_layers.py"]
DATA = ["tests/test_units.py", "tests/test_data.py"]
TRANSPARENCY = ["tests/test_transparency.py"]  # mpiexec, 1, 2 and 4 ranks
DP = [
    "tests/test_data_parallel.py::test_grid_equals_single_process",
    "tests/test_data_parallel.py::test_layout_options_equal_single_process",
]  # mpiexec
CKPT = [
    "tests/test_checkpoint.py::test_ten_plus_ten_equals_twenty_bitwise",
    "tests/test_checkpoint.py::test_flipped_byte_is_refused_naming_file_and_dataset",
]  # mpiexec
PLAN = [
    "tests/test_plan.py::test_busy_collectives_price_tensor_parallel_ranks_only",
    "tests/test_plan.py::test_sequence_parallel_prices_four_collectives_in_each_of_f_b_and_w",
    "tests/test_plan.py::test_busy_fit_recovers_the_fixed_time_and_the_jitter",
    "tests/test_plan.py::test_computing_replicas_gradient_phase_waits_for_the_slowest",
]  # the planner's busy collectives, in-process
BUSY = [
    "tests/test_plan.py::test_action_overhead_by_busy_ranks_interpolates_and_reaches_the_busier_layout",
    "tests/test_plan.py::test_calibration_writes_both_kinds_of_rows_at_their_busy_ranks",
    "tests/test_plan.py::test_screen_prices_the_busy_ranks_as_predict_does",
    "tests/test_plan.py::test_computing_replicas_gradient_phase_waits_for_the_slowest",
]  # the planner's time per action by busy ranks, and computing replicas' wait
MPI_FILES = {t.split("::")[0] for t in TRANSPARENCY + DP + CKPT}


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str = ""  # set for a mutant expected to survive: equivalent, or the issue that covers it

    @property
    def mpi(self) -> bool:
        return any(t.split("::")[0] in MPI_FILES for t in self.tests)


def m(id: str, file: str, old: str, new: str, tests: list[str], why: str = "") -> Mutant:
    return Mutant(id, f"mpipipe/{file}", old, new, tuple(tests), why)


MUTANTS = [
    # -- schedule builders ----------------------------------------------------------------------
    m(
        "1f1b-warmup+1",
        "schedule/one_f_one_b.py",
        "warmup = min(pp - s - 1, m)",
        "warmup = min(pp - s, m)",
        PINS,
    ),
    m(
        "gpipe-reverse-backward",
        "schedule/gpipe.py",
        "row += [B(i), W(i)]",
        "row += [B(m - 1 - i), W(m - 1 - i)]",
        SCHED,
    ),
    m(
        "interleaved-short-warmup",
        "schedule/interleaved.py",
        "min(total, (pp - r - 1) * 2 + (v - 1) * pp)",
        "min(total, (pp - r - 1) + (v - 1) * pp)",
        SCHED,
    ),
    m(
        "interleaved-chunk-order",
        "schedule/interleaved.py",
        "c = v - 1 - (i // pp) % v",
        "c = (i // pp) % v",
        SCHED,
    ),
    m("zb-h1-w-lag", "schedule/zero_bubble.py", "if i >= s:", "if i > s:", SCHED),
    m(
        "zbv-w-before-f",
        "schedule/zero_bubble.py",
        '_PRIORITY = {"B": 0, "F": 1, "W": 2}',
        '_PRIORITY = {"B": 0, "F": 2, "W": 1}',
        SCHED,
    ),
    m("zbv-flat-layout", "schedule/zero_bubble.py", "(r, 2 * pp - 1 - r)", "(r, pp + r)", SCHED),
    m(
        "zbv-memory-limit",
        "schedule/zero_bubble.py",
        "limit=2 * min(pp, m)",
        "limit=2 * pp + 2",
        SCHED,
    ),
    m(
        "zbv-limit-without-min",
        "schedule/zero_bubble.py",
        "limit=2 * min(pp, m)",
        "limit=2 * pp",
        SCHED,
        "equivalent: a rank runs 2 m forwards in all, so with m < pp its live count never "
        "reaches 2 m, let alone 2 pp; both limits schedule the same",
    ),
    m(
        "zbv-rank-tiebreak",
        "schedule/zero_bubble.py",
        "key = (start, _PRIORITY[kind], r, mb, c)",
        "key = (start, _PRIORITY[kind], -r, mb, c)",
        SCHED,
        "equivalent: ranks tied at one start time choose independently (each choice finishes "
        "one unit later, after the tie), so the order they are visited in changes no row",
    ),
    # -- dependency rule, checker, lowering ------------------------------------------------------
    m(
        "deps-w-needs-f",
        "schedule/deps.py",
        '"W": [("B", mb, stage)]',
        '"W": [("F", mb, stage)]',
        SCHED,
    ),
    m(
        "deps-first-stage-edge",
        "schedule/deps.py",
        "return src if 0 <= src < n_stages",
        "return src if 0 < src < n_stages",
        SCHED,
    ),
    m(
        "check-no-b-before-w-rule",
        "schedule/check.py",
        'for before, after in (("F", "B"), ("B", "W")):',
        'for before, after in (("F", "B"),):',
        ["tests/test_schedule.py"],
    ),
    m(
        "check-stash-freed-at-b",
        "schedule/check.py",
        'elif a.kind == "W":\n                    live',
        'elif a.kind == "B":\n                    live',
        SCHED,
    ),
    m(
        "check-latency-on-local-hops",
        "schedule/check.py",
        "finish + (costs.latency if src != r else 0.0)",
        "finish + costs.latency",
        SCHED,
    ),
    m(
        "check-bubble-of-one-rank",
        "schedule/check.py",
        "return 1.0 - sum(self.busy) / total",
        "return 1.0 - max(self.busy) / total",
        SCHED,
    ),
    m("lower-post-receive-late", "schedule/lower.py", "heavy[j - 1] if j else 0", "i", PINS),
    m(
        "lower-send-before-compute",
        "schedule/lower.py",
        "row.append(Action(SEND[a.kind], a.mb, a.chunk))",
        "row.insert(len(row) - 1, Action(SEND[a.kind], a.mb, a.chunk))",
        PINS,
    ),
    m(
        "lower-release-after-b",
        "schedule/lower.py",
        "i for i, a in enumerate(row) if a.is_compute}",
        'i for i, a in enumerate(row) if a.kind in ("F", "B")}',
        PINS,
    ),
    m(
        "lower-pool-peak-off-by-one",
        "schedule/lower.py",
        "peak[key] = max(peak.get(key, 0), live[key])",
        "peak[key] = max(peak.get(key, 0), live[key] - 1)",
        PINS,
    ),
    m(
        "lower-message-key",
        "schedule/lower.py",
        "return (payload, a.mb, dst)",
        "return (payload, a.mb, k)",
        PINS,
    ),
    m(
        "lower-no-local-check",
        "schedule/lower.py",
        "plan.owner(stage)[0] != rank",
        "plan.owner(stage)[0] != rank or stage == 1",
        PINS,
    ),
    m(
        "p2p-tag-collision",
        "parallel/p2p.py",
        "(KINDS[kind] * n_stages + stage) * m + mb",
        "(KINDS[kind] + stage) * m + mb",
        PINS,
    ),
    # -- optimizer, learning rate, clipping ------------------------------------------------------
    m(
        "lr-cosine-one-step-late",
        "optim.py",
        "(step - warmup) / max",
        "(step - warmup + 1) / max",
        OPTIM,
    ),
    m("lr-cosine-span", "optim.py", "max(1, total - warmup)", "max(1, total - warmup + 1)", OPTIM),
    m(
        "lr-warmup-from-zero",
        "optim.py",
        "base * (step + 1) / warmup",
        "base * step / warmup",
        OPTIM,
    ),
    m("decay-vectors-too", "optim.py", "p.ndim >= 2", "p.ndim >= 1", OPTIM),
    m(
        "adamw-eps-in-root",
        "optim.py",
        "((v / c2) ** 0.5 + eps)",
        "((v / c2 + eps) ** 0.5)",
        OPTIM,
    ),
    m(
        "adamw-no-bias-correction-2",
        "optim.py",
        "c1, c2 = 1.0 - self.betas[0] ** self.t, 1.0 - self.betas[1] ** self.t",
        "c1, c2 = 1.0 - self.betas[0] ** self.t, 1.0",
        OPTIM,
    ),
    m(
        "sgd-decay-without-lr",
        "optim.py",
        "shrink = 1.0 - lr * self.weight_decay if self.weight_decay and k in self.decay else 1.0\n"
        "            update = partial(_sgd",
        "shrink = 1.0 - self.weight_decay if self.weight_decay and k in self.decay else 1.0\n"
        "            update = partial(_sgd",
        OPTIM,
    ),
    m(
        "loss-scale-late-doubling",
        "optim.py",
        "if self.good >= self.interval",
        "if self.good > self.interval",
        OPTIM,
    ),
    m(
        "mixed-ignores-clipping",
        "optim.py",
        "g32 *= factor / self.loss_scale",
        "g32 *= 1.0 / self.loss_scale",
        OPTIM,
    ),
    m("clip-at-the-limit", "optim.py", "norm <= max_norm", "norm < max_norm", OPTIM),
    # -- kernels ------------------------------------------------------------------------------
    m(
        "gelu-derivative",
        "kernels/gelu.py",
        "u *= 3.0 * _A\n    u += 1.0\n    u *= -2.0 * _K",
        "u *= _A\n    u += 1.0\n    u *= -2.0 * _K",
        KERNELS,
    ),
    m(
        "loss-gradient-not-averaged",
        "kernels/loss.py",
        "factor = scale / (logits.size // v)",
        "factor = scale",
        KERNELS,
    ),
    m(
        "linear-bias-grad-mean",
        "kernels/linear.py",
        "widen(d2).sum(axis=0).astype(db.dtype",
        "widen(d2).mean(axis=0).astype(db.dtype",
        KERNELS,
    ),
    m(
        "attention-dq-unscaled",
        "kernels/attention.py",
        "heads[0] *= scale  #",
        "heads[0] *= 1.0  #",
        KERNELS,
    ),
    m(
        "layernorm-db-from-xhat",
        "kernels/layernorm.py",
        "add_into(db, widen(dout).reshape",
        "add_into(db, widen(dout * xhat).reshape",
        KERNELS,
    ),
    # -- data ---------------------------------------------------------------------------------
    m(
        "data-targets-unshifted",
        "data/dataset.py",
        "window[:, :-1], window[:, 1:]",
        "window[:, :-1], window[:, :-1]",
        DATA,
    ),
    m(
        "data-train-reads-eval",
        "data/dataset.py",
        '(self.train, 0, cut) if split == "train"',
        '(self.train, 0, n) if split == "train"',
        DATA,
    ),
    # -- runtime, executor, data parallelism, checkpoints (mpiexec) -------------------------------
    m(
        "replica-slice",
        "runtime.py",
        "range(self.grid.replica * per, (self.grid.replica + 1) * per)",
        "range(0, per)",
        DP,
    ),
    m(
        "executor-loss-scale",
        "executor.py",
        "1.0 / plan.microbatches if loss_scale",
        "1.0 / plan.pp if loss_scale",
        TRANSPARENCY,
        "equivalent in the program: the runtime always passes the training executor its scale, "
        "1 / (m dp); the default reaches only forward-only executors, which compute no gradient",
    ),
    m(
        "executor-gradient-mailbox",
        "executor.py",
        "self.mail[put] = dx",
        "self.mail[put] = -dx",
        TRANSPARENCY,
    ),
    m(
        "executor-pool-fifo",
        "executor.py",
        "buf = pools[(a.kind, a.chunk)][slot]",
        "buf = pools[(a.kind, a.chunk)][-1 - slot]",
        TRANSPARENCY,
        "equivalent: every buffer in a pool has the same shape and distinct slots still take "
        "distinct buffers; which one a receive takes cannot change a result",
    ),
    m(
        "dp-last-bucket-unreduced",
        "parallel/data_parallel.py",
        "for b in range(len(self.buckets)):\n            self._start(b)",
        "for b in range(len(self.buckets) - 1):\n            self._start(b)",
        DP,
        "a test gap: with --overlap on layer_ready starts each bucket, so only --overlap off "
        "relies on this loop, and test_layout_options_equal_single_process[pp=2,overlap=off] "
        "compares its numbers with one process",
    ),
    m(
        "ckpt-slots-dropped",
        "checkpoint/write.py",
        "for slot, arrays in slots.items():",
        "for slot, arrays in list(slots.items())[:1]:",
        CKPT,
    ),
    m(
        "ckpt-hash-unchecked",
        "checkpoint/read.py",
        "if hashed.result() != expected:",
        "if hashed.result() != expected and False:",
        CKPT,
    ),
    # -- the planner's busy collectives ---------------------------------------------------------
    m(
        "plan-busy-linear-not-sqrt",
        "plan/machine.py",
        "jitter = self.busy_jitter_us * math.sqrt(compute / 1e-3)",
        "jitter = self.busy_jitter_us * (compute / 1e-3)",
        PLAN,
    ),
    m(
        "plan-busy-tp-not-scaled",
        "plan/machine.py",
        "math.sqrt(compute / 1e-3) * largest(group) / largest(2)",
        "math.sqrt(compute / 1e-3)",
        PLAN,
    ),
    m(
        "plan-busy-sp-counted-as-tp",
        "plan/cost.py",
        "        if layout.sp:\n            return (",
        "        if False:\n            return (",
        PLAN,
    ),
    m(
        "plan-busy-recompute-without-collectives",
        "plan/cost.py",
        '            block_b += block_f\n        elif layout.recompute == "selective":  # the',
        '            block_b += prof["block"][0]\n'
        '        elif layout.recompute == "selective":  # the',
        PLAN,
    ),
    m(
        "plan-busy-fit-linear",
        "plan/calibrate.py",
        "xs, ys = [math.sqrt(x / 1e-3) for x, _ in points]",
        "xs, ys = [x / 1e-3 for x, _ in points]",
        PLAN,
    ),
    m(
        "plan-busy-fixed-dropped",
        "plan/machine.py",
        "return (self.busy_collective_us + jitter) * 1e-6",
        "return jitter * 1e-6",
        PLAN,
    ),
    # -- the planner's time per action by busy ranks; computing replicas' wait ----------------
    m(
        "plan-busy-ranks-count-the-overhead",
        "plan/predict.py",
        "    costs = action_costs(model, layout, machine.with_action_overhead(0.0))",
        "    costs = action_costs(model, layout, machine)",
        BUSY,
    ),
    m(
        "plan-busy-ranks-ignored",
        "plan/cost.py",
        "over = machine.action_overhead(layout.ranks, busy_ranks)",
        "over = machine.action_overhead(layout.ranks)",
        BUSY,
    ),
    m(
        "plan-busy-rows-unsorted",
        "plan/machine.py",
        "    for n, b, v in sorted(table):",
        "    for n, b, v in table:",
        BUSY,
    ),
    m(
        "plan-calibrate-no-wide-row",
        "plan/calibrate.py",
        "            rows.append(timed(n, wide_run(n))[0])",
        "            timed(n, wide_run(n))",
        BUSY,
    ),
    m(
        "plan-screen-fewest-busy",
        "plan/search.py",
        "    step = pipeline(action_costs(model, layout, machine, busy))[1]",
        "    step = pipeline(action_costs(model, layout, machine))[1]",
        BUSY,
    ),
    m(
        "plan-replicas-drift-table",
        "plan/machine.py",
        "        if computed is not None:",
        "        if False:",
        BUSY,
    ),
    m(
        "plan-replicas-slowest-of-all-ranks",
        "plan/machine.py",
        "return ms * 1e-3 + self.busy_wait(computed, dp)",
        "return ms * 1e-3 + self.busy_wait(computed, ranks)",
        BUSY,
    ),
]


def copy_tree(dest: Path) -> None:
    for name in ("mpipipe", "tests", "examples", "pyproject.toml"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float]:
    """'killed', 'survived' or 'error: ...', and the seconds it took."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    try:
        p = subprocess.run(
            cmd,
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        return "killed", time.monotonic() - t0  # a hang is noticed too (by the test's timeout)
    took = time.monotonic() - t0
    if p.returncode == 0:
        return "survived", took
    if p.returncode == 1:
        return "killed", took
    return f"error (pytest exit {p.returncode}): {p.stdout[-300:]}", took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", default="", help="mutants whose id contains this text")
    ap.add_argument("--fast", action="store_true", help="skip the mutants that need mpiexec")
    ap.add_argument("--list", action="store_true", help="print the mutants and stop")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    args = ap.parse_args(argv)
    chosen = [x for x in MUTANTS if args.only in x.id and not (args.fast and x.mpi)]
    for x in chosen:
        text = (ROOT / x.file).read_text()
        if text.count(x.old) != 1:
            sys.exit(f"{x.id}: {x.old!r} occurs {text.count(x.old)} times in {x.file} (need 1)")
    if args.list:
        for x in chosen:
            print(f"{x.id:30} {x.file:32} {' '.join(x.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="mpipipe-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        probe = subprocess.run(
            [sys.executable, "-c", "import mpipipe; print(mpipipe.__file__)"],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
            capture_output=True,
            text=True,
        )
        if not probe.stdout.startswith(str(tree)):
            sys.exit(f"the copy's mpipipe is not the one imported: {probe.stdout}{probe.stderr}")
        baseline = tuple(sorted({t for x in chosen for t in x.tests}))
        verdict, took = run_tests(tree, baseline, args.timeout * 2)
        print(f"unmutated tree: {'passes' if verdict == 'survived' else verdict} ({took:.0f}s)")
        if verdict != "survived":
            return 2  # a mutant 'killed' by tests that fail anyway would mean nothing
        results = []
        for x in chosen:
            path = tree / x.file
            original = path.read_text()
            path.write_text(original.replace(x.old, x.new))
            try:
                verdict, took = run_tests(tree, x.tests, args.timeout)
            finally:
                path.write_text(original)
            results.append((x, verdict))
            print(f"{verdict:9} {took:6.1f}s  {x.id}", flush=True)
    killed = sum(v == "killed" for _, v in results)
    survivors = [(x, v) for x, v in results if v != "killed"]
    equivalent = sum(x.why.startswith("equivalent") for x, _ in survivors)
    print(
        f"\n{time.strftime('%Y-%m-%d')}: {killed}/{len(results)} killed, score "
        f"{100 * killed / max(1, len(results)):.0f}%; over the {len(results) - equivalent} "
        f"mutants that can change behaviour (the usual mutation score, equivalent survivors "
        f"left out): {100 * killed / max(1, len(results) - equivalent):.0f}%"
    )
    unexplained = 0
    for x, v in survivors:
        print(f"  {v[:8]:9}{x.id} ({x.file}): {x.why or 'NOT EXPLAINED: a test is missing'}")
        unexplained += not x.why
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
