"""Rotary position embedding: normal and NeoX pairing, partial rotary, per-
dimension frequency factors (Phi-3 LongRoPE) and YaRN (GPT-OSS), computed the
way ggml's rope does so the reference matches llama.cpp."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RopeConfig:
    n_rot: int                      # rotated dimensions per head (<= head_dim)
    head_dim: int
    base: float = 10000.0
    neox: bool = True               # NeoX pairs (i, i + n_rot/2); normal pairs (2i, 2i+1)
    freq_scale: float = 1.0         # 1 / YaRN factor (linear scaling)
    ext_factor: float = 0.0         # YaRN extrapolation mix (1.0 for YaRN, 0 = off)
    attn_factor: float = 1.0        # magnitude scale
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    n_ctx_orig: int = 0
    freq_factors: tuple[float, ...] | None = None  # divides theta per pair (LongRoPE)

    def corr_dims(self) -> tuple[float, float]:
        """YaRN's correction range of dimensions, as ggml_rope_yarn_corr_dims."""
        def corr_dim(n_rot: float) -> float:
            return self.n_rot * math.log(self.n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(self.base))
        start = math.floor(corr_dim(self.beta_fast))
        end = math.ceil(corr_dim(self.beta_slow))
        return max(0.0, start), min(self.n_rot - 1.0, end)


def rope_cos_sin(cfg: RopeConfig, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of every rotated pair at each position: [T, n_rot/2] float32."""
    half = cfg.n_rot // 2
    i = np.arange(half, dtype=np.float64)
    inv_freq = cfg.base ** (-2.0 * i / cfg.n_rot)                 # theta_extrap per position 1
    if cfg.freq_factors is not None:
        inv_freq = inv_freq / np.asarray(cfg.freq_factors, dtype=np.float64)
    theta_extrap = pos.astype(np.float64)[:, None] * inv_freq[None, :]   # [T, half]
    theta = cfg.freq_scale * theta_extrap
    mscale = cfg.attn_factor
    if cfg.ext_factor != 0.0:
        low, high = cfg.corr_dims()
        y = (i - low) / max(0.001, high - low)                    # ramp over pair index (i0/2)
        ramp_mix = (1.0 - np.clip(y, 0.0, 1.0)) * cfg.ext_factor
        theta = theta * (1 - ramp_mix) + theta_extrap * ramp_mix
        mscale *= 1.0 + 0.1 * math.log(1.0 / cfg.freq_scale)
    return ((np.cos(theta) * mscale).astype(np.float32),
            (np.sin(theta) * mscale).astype(np.float32))


def rope_ref(x: np.ndarray, pos: np.ndarray, cfg: RopeConfig) -> np.ndarray:
    """x: [T, n_head * head_dim] -> rotated copy; dims past n_rot pass through."""
    T = x.shape[0]
    xh = x.reshape(T, -1, cfg.head_dim).copy()                   # [T, H, hd]
    cos, sin = rope_cos_sin(cfg, pos)
    cos, sin = cos[:, None, :], sin[:, None, :]                  # [T, 1, half]
    half = cfg.n_rot // 2
    if cfg.neox:
        a, b = xh[..., :half].copy(), xh[..., half:cfg.n_rot].copy()
        xh[..., :half] = a * cos - b * sin
        xh[..., half:cfg.n_rot] = a * sin + b * cos
    else:
        a, b = xh[..., 0:cfg.n_rot:2].copy(), xh[..., 1:cfg.n_rot:2].copy()
        xh[..., 0:cfg.n_rot:2] = a * cos - b * sin
        xh[..., 1:cfg.n_rot:2] = a * sin + b * cos
    return xh.reshape(T, -1)


# -- CUDA ------------------------------------------------------------------------
# Launcher for rope.cu: the cos/sin table of a RopeConfig is built once on the
# host (rope_cos_sin over every position of the context) and uploaded; the
# kernel gathers the row of each token's position, read from device memory.

class RopeTable:
    """cos and sin of one RopeConfig at positions 0..n_pos-1, on the device."""

    def __init__(self, cfg: RopeConfig, n_pos: int, cos_ptr: int, sin_ptr: int) -> None:
        self.cfg, self.n_pos, self.cos_ptr, self.sin_ptr = cfg, n_pos, cos_ptr, sin_ptr

    @staticmethod
    def host_arrays(cfg: RopeConfig, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
        # [n_pos, n_rot / 2] each
        return rope_cos_sin(cfg, np.arange(n_pos, dtype=np.int64))


class RopeKernels:

    SOURCE = "rope.cu"   # package data of orcd.ops (orcd.backends.cuda.backend.kernel_sources lists it)
    def __init__(self, device, compiler, launcher) -> None:
        from orcd.backends.cuda.nvrtc import KernelSource

        module = compiler.load(device, KernelSource.from_package("orcd.ops", self.SOURCE))
        self._rope = module.function("rope_f32")
        self._launch = launcher

    def rope(self, x, pos, table: RopeTable, out) -> None:
        # x, out: [T, n_head * head_dim] f32; pos: [T] int32 on the device
        cfg = table.cfg
        T = x.shape[0]
        n_head = x.numel // (T * cfg.head_dim)
        threads = min(256, max(32, -(-cfg.head_dim // 32) * 32))
        self._launch(self._rope, (n_head, T), threads,
                     [np.uint64(x.ptr), np.uint64(out.ptr), np.uint64(pos.ptr),
                      np.uint64(table.cos_ptr), np.uint64(table.sin_ptr), n_head, cfg.head_dim,
                      cfg.n_rot, np.int32(1 if cfg.neox else 0), table.n_pos])
