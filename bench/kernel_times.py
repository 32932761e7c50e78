"""GPU time by kernel of one call of ``step`` (a replayed graph or eager launches):
CUPTI, through torch.profiler, sees a graph's kernels too. Used by batch_decode.py
(``--profile B``) and decode_profile.py (``--kernels``)."""

from __future__ import annotations

from collections import defaultdict


def kernel_times(step) -> dict[str, list]:
    """{kernel name (60 chars): [ms, launches]} of one ``step()``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    by_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            rec = by_name[ev.name[:60]]
            rec[0] += ev.time_range.elapsed_us() / 1e3
            rec[1] += 1
    return dict(by_name)


def print_kernel_times(step, label: str, top: int = 15) -> None:
    by_name = kernel_times(step)
    busy = sum(v[0] for v in by_name.values())
    print(f"{label}: GPU busy {busy:.3f} ms in {sum(v[1] for v in by_name.values())} kernels")
    for name, (ms, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {name:<60} {n:>4} {ms:8.3f} ms {ms / busy:5.0%}  {1000 * ms / n:7.2f} us each")
