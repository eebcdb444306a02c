"""Static shapes for the engine's model calls: rows padded to a bucket, CUDA graphs per shape, compile.

A round's batch has any number of rows (sessions x CFG halves). A CUDA graph replays one fixed shape,
so the rows are padded up to a bucket (`BUCKETS`) by repeating the last real row, and one graph is
captured lazily per (bucket, input shapes) on first use: the first frame of each size of the adaptive
ladder pays the capture once. The model's rows are independent (per-row group norms and attention),
so the padding rows never change the real rows' outputs; `run_padded` is the same padding done
eagerly, which is how the CPU tests prove it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stream.config import ConfigError

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 6, 8, 12, 16, 24, 32)  # rows a batch is padded up to; beyond 32, multiples of 16
COMPILE_MODES = ("off", "default", "max-autotune")
GRAPH_MODES = ("auto", "on", "off")
WARMUP_CALLS = 2  # eager calls on a side stream before a capture (lazy inits, cuDNN/cuBLAS choices)

Inputs = Sequence[torch.Tensor | None]


def bucket_for(rows: int) -> int:
    """The static row count a batch of `rows` runs at: the smallest bucket that holds it."""
    if rows < 1:
        raise ValueError(f"a batch needs at least one row, got {rows}")
    for bucket in BUCKETS:
        if rows <= bucket:
            return bucket
    return -(-rows // 16) * 16


def pad_rows(inputs: Inputs, rows: int) -> list[torch.Tensor | None]:
    """Each tensor's first dimension padded to `rows` by repeating its last row (None stays None)."""
    padded: list[torch.Tensor | None] = []
    for x in inputs:
        if x is None or x.shape[0] == rows:
            padded.append(x)
            continue
        filler = x[-1:].expand(rows - x.shape[0], *x.shape[1:])
        padded.append(torch.cat([x, filler]))
    return padded


def run_padded(fn: Callable[..., torch.Tensor], inputs: Inputs) -> torch.Tensor:
    """fn over the inputs padded to their bucket, the real rows of its output: what a graph replays."""
    rows = _rows(inputs)
    return fn(*pad_rows(inputs, bucket_for(rows)))[:rows]


def use_graphs(setting: str, device: torch.device) -> bool:
    """Whether CUDA graphs are on: `auto` on CUDA only; `on` anywhere else is a clear error."""
    if setting not in GRAPH_MODES:
        raise ConfigError(f"cuda_graphs must be one of {', '.join(GRAPH_MODES)}, got {setting!r}")
    if setting == "on" and device.type != "cuda":
        raise ConfigError(
            f"--cuda-graphs on needs a CUDA device, and this run is on {device.type}; "
            "use --cuda-graphs auto (on for CUDA only) or off"
        )
    return device.type == "cuda" and setting != "off"


def compile_module(module: Any, mode: str, graphs: bool) -> Any:
    """torch.compile on a module (the UNet), or the module itself for `off`. With our own CUDA graphs
    on, max-autotune leaves graphs to us (its own would be captured inside ours)."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "off":
        return module
    torch_mode = "max-autotune-no-cudagraphs" if mode == "max-autotune" and graphs else mode
    logger.info(
        "torch.compile(%s, mode=%s): the first frame of each shape compiles",
        type(module).__name__,
        torch_mode,
    )
    return torch.compile(module, mode=torch_mode)


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: list[torch.Tensor | None]  # static input buffers, at the bucket's row count
    output: torch.Tensor  # static output buffer, written by every replay


class GraphRunner:
    """A model call on static shapes: on CUDA a captured graph per (bucket, input shapes) replayed with
    the inputs copied into its static buffers; elsewhere (or with capture off) the same padding, eager.

    Each output is a fresh tensor (the real rows, copied out of the static buffer), so a caller may keep
    it past the next call. One runner belongs to one engine and is called from one thread at a time.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], name: str, capture: bool, pool: Any = None) -> None:
        self.fn, self.name, self.capture = fn, name, capture
        self.pool = pool  # a memory pool shared by an engine's graphs (they never run concurrently)
        self.graphs: dict[tuple[Any, ...], _Captured] = {}
        self.capture_seconds = 0.0  # total time spent capturing so far

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        if not self.capture:
            return run_padded(self.fn, inputs)
        rows = _rows(inputs)
        bucket = bucket_for(rows)
        key = (bucket, *(None if x is None else (tuple(x.shape[1:]), x.dtype) for x in inputs))
        captured = self.graphs.get(key)
        if captured is None:
            try:
                captured = self.graphs[key] = self._capture(pad_rows(inputs, bucket))
            except Exception as exc:  # an op that cannot be captured: slower, never wrong
                logger.warning(
                    "could not capture a CUDA graph of %s (%s); it runs without CUDA graphs from now on",
                    self.name,
                    str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__,
                )
                self.capture = False
                return run_padded(self.fn, inputs)
        for static, x in zip(captured.inputs, inputs, strict=True):
            if static is not None and x is not None:
                static[:rows].copy_(x, non_blocking=True)
                if rows < bucket:
                    static[rows:].copy_(x[-1:].expand(bucket - rows, *x.shape[1:]), non_blocking=True)
        captured.graph.replay()
        return captured.output[:rows].clone()

    def _capture(self, padded: list[torch.Tensor | None]) -> _Captured:
        start = time.perf_counter()
        static = [None if x is None else x.clone() for x in padded]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(*static)
        self.capture_seconds += time.perf_counter() - start
        shapes = [None if x is None else tuple(x.shape) for x in padded]
        logger.info(
            "captured a CUDA graph of %s for %s in %.2f s", self.name, shapes, time.perf_counter() - start
        )
        return _Captured(graph, static, output)


def _rows(inputs: Inputs) -> int:
    first = inputs[0]
    assert first is not None, "the first input of a model call is its batch"
    return int(first.shape[0])
