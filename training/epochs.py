"""What an epoch trains on, in which order, and with which noise: all seeded, so that a
run gives the same steps on any number of ranks and after any interruption."""

import hashlib

import torch
from torch.utils.data import Dataset

from wan import flow


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """The clips of an epoch in a fresh seeded order; the same for every rank and on resume."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def plan_epoch(start: int, total: int, batch_size: int, accum: int, world: int) -> tuple[list, int]:
    """Cut positions [start, total) of the epoch order into optimizer steps.

    Returns (steps, dropped): steps[k][m][r] lists the positions rank r trains on in
    micro-batch m of step k. A micro-batch takes the next batch_size x world positions,
    rank by rank; the last one may be smaller (split as evenly as possible) and the last
    step may have fewer micro-batches. Positions that cannot give every rank one clip are
    dropped (only possible with several ranks). Steps consume consecutive positions, so a
    run resumed at any step boundary - on any number of ranks - continues the same order.
    """
    micro, position = [], start
    while total - position >= world:
        size = min(batch_size * world, total - position)
        base, extra = divmod(size, world)
        per_rank = []
        for r in range(world):
            n = base + (r < extra)
            per_rank.append(list(range(position, position + n)))
            position += n
        micro.append(per_rank)
    steps = [micro[i:i + accum] for i in range(0, len(micro), accum)]
    return steps, total - position


def seeded_generator(seed: int, *keys) -> torch.Generator:
    """A CPU generator of its own for (seed, *keys): independent streams for every sample,
    step and purpose, each the same on any number of ranks and after any interruption."""
    key = hashlib.sha256(":".join(str(k) for k in (seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


def seed_global_generators(seed: int, *keys) -> None:
    """Seed torch's global generators (the CPU's and every GPU's) from (seed, *keys), e.g. at each
    optimizer step: whatever draws from them inside the step (LoRA's dropout) then draws the
    same after a resume as in a run that was never stopped."""
    torch.manual_seed(seeded_generator(seed, *keys).initial_seed())


def stream_item(position: int, num_items: int, seed: int) -> tuple[int, int]:
    """(epoch, item index) of the position-th sample of an endless stream of seeded epochs:
    what a trainer that counts steps rather than epochs reads at that position."""
    epoch, offset = divmod(position, num_items)
    return epoch, epoch_order(num_items, seed, epoch)[offset]


def sample_noise(seed: int, epoch: int, position: int, shape, sampling: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigma and noise of one training sample, drawn from its own seeded generator:
    the same whatever the batch size, the number of ranks or an interruption."""
    g = seeded_generator(seed, epoch, position)
    sigma = flow.sample_sigmas(1, generator=g, **sampling)
    return sigma, torch.randn(shape, generator=g)


class EpochBatches:
    """The batch sampler of one DataLoader for a whole run (its workers then live as long as
    the run, persistent_workers): set_epoch() gives it an epoch's micro-batches, each a list
    of (clip index, epoch, position in the epoch's order) for NoisedClips."""

    def __init__(self):
        self.batches = []

    def set_epoch(self, epoch: int, order: list[int], positions: list[list[int]]) -> None:
        """positions: the epoch-order positions of each micro-batch this rank trains on."""
        self.batches = [[(order[p], epoch, p) for p in batch] for batch in positions]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class NoisedClips(Dataset):
    """A training set whose items carry their sample's sigma and noise (sample_noise: seeded
    by the run's seed, the epoch and the position, so the numbers are those of a loop that
    draws them itself), drawn by the DataLoader's workers off the training loop and handed
    over in pinned memory with the batch. Indexed by EpochBatches' (index, epoch, position)."""

    def __init__(self, dataset, seed: int, sampling: dict):
        self.dataset, self.seed, self.sampling = dataset, seed, sampling

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        index, epoch, position = key
        item = self.dataset[index]
        sigma, noise = sample_noise(self.seed, epoch, position, item["latents"].shape, self.sampling)
        return {**item, "sigma": sigma[0], "noise": noise}


def actions_digest(clips) -> str:
    """A fingerprint of the clips' keyboard and mouse rows (what KEY_MAP and the CSVs decide)."""
    digest = hashlib.sha256()
    for clip in clips:
        digest.update(clip.keyboard.numpy().tobytes())
        digest.update(clip.mouse.numpy().tobytes())
    return digest.hexdigest()
