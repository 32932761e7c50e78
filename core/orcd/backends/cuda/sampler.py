"""The CUDA backend's sampling side (the ``Backend`` contract's sample, sample_step,
sample_rows, launch_rows, release_rows, sample_to_device and warm_rows): which
device sampler takes a draw -- one request's (``DeviceSampling``) or a batch's rows
(``RowSamplers``), both in steps.py -- and the reference step where none can. A base
of ``CudaBackend``, whose device, step inputs and ``to_host`` it uses.
"""

from __future__ import annotations

import numpy as np

from orcd.backends.cuda.steps import DeviceSampling, PendingToken, RowSamplers
from orcd.ops import sampling


class BackendSampling:
    """The samplers of a CudaBackend, made at first use for the logits' width."""

    sampler: DeviceSampling | None      # one request's draws
    rows_sampler: RowSamplers | None    # a decode batch's rows

    def warm_rows(self, n: int) -> None:
        """Before serving (after ``warm_batch``, whose forwards gave the logits'
        width): the device samplers of n batched sequences (RowSamplers.prepare)."""
        n_vocab = self.batch.n_logits
        if n_vocab is not None and self._row_samplers(n_vocab).n_vocab == n_vocab:
            self.rows_sampler.prepare(n)

    def _device_sampler(self, logits) -> DeviceSampling | None:
        if self.sampler is None:
            self.sampler = DeviceSampling(self, logits.numel)
        return self.sampler if self.sampler is not None and self.sampler.n_vocab == logits.numel else None

    def sample(self, logits, params: sampling.SamplingParams, seen: np.ndarray,
               rng: np.random.Generator) -> int:
        return self.sample_step(logits, params, seen, rng).id

    def sample_step(self, logits, params: sampling.SamplingParams, seen: np.ndarray,
                    rng: np.random.Generator, *, n_prompt: int | None = None,
                    allowed: np.ndarray | None = None) -> sampling.Sampled:
        """The device sampler for this vocabulary (only the id, and
        the top-N logprobs when asked, cross to the host; its draw is seeded by
        params.seed, not ``rng``), else the reference step. Logits already on
        the host (the scheduler copies a batch's rows at once) take the reference
        step: the device sampler follows one request's draws at a time."""
        if isinstance(logits, np.ndarray):
            return sampling.sample_step(logits.reshape(-1), params, seen, rng, n_prompt, allowed)
        sampler = self._device_sampler(logits)
        if sampler is not None:
            return sampler(logits, params, seen, n_prompt, allowed)
        return sampling.sample_step(self.to_host(logits).reshape(-1), params, seen, rng,
                                    n_prompt, allowed)

    def sample_rows(self, logits, draws) -> list[sampling.Sampled]:
        """A batch's draws (sampling.RowDraw) by the device sampler, each row with
        its sequence's own device state; one copy brings every id to the host."""
        if isinstance(logits, np.ndarray) or self._row_samplers(logits.shape[-1]).n_vocab != logits.shape[-1]:
            return sampling.sample_rows(self.to_host(logits).reshape(logits.shape[0], -1), draws)
        return self.rows_sampler.sample(logits, draws)

    def launch_rows(self, logits, draws):
        """``sample_rows`` without the wait: the draws and the copy of their ids are
        queued, the returned handle's ``result()`` waits; the next forward_batch's
        ``follow`` reads the ids on the device (steps.RowSamplers.launch)."""
        return self._row_samplers(logits.shape[-1]).launch(logits, draws)

    def _row_samplers(self, n_vocab: int) -> RowSamplers:
        """The batch's device samplers, made for rows of n_vocab at first use."""
        if self.rows_sampler is None:
            self.rows_sampler = RowSamplers(self, n_vocab)
        return self.rows_sampler

    def release_rows(self, keys) -> None:
        if self.rows_sampler is not None:
            self.rows_sampler.release(keys)

    def sample_to_device(self, logits, params: sampling.SamplingParams, seen=None,
                         chained: bool = False) -> PendingToken | None:
        """Sample the next id into the decode step's input (step_ids), where the next
        ``CudaRunner.forward_pending`` reads it, and start its copy to the host; no
        wait. ``chained``: it follows the last id sampled here (``seen`` unused).
        None when there is no device sampler for these logits."""
        sampler = self._device_sampler(logits)
        if sampler is None:
            return None
        sampler.enqueue(logits, params, seen, self.step_ids, chained=chained)
        return self.steps.read_output(self.step_ids)
