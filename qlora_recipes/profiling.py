"""Traced training steps (`trainer.profile_steps`): where a step's time goes, written to RUN_DIR/profile/.

- ops_by_cuda.txt / ops_by_cpu.txt: torch.profiler's operator tables, by GPU and by host time;
- gpu_busy.json: the traced wall time and how much of it the GPU was running a kernel;
- idle.json: the GPU's idle gaps, each put down to the host operation that was running through it (a step
  that waits on the host shows which host work to cut), and, for multi-GPU runs, the NCCL kernels' time and
  how much of it no compute kernel overlapped (communication the step waits for). With `trainer.profile_python`
  the trace also records Python calls: `idle_by_python_function` then says, for each Python function, how much of
  the idle time it was running through (its callers included), and each of the largest gaps names the innermost
  Python function running through it (the line of a library's code the GPU waits on).
The traced steps run slower (the profiler's own host cost); bench leaves them out of its figures.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("qlora_recipes")

NO_HOST_OP = "(no host op traced)"  # Python between traced ops, or a thread the profiler does not see


@dataclass(frozen=True)
class HostOp:
    """A traced host-side event (us), how deeply it is nested in other events of its thread."""

    start: float
    end: float
    name: str
    depth: int = 0
    python: bool = False  # a Python function's call (traced with_stack), not a torch op


@dataclass(frozen=True)
class Kernel:
    """A traced GPU activity (kernel, copy or memset), in us."""

    start: float
    end: float
    name: str


class StepProfiler:
    """torch.profiler over the given optimizer steps (1-based, rank 0 only), written to `out` when the last ends."""

    def __init__(self, steps: list[int], out: Path, python: bool = False) -> None:
        self.steps, self.out, self.python, self.profiler = sorted(steps), out, python, None

    def callback(self) -> Any:
        import torch
        from transformers import TrainerCallback

        prof = self

        class Trace(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if prof.profiler is None and state.global_step + 1 == prof.steps[0]:
                    activities = [torch.profiler.ProfilerActivity.CPU]
                    if torch.cuda.is_available():
                        activities.append(torch.profiler.ProfilerActivity.CUDA)
                    prof.profiler = torch.profiler.profile(
                        activities=activities, record_shapes=False, with_stack=prof.python
                    )
                    prof.profiler.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                if prof.profiler is not None and state.global_step == prof.steps[-1]:
                    prof.profiler.__exit__(None, None, None)
                    prof.write(prof.profiler)
                    prof.profiler = None

        return Trace()

    def write(self, profiler: Any) -> None:
        import torch

        self.out.mkdir(parents=True, exist_ok=True)
        averages = profiler.key_averages()
        for kind in ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",):
            (self.out / f"ops_by_{kind}.txt").write_text(
                averages.table(sort_by=f"self_{kind}_time_total", row_limit=40)
            )
        kernels, host = traced_events(profiler.events())
        busy = gpu_busy([(k.start, k.end, "CUDA") for k in kernels] + [(h.start, h.end, "CPU") for h in host])
        (self.out / "gpu_busy.json").write_text(json.dumps(busy, indent=2))
        (self.out / "idle.json").write_text(json.dumps(idle_report(kernels, host), indent=2))
        log.info("profiled steps: %s", json.dumps(busy))
        log.info("profile of steps %s written to %s", self.steps, self.out)


def traced_events(events: Any) -> tuple[list[Kernel], list[HostOp]]:
    """torch.profiler's FunctionEvents as GPU activities and host ops (with their nesting depth)."""
    depth: dict[int, int] = {}

    def depth_of(event: Any) -> int:
        key = id(event)
        if key not in depth:
            parent = event.cpu_parent
            depth[key] = 0 if parent is None else depth_of(parent) + 1
        return depth[key]

    kernels, host = [], []
    for e in events:
        start, end = e.time_range.start, e.time_range.end
        if e.device_type.name == "CPU":
            host.append(HostOp(start, end, e.name, depth_of(e), bool(getattr(e, "is_python_function", False))))
        else:
            kernels.append(Kernel(start, end, e.name))
    return kernels, host


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals as sorted, disjoint intervals."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        elif end > start:
            out.append((start, end))
    return out


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def minus(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Parts of the disjoint sorted intervals `a` that no interval of the disjoint sorted `b` covers."""
    out, j = [], 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k, cursor = j, start
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cursor:
                out.append((cursor, b[k][0]))
            cursor = max(cursor, b[k][1])
            k += 1
        if cursor < end:
            out.append((cursor, end))
    return out


def gpu_busy(spans: list[tuple[float, float, str]]) -> dict[str, float | int | None]:
    """Wall time of the traced steps and how much of it the GPU was running a kernel (the union of the device
    spans), from profiler events as (start us, end us, device type name). A busy fraction well under 1 is a step
    that waits on the host (Python, launches, syncs)."""
    if not spans:
        return {"wall_ms": 0.0, "gpu_busy_ms": None, "gpu_busy_fraction": None, "kernels": 0}
    wall = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
    device = [(start, end) for start, end, kind in spans if kind != "CPU"]
    busy = length(merged(device))
    return {
        "wall_ms": wall / 1e3,
        "gpu_busy_ms": busy / 1e3 if device else None,
        "gpu_busy_fraction": busy / wall if device and wall else None,
        "kernels": len(device),
    }


def idle_report(kernels: list[Kernel], host: list[HostOp], top: int = 15) -> dict[str, Any]:
    """Where the GPU waits, from one trace. Every stretch of the traced wall time in which no GPU activity runs
    is an idle gap; each gap is put down, whole, to one host op: the most deeply nested op that overlaps at least
    half as much of the gap as the op overlapping it most (a gap inside `aten::item` inside `compute_loss`'s
    ops names `aten::item`), and separately to the outermost op overlapping it most (what the step was doing).
    NCCL kernels run beside compute kernels on their own streams: `exposed_nccl_ms` is the time one runs and
    no compute kernel does. Traced Python calls (HostOp.python) stay out of those tables; they get their own:
    every Python function is credited with the part of each gap it runs through (so a caller's figure includes its
    callees'), and each of the largest gaps names the most deeply nested Python function overlapping it at least
    half as much as the one overlapping it most, built-ins left out."""
    if not kernels:
        return {"idle_ms": None, "gaps": 0}
    spans = [(k.start, k.end) for k in kernels] + [(h.start, h.end) for h in host]
    wall = (min(s for s, _ in spans), max(e for _, e in spans))
    busy = merged([(k.start, k.end) for k in kernels])
    gaps = minus([wall], busy)
    inner: dict[str, list[float]] = {}
    outer: dict[str, list[float]] = {}
    python: dict[str, list[float]] = {}
    largest = []
    ops = sorted(host, key=lambda h: h.start)
    active: list[HostOp] = []
    i = 0
    for a, b in gaps:
        while i < len(ops) and ops[i].start < b:
            active.append(ops[i])
            i += 1
        active = [op for op in active if op.end > a]
        over = [(min(op.end, b) - max(op.start, a), op) for op in active]
        calls = [(o, op) for o, op in over if op.python and o > 0]
        over = [(o, op) for o, op in over if not op.python]
        inner_name = innermost(over) or NO_HOST_OP
        tops = [(o, op) for o, op in over if op.depth == 0 and o > 0]
        outer_name = max(tops, key=lambda t: t[0])[1].name if tops else NO_HOST_OP
        for table, name in ((inner, inner_name), (outer, outer_name)):
            entry = table.setdefault(name, [0.0, 0])
            entry[0] += b - a
            entry[1] += 1
        for o, op in calls:
            entry = python.setdefault(op.name, [0.0, 0])
            entry[0] += o
            entry[1] += 1
        function = innermost([(o, op) for o, op in calls if not op.name.startswith("<built-in")])
        largest.append((b - a, a - wall[0], inner_name, outer_name, function))

    def ranked(table: dict[str, list[float]], top: int = top, key: str = "host_op") -> list[dict[str, Any]]:
        rows = sorted(table.items(), key=lambda item: -item[1][0])[:top]
        return [{key: name, "idle_ms": round(ms / 1e3, 3), "gaps": int(n)} for name, (ms, n) in rows]

    def gap(ms: float, at: float, name: str, top_name: str, function: str | None) -> dict[str, Any]:
        row = {"idle_ms": round(ms / 1e3, 3), "at_ms": round(at / 1e3, 3), "host_op": name, "outermost": top_name}
        return row | ({"python": function} if function else {})

    nccl = merged([(k.start, k.end) for k in kernels if "nccl" in k.name.lower()])
    compute = merged([(k.start, k.end) for k in kernels if "nccl" not in k.name.lower()])
    report = {
        "wall_ms": round((wall[1] - wall[0]) / 1e3, 3),
        "idle_ms": round(length(gaps) / 1e3, 3),
        "gaps": len(gaps),
        "idle_by_innermost_host_op": ranked(inner),
        "idle_by_outermost_host_op": ranked(outer),
        "largest_gaps": [gap(*row) for row in sorted(largest, key=lambda row: row[:2], reverse=True)[:top]],
        "nccl_ms": round(length(nccl) / 1e3, 3),
        "exposed_nccl_ms": round(length(minus(nccl, compute)) / 1e3, 3),
    }
    if python:  # deep call chains: callers fill the top rows, so more of them
        report["idle_by_python_function"] = ranked(python, top=4 * top, key="function")
    return report


def innermost(over: list[tuple[float, HostOp]]) -> str | None:
    """Of (overlap, op) pairs with a gap: the most deeply nested op overlapping it at least half as much as the op
    overlapping it most (None when nothing overlaps)."""
    most = max((o for o, _ in over), default=0.0)
    deep = [op for o, op in over if most > 0 and o >= most / 2]
    return max(deep, key=lambda op: op.depth).name if deep else None
