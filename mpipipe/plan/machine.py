"""A machine file: what one device and the links between devices deliver (TOML, documented).

    [machine]
    name = "selene-a100"
    devices_per_node = 8          # GPUs (or ranks, on CPUs) per node
    memory_gib = 80               # per device
    memory_bandwidth_gbs = 2039   # per device (HBM or DRAM share), GB/s
    memory_efficiency = 0.88      # optional (default 1.0): the fraction of that bandwidth that
                                  # streaming (elementwise) kernels achieve
    [flops]                       # peak dense TFLOP/s per dtype
    bf16 = 312.0
    [matmul]
    efficiency = 0.8              # achieved fraction of peak on the model's matrix products
    [links.intra]                 # between devices of one node, per device and direction
    bandwidth_gbs = 300.0
    latency_us = 3.0
    [links.inter]                 # between nodes, per device and direction
    bandwidth_gbs = 25.0
    latency_us = 5.0
    nics_per_node = 8             # optional (default 0: one): network ports a collective's
                                  # rings use at once, one per member of its group in the node
    [runtime]
    action_overhead_us = 0.0      # fixed time per pipeline action (dispatch, launches, Python)
    step_overhead_ms = 0.0        # fixed time per optimizer step outside the pipeline
    # optional, measured by `plan --calibrate` from N-rank runs on this one machine; each
    # (but action_overhead_by_busy) is a table [[N, value], ...] interpolated in log N, held
    # constant past both ends, and replaces the fixed value above where given:
    # time per action in a job of N ranks (us): what a rank pays between consecutive actions
    # (Python, MPI progress, the wake-up of a waiting rank); past the core count the ranks share
    # cores and are served in turn.
    action_overhead_by_ranks = [[1, 320.0], [2, 880.0], [4, 1400.0]]
    # the same by how many ranks are busy (inside an action) at once, which it grows with where
    # ranks share cores: [[N, busy, us], ...], one or more rows per N; at a layout's N and busy
    # ranks (its ranks x its schedule's utilisation without this overhead) it is linear in busy
    # between that N's rows and in log N between rank counts, held constant past every end;
    # replaces action_overhead_by_ranks where given
    action_overhead_by_busy = [[4, 2.9, 160.0], [4, 3.7, 240.0], [32, 8.9, 1480.0]]
    # time per step outside the pipeline and the gradient reduction in a job of N ranks (ms):
    # the step's statistics all-reduce over all N ranks, the optimizer's Python, the wake-ups.
    step_overhead_by_ranks = [[1, 2.8], [4, 12.0]]
    # the data-parallel gradient phase beyond the alpha-beta all-reduces, measured on N ranks
    # that are N replicas (Machine.reduce_overhead scales both to dp replicas): the all-reduce's
    # rounds on shared cores (ms), and the replicas' drift, the jitter that makes them wait for
    # the slowest (ms per square root of a rank's actions)
    reduce_overhead_by_ranks = [[2, 0.5], [4, 1.5]]
    reduce_drift_by_ranks = [[2, 0.2], [4, 1.0]]
    # optional (default 0), measured by `plan --calibrate`: what a blocking collective costs
    # ranks that compute between collectives (tensor parallelism's all-reduces; the gradient
    # reduction of data-parallel replicas that compute, after their pipeline), beyond the
    # links' alpha-beta: a fixed time per collective (us: MPI's first call after compute runs
    # cold, the wake-up of a waiting rank) and the wait for the group's slowest member after
    # 1 ms of compute (us), which grows as the square root of the compute between two
    # collectives (the ranks' jitter is a random walk)
    busy_collective_us = 50.0
    busy_jitter_us = 150.0

`plan --calibrate` writes one for the machine it runs on; presets live in plan/machines/.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from mpipipe.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESETS = Path(__file__).with_name("machines")


@dataclass(frozen=True)
class Link:
    """Alpha-beta model of one link level: seconds = latency + bytes / bandwidth."""

    bandwidth_gbs: float
    latency_us: float

    def time(self, nbytes: float) -> float:
        return self.latency_us * 1e-6 + nbytes / (self.bandwidth_gbs * 1e9)


@dataclass(frozen=True)
class Machine:
    name: str
    devices_per_node: int
    memory_gib: float
    memory_bandwidth_gbs: float
    flops: dict[str, float]  # peak TFLOP/s per dtype
    matmul_efficiency: float
    intra: Link
    inter: Link
    action_overhead_us: float = 0.0
    step_overhead_ms: float = 0.0
    action_overhead_by_ranks: tuple[tuple[int, float], ...] = ()  # (ranks, us), ranks rising
    action_overhead_by_busy: tuple[tuple[int, float, float], ...] = ()  # (ranks, busy, us)
    step_overhead_by_ranks: tuple[tuple[int, float], ...] = ()  # (ranks, ms)
    reduce_overhead_by_ranks: tuple[tuple[int, float], ...] = ()  # (ranks, ms)
    reduce_drift_by_ranks: tuple[tuple[int, float], ...] = ()  # (ranks, ms per sqrt(action))
    memory_efficiency: float = 1.0  # achieved fraction of memory_bandwidth_gbs
    nics_per_node: int = 0  # inter-node ports a collective uses in parallel (0: one)
    busy_collective_us: float = 0.0  # per blocking collective between computing ranks
    busy_jitter_us: float = 0.0  # their wait for the slowest after 1 ms of compute
    notes: dict[str, Any] = field(default_factory=dict)

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype` (fp32 falls back to float32 and back)."""
        key = {"fp32": "float32"}.get(dtype, dtype)
        if key not in self.flops:
            raise ConfigError(
                f"machine {self.name!r} gives no peak for dtype {dtype} (its [flops] table has "
                f"{', '.join(sorted(self.flops))}: add `{key} = TFLOPS` or pick one of those)"
            )
        return self.flops[key] * 1e12

    def link(self, distance: int) -> Link:
        """The link between ranks `distance` apart in rank numbers (consecutive ranks fill a
        node first): intra-node when the group fits in one node."""
        return self.intra if distance < self.devices_per_node else self.inter

    def collective_link(self, stride: int, n: int) -> Link:
        """The link a ring collective of `n` ranks `stride` apart runs at. Inside a node, the
        intra-node link. Across nodes, NCCL runs one ring per network port, each carrying its
        share, so a group with k members in each node moves k x the inter-node bandwidth
        through min(k, nics_per_node) ports, up to what the intra-node link carries."""
        if n * stride - 1 < self.devices_per_node:  # as link(): the group's span fits a node
            return self.intra
        members = max(1, min(n, self.devices_per_node // stride, self.nics_per_node))
        bandwidth = min(self.inter.bandwidth_gbs * members, self.intra.bandwidth_gbs)
        return Link(max(bandwidth, self.inter.bandwidth_gbs), self.inter.latency_us)

    def action_overhead(self, ranks: int, busy: float | None = None) -> float:
        """Seconds per pipeline action in a job of `ranks` ranks of which `busy` are inside an
        action at once on average (see the format above; None: the fewest busy measured)."""
        if self.action_overhead_by_busy:
            return by_busy(self.action_overhead_by_busy, ranks, busy) * 1e-6
        table = self.action_overhead_by_ranks
        return (by_ranks(table, ranks) if table else self.action_overhead_us) * 1e-6

    def with_action_overhead(self, us: float) -> Machine:
        """This machine with a flat time per action of `us` microseconds whatever the ranks
        (no by-ranks or by-busy table): what the calibration fits, and busy_ranks' baseline
        at 0."""
        return replace(self, action_overhead_us=us, action_overhead_by_ranks=(),
                       action_overhead_by_busy=())  # fmt: skip

    def step_overhead(self, ranks: int) -> float:
        """Seconds per step outside the pipeline and the reduction, in a job of `ranks` ranks."""
        table = self.step_overhead_by_ranks
        return (by_ranks(table, ranks) if table else self.step_overhead_ms) * 1e-3

    def reduce_overhead(
        self, ranks: int, dp: int, actions: int, computed: float | None = None
    ) -> float:
        """Seconds per step the gradient phase of `dp` replicas, each rank running `actions`
        actions, costs in a job of `ranks` ranks beyond its alpha-beta all-reduces (0 without
        calibrated tables or busy terms: presets price the links only). The tables hold
        dp = N replicas:
        - rounds: MPI's all-reduce of a small or mid-size message (recursive doubling, or
          Rabenseifner's reduce-scatter and all-gather) takes rounds in proportion to log2 of
          the group, each a wait for the partner on shared cores: dp pays log2(dp) / log2(N);
        - drift: replicas' pipelines drift apart by the jitter of each action (a random walk:
          sqrt(actions) steps) and all wait for the slowest, which is e(dp) standard deviations
          above the mean (e: the expected largest of dp normal draws): dp pays e(dp) / e(N).
          The drift table is measured on emulated (sleeping) replicas; replicas that compute
          (`computed`: seconds since the step's start, None for emulated ones) drift as
          computing ranks do between collectives: busy_wait(computed, dp) instead."""
        if dp <= 1:
            return 0.0
        rounds, drift = self.reduce_overhead_by_ranks, self.reduce_drift_by_ranks
        ms = by_ranks(rounds, ranks) * math.log2(dp) / math.log2(max(ranks, 2)) if rounds else 0.0
        if computed is not None:
            return ms * 1e-3 + self.busy_wait(computed, dp)
        if drift:
            ms += by_ranks(drift, ranks) * math.sqrt(actions) * largest(dp) / largest(ranks)
        return ms * 1e-3

    def busy_wait(self, compute: float, group: int) -> float:
        """Seconds a blocking collective of `group` ranks costs beyond its links when each
        computed `compute` seconds since they last synchronised: the fixed part and the wait
        for the slowest member, as the square root of the compute (a random walk), scaled from
        the 2 ranks it is measured on to the expected slowest of `group` (0 for one rank)."""
        if group <= 1:
            return 0.0
        jitter = self.busy_jitter_us * math.sqrt(compute / 1e-3) * largest(group) / largest(2)
        return (self.busy_collective_us + jitter) * 1e-6

    def matmul_time(self, flops: float, dtype: str) -> float:
        return flops / (self.peak(dtype) * self.matmul_efficiency)

    def memory_time(self, nbytes: float) -> float:
        return nbytes / (self.memory_bandwidth_gbs * 1e9 * self.memory_efficiency)

    def product_time(self, flops: float, nbytes: float, dtype: str) -> float:
        """One matrix product's roofline: its FLOPs at the achieved matmul rate or its operands'
        and result's bytes at the achieved memory bandwidth, whichever takes longer."""
        return max(self.matmul_time(flops, dtype), self.memory_time(nbytes))

    def to_toml(self) -> str:
        lines = [
            "[machine]",
            f'name = "{self.name}"',
            f"devices_per_node = {self.devices_per_node}",
            f"memory_gib = {self.memory_gib:.3f}",
            f"memory_bandwidth_gbs = {self.memory_bandwidth_gbs:.3f}",
            f"memory_efficiency = {self.memory_efficiency:.4g}",
            "",
            "[flops]  # peak TFLOP/s per dtype",
            *(f"{k} = {v:.6g}" for k, v in sorted(self.flops.items())),
            "",
            "[matmul]",
            f"efficiency = {self.matmul_efficiency:.4f}",
        ]
        for level, link in (("intra", self.intra), ("inter", self.inter)):
            lines += [
                "",
                f"[links.{level}]",
                f"bandwidth_gbs = {link.bandwidth_gbs:.4g}",
                f"latency_us = {link.latency_us:.4g}",
            ]
        lines.append(f"nics_per_node = {self.nics_per_node}")
        lines += [
            "",
            "[runtime]",
            f"action_overhead_us = {self.action_overhead_us:.4g}",
            f"step_overhead_ms = {self.step_overhead_ms:.4g}",
            f"busy_collective_us = {self.busy_collective_us:.4g}",
            f"busy_jitter_us = {self.busy_jitter_us:.4g}",
        ]
        for key in TABLES:
            table = getattr(self, key)
            if table:
                pairs = ", ".join(f"[{n}, {v:.4g}]" for n, v in table)
                lines.append(f"{key} = [{pairs}]")
        if self.action_overhead_by_busy:
            table3 = self.action_overhead_by_busy
            rows = ", ".join(f"[{n}, {b:.4g}, {v:.4g}]" for n, b, v in table3)
            lines.append(f"action_overhead_by_busy = [{rows}]")
        return "\n".join(lines) + "\n"


TABLES = (
    "action_overhead_by_ranks",
    "step_overhead_by_ranks",
    "reduce_overhead_by_ranks",
    "reduce_drift_by_ranks",
)


@lru_cache(maxsize=64)
def largest(n: int) -> float:
    """The expected largest of n standard normal draws (0 for n = 1): the integral of
    x n phi(x) Phi(x)^(n-1), by the midpoint rule on [-8, 8]."""
    step, total = 1e-3, 0.0
    for i in range(16000):
        x = -8.0 + (i + 0.5) * step
        phi = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        total += x * n * phi * (0.5 * (1 + math.erf(x / math.sqrt(2)))) ** (n - 1) * step
    return total


def by_ranks(table: tuple[tuple[int, float], ...], ranks: int) -> float:
    """A [[N, value], ...] table at `ranks`: linear in log N between its points, held constant
    past both ends."""
    if ranks <= table[0][0]:
        return table[0][1]
    for (n0, u0), (n1, u1) in zip(table, table[1:], strict=False):
        if ranks <= n1:
            return u0 + math.log(ranks / n0) / math.log(n1 / n0) * (u1 - u0)
    return table[-1][1]


def by_busy(table: tuple[tuple[int, float, float], ...], ranks: int, busy: float | None) -> float:
    """A [[N, busy, value], ...] table at `ranks` and `busy` (None: each N's fewest busy): per
    N linear in busy between its rows, held constant past them; then as by_ranks across N."""
    per_n: dict[int, list[tuple[float, float]]] = {}
    for n, b, v in sorted(table):
        per_n.setdefault(n, []).append((b, v))
    points = []
    for n, rows in sorted(per_n.items()):
        at = rows[0][1]  # the fewest busy; also past the low end
        if busy is not None:
            for (b0, v0), (b1, v1) in zip(rows, rows[1:], strict=False):
                if busy > b0:
                    at = v1 if busy >= b1 else v0 + (busy - b0) / (b1 - b0) * (v1 - v0)
        points.append((n, at))
    return by_ranks(tuple(points), ranks)


def load(spec: str) -> Machine:
    """A machine from a TOML path or a preset name (dgx-h100, selene-a100)."""
    path = Path(spec)
    if not path.exists() and (PRESETS / f"{spec}.toml").exists():
        path = PRESETS / f"{spec}.toml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
        raise ConfigError(
            f"--machine {spec}: no such file or preset (presets: {names}; or write one with "
            "`plan --calibrate --machine-out here.toml`)"
        )
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--machine {spec}: not valid TOML ({e})") from None
    return from_mapping(raw, str(path))


def _table(rt: dict[str, Any], key: str) -> tuple[tuple[int, float], ...]:
    return tuple(sorted((int(n), float(v)) for n, v in rt.get(key, [])))


def _rows3(rt: dict[str, Any], key: str, origin: str) -> tuple[tuple[int, float, float], ...]:
    rows = rt.get(key, [])
    if not isinstance(rows, list) or any(not isinstance(r, list) or len(r) != 3 for r in rows):
        raise ConfigError(
            f"machine file {origin}: runtime.{key} takes rows of three numbers [ranks, busy, "
            f"us] (got {rows})"
        )
    return tuple(sorted((int(n), float(b), float(v)) for n, b, v in rows))


def from_mapping(raw: dict[str, Any], origin: str) -> Machine:
    try:
        m, links, rt = raw["machine"], raw["links"], raw.get("runtime", {})
        machine = Machine(
            name=str(m["name"]),
            devices_per_node=int(m["devices_per_node"]),
            memory_gib=float(m["memory_gib"]),
            memory_bandwidth_gbs=float(m["memory_bandwidth_gbs"]),
            memory_efficiency=float(m.get("memory_efficiency", 1.0)),
            nics_per_node=int(links["inter"].get("nics_per_node", 0)),
            flops={str(k): float(v) for k, v in raw["flops"].items()},
            matmul_efficiency=float(raw["matmul"]["efficiency"]),
            intra=Link(
                float(links["intra"]["bandwidth_gbs"]), float(links["intra"]["latency_us"])
            ),
            inter=Link(
                float(links["inter"]["bandwidth_gbs"]), float(links["inter"]["latency_us"])
            ),
            action_overhead_us=float(rt.get("action_overhead_us", 0.0)),
            step_overhead_ms=float(rt.get("step_overhead_ms", 0.0)),
            action_overhead_by_ranks=_table(rt, TABLES[0]),
            action_overhead_by_busy=_rows3(rt, "action_overhead_by_busy", origin),
            step_overhead_by_ranks=_table(rt, TABLES[1]),
            reduce_overhead_by_ranks=_table(rt, TABLES[2]),
            reduce_drift_by_ranks=_table(rt, TABLES[3]),
            busy_collective_us=float(rt.get("busy_collective_us", 0.0)),
            busy_jitter_us=float(rt.get("busy_jitter_us", 0.0)),
        )
    except ConfigError:  # a ValueError too: already says what is wrong
        raise
    except KeyError as e:
        raise ConfigError(
            f"machine file {origin}: missing key {e} (see mpipipe/plan/machine.py for the format)"
        ) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"machine file {origin}: a value is not a number ({e})") from None
    positive = (
        machine.devices_per_node,
        machine.memory_gib,
        machine.memory_bandwidth_gbs,
        machine.intra.bandwidth_gbs,
        machine.inter.bandwidth_gbs,
    )
    for key in TABLES:
        table = getattr(machine, key)
        if any(n < 1 or v < 0 for n, v in table) or len({n for n, _ in table}) < len(table):
            raise ConfigError(
                f"machine file {origin}: runtime.{key} takes [[ranks >= 1, time >= 0], ...] "
                f"with each rank count once (got {list(table)})"
            )
    rows = machine.action_overhead_by_busy
    if not all(n >= 1 and 0 < b <= n and v >= 0 for n, b, v in rows) or len(
        {(n, b) for n, b, _ in rows}
    ) < len(rows):
        raise ConfigError(
            f"machine file {origin}: runtime.action_overhead_by_busy takes [[ranks >= 1, "
            f"busy ranks in (0, ranks], time >= 0], ...] with each (ranks, busy) once (got "
            f"{list(rows)})"
        )
    if not (machine.busy_collective_us >= 0 and machine.busy_jitter_us >= 0):  # NaN too
        raise ConfigError(
            f"machine file {origin}: runtime.busy_collective_us and runtime.busy_jitter_us "
            f"must be >= 0 (got {machine.busy_collective_us} and {machine.busy_jitter_us})"
        )
    efficiencies = (machine.matmul_efficiency, machine.memory_efficiency)
    if min(positive) <= 0 or not all(0 < e <= 1 for e in efficiencies):
        raise ConfigError(
            f"machine file {origin}: sizes and bandwidths must be > 0 and matmul.efficiency and "
            f"machine.memory_efficiency in (0, 1] (got {machine.matmul_efficiency} and "
            f"{machine.memory_efficiency})"
        )
    return machine
