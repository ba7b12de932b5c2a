"""Common GPUs for rent: memory and dense bf16 tensor-core peak.

Peaks are dense (no 2:4 sparsity) bf16 with float32 accumulation, from NVIDIA's documents:
- RTX 3090: "NVIDIA Ampere GA102 GPU Architecture" whitepaper, appendix table (71 dense / 142 sparse).
- RTX 4090: "NVIDIA Ada GPU Architecture" whitepaper, appendix table (165.2 / 330.4).
- RTX A6000: NVIDIA RTX A6000 datasheet, 309.7 TFLOPS tensor performance with sparsity (154.8 dense).
- L40S: NVIDIA L40S datasheet (362.05 / 733).
- A100 40 GB and 80 GB: NVIDIA A100 Tensor Core GPU datasheet (312 / 624).
- H100 SXM and PCIe: NVIDIA H100 Tensor Core GPU datasheet (1,979 / 1,513 with sparsity).
- H100 NVL: same datasheet (1,671 with sparsity per GPU).
- H200: NVIDIA H200 Tensor Core GPU datasheet (1,979 with sparsity; the H100 SXM's compute).
Memory is the nominal size, which is in GiB: cards are sold by the binary size of their
memory ("24 GB" is 24 GiB of chips), so the planner compares it, and GPU_MEMORY_GB, as GiB
(card_bytes) and prints GiB. The total nvidia-smi shows is up to ~5% lower (L40S: 45 GiB of
its 48, H100: 79.6 of 80: ECC and the driver's share), which the plan's margin covers.

The plans' time floors are FLOPs at the dense peak; real training runs reach a fraction of
it (UTILISATION), which the plans say beside the floor.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    name: str
    memory_gb: float        # nominal, = GiB (card_bytes)
    bf16_tflops: float      # dense bf16 tensor-core peak, TFLOP/s
    device_name: tuple      # substrings of torch.cuda.get_device_name() that all name this card


# Ordered so that the first card whose substrings all match a device name is the right one.
CARDS = (
    Card("RTX 3090", 24, 71.0, ("RTX 3090",)),
    Card("RTX 4090", 24, 165.2, ("RTX 4090",)),
    Card("RTX A6000", 48, 154.8, ("RTX A6000",)),
    Card("L40S", 48, 362.05, ("L40S",)),
    Card("A100 40GB", 40, 312.0, ("A100", "40GB")),
    Card("A100 80GB", 80, 312.0, ("A100",)),
    Card("H100 PCIe", 80, 756.0, ("H100", "PCIe")),
    Card("H100 NVL", 94, 835.0, ("H100", "NVL")),
    Card("H100 SXM", 80, 989.4, ("H100",)),
    Card("H200", 141, 989.4, ("H200",)),
)


UTILISATION = (0.30, 0.60)  # the share of the dense peak real training runs reach, low to high


def seconds_at_peak(flops: float, card: Card) -> float:
    """The time floor of `flops` on one card: its dense bf16 peak, fully used."""
    return flops / (card.bf16_tflops * 1e12)


def card_named(name: str) -> Card:
    return next(card for card in CARDS if card.name == name)


def card_bytes(memory_gb: float) -> float:
    """A card's memory as sold ("24 GB", GPU_MEMORY_GB=24) in bytes: that many GiB."""
    return memory_gb * 2**30


def card_for_device(device_name: str) -> Card | None:
    """The card torch.cuda.get_device_name() names ("NVIDIA H100 80GB HBM3" -> H100 SXM)."""
    return next((card for card in CARDS if all(part in device_name for part in card.device_name)), None)
