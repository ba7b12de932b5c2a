"""The training loop's figures without stalls: each micro-batch's loss and each step's
gradient norm stay on the device until they are needed, and are read in one transfer.

Reading a number off a GPU (`.item()`, `float(tensor)`) makes the host wait until the GPU
has finished everything queued before it, so a loop that reads the loss every micro-batch
never runs ahead of the GPU. This one reads them every LOG_EVERY_STEPS optimizer steps,
before every save and at every epoch's end (`flush`), and checks them then: the first step
whose loss or gradient norm is not finite stops the run with the step, the clips and the
rank, as reading them at once would - only up to LOG_EVERY_STEPS - 1 steps later. Those
later steps ran on weights that a non-finite gradient may have spoiled, so nothing of them
is kept: a flush comes before every file a run writes, so nothing non-finite is ever saved.
"""

import math
import time
from dataclasses import dataclass, field

import torch

from runs.errors import TrainingError


@dataclass
class _MicroBatch:
    loss_sum: torch.Tensor       # 0-d, on the device
    finite: torch.Tensor         # 0-d bool, on the device
    sigma_sum: torch.Tensor      # 0-d, on the host (the sigmas come from there): read without a transfer
    clips: object                # (recordings, first frames), read only to name them in an error


@dataclass
class _Step:
    step: int
    epoch: int
    lr: float
    grad_norm: torch.Tensor      # 0-d, on the device
    samples: int
    micro_batches: list = field(default_factory=list)


class StepLog:
    """micro_batch() and step_done() keep a step's figures; flush() reads them all and returns
    the metrics rows (checked). ranks: training.ranks.Ranks; several ranks sum the losses and
    sigmas of a micro-batch, as the loop did micro-batch by micro-batch."""

    def __init__(self, ranks):
        self.ranks = ranks
        self.pending: list[_Step] = []
        self.micro_batches: list[_MicroBatch] = []
        self.start_clock()

    def start_clock(self) -> None:
        """Time the steps from now (an epoch's first step; a flush restarts it)."""
        self.clock = time.time()

    def micro_batch(self, losses: torch.Tensor, sigma: torch.Tensor, recordings, first_frames) -> None:
        """losses [B] on the device (not read); sigma [B] on the host; the clips, for errors."""
        losses = losses.detach()
        self.micro_batches.append(_MicroBatch(losses.sum(), torch.isfinite(losses).all(), sigma.sum(),
                                              (recordings, first_frames)))

    def step_done(self, step: int, epoch: int, lr: float, grad_norm: torch.Tensor, samples: int) -> None:
        self.pending.append(_Step(step, epoch, lr, grad_norm.detach(), samples, self.micro_batches))
        self.micro_batches = []

    def flush(self, on_disk: str) -> list[dict]:
        """Every pending step's metrics row ({"step", "epoch", "loss", "lr", "grad_norm",
        "sigma", "seconds_per_step", "loss_sum", "samples"}; the seconds are the average of
        the steps read together), after one transfer (a sync on a GPU). Raises TrainingError
        at the first step whose loss or gradient norm is not finite; on_disk says what the run
        leaves behind."""
        steps, self.pending = self.pending, []
        if not steps:
            return []
        seconds = (time.time() - self.clock) / len(steps)
        device_values = [v for s in steps for m in s.micro_batches for v in (m.finite, m.loss_sum)]
        device_values += [s.grad_norm for s in steps]
        device = next((v.device for v in device_values if v.device.type != "cpu"), torch.device("cpu"))
        read = torch.stack([v.double().to(device) for v in device_values]).tolist()
        per_micro, norms = read[:len(read) - len(steps)], read[len(read) - len(steps):]
        sigmas = [m.sigma_sum.item() for s in steps for m in s.micro_batches]
        summed = self.ranks.sum([x for i, sigma in enumerate(sigmas) for x in (*per_micro[2 * i:2 * i + 2], sigma)])
        rows, position = [], 0
        for step, norm in zip(steps, norms):
            loss_sum = sigma_sum = 0.0
            for micro in step.micro_batches:
                finite, loss, sigma = summed[3 * position:3 * position + 3]
                position += 1
                if finite < self.ranks.world:
                    self._stop_at_loss(step, micro, loss, on_disk)
                loss_sum, sigma_sum = loss_sum + loss, sigma_sum + sigma
            if not math.isfinite(norm):
                raise TrainingError(f"the gradient norm became {norm} at optimizer step {step.step}; training stopped "
                                    f"before saving anything of it. {on_disk}. Try a lower LEARNING_RATE or "
                                    "MIXED_PRECISION=fp32.")
            rows.append({"step": step.step, "epoch": step.epoch, "loss": loss_sum / step.samples, "lr": step.lr,
                         "grad_norm": norm, "sigma": sigma_sum / step.samples, "seconds_per_step": seconds,
                         "loss_sum": loss_sum, "samples": step.samples})
        self.start_clock()
        return rows

    def _stop_at_loss(self, step: _Step, micro: _MicroBatch, loss: float, on_disk: str) -> None:
        recordings, first_frames = micro.clips
        clips = ", ".join(f"{r}:{f}" for r, f in zip(recordings, first_frames.tolist()))
        rank = f" on rank {self.ranks.rank}" if self.ranks.world > 1 else ""
        raise TrainingError(
            f"the loss became {loss} at optimizer step {step.step} (epoch {step.epoch}; clips {clips}{rank}); training "
            f"stopped before saving anything of it. {on_disk}. Try a lower LEARNING_RATE or MAX_GRAD_NORM, or "
            "MIXED_PRECISION=fp32.")
