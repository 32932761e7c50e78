"""Stream capture into a CUDA graph, and replay.

``capture(device, record)`` runs ``record()`` with the device's stream in
capture mode: every launch ``record`` makes is recorded, not executed. The
graph is instantiated once and then replayed with one ``cuGraphLaunch``,
which is how a whole decode step becomes a single launch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from orcd.errors import CudaError

if TYPE_CHECKING:  # pragma: no cover
    from orcd.backends.cuda.device import CudaDevice


class CudaGraph:
    """An instantiated graph; ``replay()`` enqueues it on the device's stream."""

    def __init__(self, device: "CudaDevice", graph: Any, exec_: Any) -> None:
        self.device, self._graph, self._exec = device, graph, exec_

    def replay(self) -> None:
        from orcd.backends.cuda.driver import cu

        if self._exec is None:
            raise CudaError("replay of a destroyed graph", cuda_error="DESTROYED", call="cuGraphLaunch")
        self.device.make_current()
        cu("cuGraphLaunch", self._exec, self.device.stream)

    def close(self) -> None:
        from orcd.backends.cuda.driver import cu

        if self._exec is not None:
            self.device.make_current()
            cu("cuGraphExecDestroy", self._exec)
            cu("cuGraphDestroy", self._graph)
            self._exec = self._graph = None

    def __enter__(self) -> "CudaGraph":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def capture(device: "CudaDevice", record: Callable[[], None]) -> CudaGraph:
    """Capture what ``record()`` enqueues on the device's stream as a graph."""
    from orcd.backends.cuda.driver import cu, driver_module

    drv = driver_module()
    device.make_current()
    stream = device.stream
    # Thread-local mode: other threads' unrelated CUDA calls cannot break the capture.
    cu("cuStreamBeginCapture", stream, drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
    try:
        record()
    except BaseException:
        # End the capture so the stream is usable again, then drop the partial graph.
        result = drv.cuStreamEndCapture(stream)
        if result[0] == drv.CUresult.CUDA_SUCCESS and result[1] is not None:
            drv.cuGraphDestroy(result[1])
        raise
    graph = cu("cuStreamEndCapture", stream)
    try:
        exec_ = cu("cuGraphInstantiate", graph, 0)
    except CudaError:
        cu("cuGraphDestroy", graph)
        raise
    return CudaGraph(device, graph, exec_)


def capture_like(device: "CudaDevice", forward: Callable[[], Any], eager: Any, what: str) -> CudaGraph:
    """Capture ``forward()``, which an eager run just made, returning ``eager``: the
    capture must allocate as that run did (same shapes in the same order give the same
    scratch addresses), so the graph's result lies where the eager one did."""
    got = []
    graph = capture(device, lambda: got.append(forward()))
    if got[0] != eager:
        graph.close()
        raise RuntimeError(f"{what} capture allocated differently from its eager run")
    return graph
