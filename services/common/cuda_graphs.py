"""CUDA graphs for serving image nets: one captured graph per input shape that recurs.

Launching a style net's ~60 kernels one by one costs the host more time than the GPU takes
to run them: on an H200 the fp16 style net at 512 px took 6.4 ms launched eagerly and 1.3 ms
replayed from a CUDA graph (benchmarks/results/style_gpu.json). A graph replays one fixed
shape at fixed addresses, so each input shape (batch size included) gets its own graph.

Shapes are not padded to buckets: the style nets' instance normalisation would carry the
padding into every output pixel (a 300x200 image padded to 320x256 changed the committed
style nets' outputs to 32-33 dB PSNR). Instead a shape is captured the second time it is
seen (a full tile, the shape every large image is cut into, at warm-up): a stream of
one-off sizes runs as it would without graphs, and capturing (two passes on a side
stream, then the recorded one; no compilation) is paid only by shapes that recur. The
graphs of one model share one memory pool and at most ``max_graphs`` are kept (least
recently used dropped), which bounds GPU memory.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger("percept.models")

DEFAULT_MAX_GRAPHS = 8
# Shapes remembered as seen once (not yet captured); the oldest are forgotten first.
_SEEN_LIMIT = 256
# Passes on a side stream before capture (lazy CUDA and cuDNN initialisation, workspace
# allocation), so none of it lands in the graph.
_WARMUP_PASSES = 2

Forward = Callable[[Tensor], Tensor]
Shape = tuple[int, ...]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_input: Tensor
    static_output: Tensor


class CudaGraphRunner:
    """``forward`` on CUDA batches, replayed from a CUDA graph when the shape recurs.

    Calls from several threads are serialised (a graph's input and output buffers are
    shared by every replay). If a capture fails, ``forward`` runs directly from then on.
    """

    def __init__(self, forward: Forward, name: str, *,
                 max_graphs: int = DEFAULT_MAX_GRAPHS) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.forward = forward
        self.name = name
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Shape, _Graph] = OrderedDict()
        self.seen: OrderedDict[Shape, None] = OrderedDict()
        self.enabled = True
        self.captures = 0
        self.replays = 0
        self._pool = torch.cuda.graph_pool_handle()
        self._lock = threading.Lock()

    def __call__(self, batch: Tensor) -> Tensor:
        """``forward(batch)`` as a new tensor (the graph's output buffer is reused by the
        next replay)."""
        with self._lock:
            entry = self._graph_for(batch) if self.enabled else None
            if entry is None:
                return self.forward(batch)
            entry.static_input.copy_(batch)
            entry.graph.replay()
            self.replays += 1
            return entry.static_output.clone()

    def _graph_for(self, batch: Tensor) -> _Graph | None:
        key = tuple(batch.shape)
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
            return entry
        if key not in self.seen:
            self.seen[key] = None
            while len(self.seen) > _SEEN_LIMIT:
                self.seen.popitem(last=False)
            return None
        self.seen.pop(key, None)
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        try:
            entry = self._capture(batch)
        except Exception:  # any capture failure: serve without graphs
            log.exception("CUDA graph capture failed for %s on a %s batch; running it "
                          "without graphs from now on", self.name, key)
            self.enabled = False
            self.graphs.clear()
            return None
        self.graphs[key] = entry
        self.captures += 1
        log.info("captured a CUDA graph for %s at %s (%d kept)", self.name, key,
                 len(self.graphs))
        return entry

    def _capture(self, example: Tensor) -> _Graph:
        static_input = example.clone(memory_format=torch.preserve_format)
        current = torch.cuda.current_stream(example.device)
        side = torch.cuda.Stream(device=example.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_PASSES):
                self.forward(static_input)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another model's thread launching work meanwhile is not an error
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_output = self.forward(static_input)
        return _Graph(graph, static_input, static_output)
