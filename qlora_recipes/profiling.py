"""Traced training steps (`trainer.profile_steps`): where a step's time goes, written to RUN_DIR/profile/.

- ops_by_cuda.txt / ops_by_cpu.txt: torch.profiler's operator tables, by GPU and by host time;
- gpu_busy.json: the traced wall time and how much of it the GPU was running a kernel;
- kernels.json: every GPU activity of the traced steps by full name, with its calls and total time, largest first
  (the operator tables cut names and stop at 40 rows; two traces diffed by kernel name show which work grows with
  the tokens of a step and which does not);
- idle.json: the GPU's idle gaps, each put down to the host operation that was running through it (a step
  that waits on the host shows which host work to cut), and, for multi-GPU runs, the NCCL kernels' time and
  how much of it no compute kernel overlapped (communication the step waits for). With `trainer.profile_python`
  the trace also records Python calls: `idle_by_python_function` then says, for each Python function, how much of
  the idle time it was running through (its callers included), and each of the largest gaps names the innermost
  Python function running through it (the line of a library's code the GPU waits on).
- memory_peak.json (CUDA): the traced steps' peak of allocated memory and what was live at it, grouped by the line
  that allocated it (`memory_at_peak`); memory_snapshot.pickle is the allocator's full record of the same steps,
  for https://pytorch.org/memory_viz.
The traced steps run slower (the profiler's own host cost); bench leaves them out of its figures.
`SavedBytes` adds up what a forward keeps for its backward; `recompute_bytes` (CPU or GPU, no trace) measures that
for each gradient-checkpointed region's recompute: the backward holds one region's at a time, so the largest sets
the step's peak.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("qlora_recipes")

NO_HOST_OP = "(no host op traced)"  # Python between traced ops, or a thread the profiler does not see
NO_FRAME = "(no Python frame: a C++ caller, e.g. autograd's backward of a built-in op)"
OWNERS = ("qlora_recipes", "peft", "transformers", "trl", "accelerate", "bitsandbytes", "liger_kernel")
MEMORY_TRACE_ENTRIES = 2_000_000  # allocator events kept for memory_peak.json (a 7B step: 18,243-156,585, call BC)


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
        self.before = 0  # bytes allocated when the first traced step began

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
                    if torch.cuda.is_available():
                        prof.before = torch.cuda.memory_allocated()
                        torch.cuda.memory._record_memory_history(
                            context="alloc", stacks="python", max_entries=MEMORY_TRACE_ENTRIES, clear_history=True
                        )

            def on_step_end(self, args, state, control, **kwargs):
                if prof.profiler is not None and state.global_step == prof.steps[-1]:
                    prof.profiler.__exit__(None, None, None)
                    if torch.cuda.is_available():
                        snapshot, allocated = torch.cuda.memory._snapshot(), torch.cuda.memory_allocated()
                        torch.cuda.memory._record_memory_history(enabled=None)  # off before anything can fail
                        prof.write_memory(snapshot, allocated)
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
        (self.out / "kernels.json").write_text(json.dumps(kernel_totals(kernels), indent=1))
        (self.out / "idle.json").write_text(json.dumps(idle_report(kernels, host), indent=2))
        log.info("profiled steps: %s", json.dumps(busy))
        log.info("profile of steps %s written to %s", self.steps, self.out)

    def write_memory(self, snapshot: dict[str, Any], allocated: int) -> None:
        """memory_snapshot.pickle and memory_peak.json from the allocator's record of the traced steps."""
        import torch

        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "memory_snapshot.pickle", "wb") as f:
            pickle.dump(snapshot, f)
        trace = snapshot["device_traces"][torch.cuda.current_device()]
        if len(trace) >= MEMORY_TRACE_ENTRIES:
            log.warning(
                "the allocator kept only its last %d events: memory_peak.json misses the step's start", len(trace)
            )
        report = memory_at_peak(trace, self.before)
        report["allocated_end_gib"] = round(allocated / 2**30, 3)  # torch's own count: the replay should match it
        (self.out / "memory_peak.json").write_text(json.dumps(report, indent=2))
        log.info("traced peak %.2f GiB allocated, at %s", report["peak_gib"], report["peak_at"])


class SavedBytes:
    """Saved-tensor hooks (`hooks()`) that add up the distinct storages autograd keeps for a backward, the storages in
    `params` (the parameters' data pointers) left out: `total` bytes."""

    def __init__(self, params: set[int]) -> None:
        self.params = params
        self.storages: dict[int, int] = {}

    def pack(self, tensor: Any) -> Any:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def hooks(self) -> Any:
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


def recompute_bytes(blocks: list[Any], params: set[int]) -> list[int]:
    """Route the checkpointed `blocks`' checkpoint functions through a counter and return the list it fills: for
    each checkpointed region's recompute in the backward (one a block, or one a sublayer), the bytes of the tensors
    it keeps for that region's backward, storages in `params` (the parameters' data pointers) left out."""
    import functools

    import torch

    regions: list[int] = []

    def counted(function: Any, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # the reentrant checkpoint's forward keeps nothing of the region
            return function(*args, **kwargs)
        saved = SavedBytes(params)
        with saved.hooks():
            out = function(*args, **kwargs)
        regions.append(saved.total)
        return out

    def routed(checkpoint: Any, function: Any, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(functools.partial(counted, function), *args, **kwargs)

    for block in blocks:
        block._gradient_checkpointing_func = functools.partial(routed, block._gradient_checkpointing_func)
    return regions


def frame_site(frame: dict[str, Any]) -> str:
    """A traceback frame as `path:line function`, the path from its package (or its file name, for generated
    code such as a compiled graph's)."""
    path = frame["filename"].replace("\\", "/")
    parts = path.split("/")
    start = max((i for i, part in enumerate(parts) if part in (*OWNERS, "torch")), default=len(parts) - 1)
    return f"{'/'.join(parts[start:])}:{frame['line']} {frame['name']}"


def allocation_site(frames: list[dict[str, Any]]) -> str:
    """Where an allocation was made, from its Python traceback (innermost frame first): the innermost frame outside
    torch's own code (a line of ours, of a library, or of a compiled graph), and, when that is not one of OWNERS'
    packages, the innermost frame that is, after an arrow (the compiled graph of which of our or a library's calls).
    NO_FRAME when no Python frame is known."""
    sites = [frame_site(f) for f in frames]
    outside = [s for s in sites if not s.startswith("torch/")]
    if not outside:
        return sites[0] if sites else NO_FRAME
    owner = next((s for s in outside if s.split("/")[0] in OWNERS), None)
    return outside[0] if owner in (None, outside[0]) else f"{outside[0]} <- {owner}"


def memory_at_peak(trace: list[dict[str, Any]], before: int, top: int = 25) -> dict[str, Any]:
    """The peak of allocated memory over a CUDA caching allocator trace and what was live at it. `trace` is
    torch.cuda.memory._snapshot()["device_traces"][device], recorded from a moment when `before` bytes were
    allocated already (weights, optimizer states, the last step's leftovers). An `alloc` adds its size, a
    `free_completed` takes it back (the allocator's own count; `free_requested` only marks a block that other
    streams still use). A freed block the trace never saw allocated was part of `before`. The allocations live at
    the peak are grouped by `allocation_site`, largest first."""
    total = peak = before
    peak_index = -1
    for i, entry in enumerate(trace):
        if entry["action"] == "alloc":
            total += entry["size"]
            if total > peak:
                peak, peak_index = total, i
        elif entry["action"] == "free_completed":
            total -= entry["size"]
    live: dict[int, dict[str, Any]] = {}
    untraced = before
    for entry in trace[: peak_index + 1]:
        if entry["action"] == "alloc":
            live[entry["addr"]] = entry
        elif entry["action"] == "free_completed" and live.pop(entry["addr"], None) is None:
            untraced -= entry["size"]
    groups: dict[str, list[int]] = {}
    for entry in live.values():
        group = groups.setdefault(allocation_site(entry.get("frames", [])), [0, 0])
        group[0] += entry["size"]
        group[1] += 1
    ranked = sorted(groups.items(), key=lambda item: -item[1][0])
    at_peak = trace[peak_index] if peak_index >= 0 else None
    return {
        "before_gib": round(before / 2**30, 3),
        "peak_gib": round(peak / 2**30, 3),
        "peak_at": allocation_site(at_peak.get("frames", [])) if at_peak else "(before the traced steps)",
        "peak_stack": [frame_site(f) for f in at_peak.get("frames", [])][:30] if at_peak else [],
        "untraced_live_at_peak_gib": round(untraced / 2**30, 3),  # of `before`, still allocated at the peak
        "live_at_peak": [
            {"where": where, "gib": round(size / 2**30, 3), "allocations": n} for where, (size, n) in ranked[:top]
        ],
        "others_gib": round(sum(size for _, (size, _) in ranked[top:]) / 2**30, 3),
        "replayed_end_gib": round(total / 2**30, 3),
        "trace_entries": len(trace),
    }


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


def kernel_totals(kernels: list[Kernel]) -> list[dict[str, Any]]:
    """Each GPU activity name with its calls and summed duration (ms), largest total first."""
    totals: dict[str, list[float]] = {}
    for k in kernels:
        entry = totals.setdefault(k.name, [0, 0.0])
        entry[0] += 1
        entry[1] += k.end - k.start
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])
    return [{"name": name, "calls": int(calls), "total_ms": round(us / 1e3, 4)} for name, (calls, us) in ranked]


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
