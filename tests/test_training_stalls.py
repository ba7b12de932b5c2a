"""A training step that does not stall a GPU: no host-device sync inside a micro-batch (the
figures are read every LOG_EVERY_STEPS steps, StepLog), the noise drawn by the DataLoader's
workers with the numbers of the loop's own draws, and OFFLOAD_FROZEN's prefetching order.
The savers' numbers and resuming are tests/test_savers.py's and tests/test_saver_resume.py's."""

from contextlib import nullcontext

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from model_helpers import tiny_model
from sync_helpers import HostSyncs
from planning.imitation import cuda_autocast_without_gpu, fake_tensors, imitated_autocast
from planning.measure import HOST, materialise, meta_module
from runs.errors import TrainingError
from training.epochs import EpochBatches, NoisedClips, sample_noise
from training.flow_matching import batch_from_random_inputs, flow_matching_step, noised_inputs
from training.offload import next_block
from training.ranks import Ranks
from training.recipe import TrainingRecipe
from training.step_log import StepLog
from wan.config import tiny_config
from wan.device import autocast_for
from wan.model import WanModel, random_inputs

CPU = torch.device("cpu")
SAMPLING = dict(mode="uniform", shift=5.0, min_sigma=0.0, max_sigma=1.0)
SETTINGS = dict(LEARNING_RATE=1e-3, WEIGHT_DECAY=0.01, MAX_GRAD_NORM=1.0, EMA_DECAY=0.0, EMA_WARMUP=True,
                LAST_LAYERS=1, GRAD_ACCUM_STEPS=1, GRADIENT_CHECKPOINTING=True, SEED=0, LORA_RANK=4, LORA_ALPHA=4.0,
                LORA_TARGETS=("self_attn", "ffn"), LORA_DROPOUT=0.0, LORA_HEAD=False)


class Clips(torch.utils.data.Dataset):
    """Items as the latent cache's Dataset gives them."""

    def __init__(self, count: int = 6):
        self.items = [dict(batch_from_random_inputs({k: v[0] if torch.is_tensor(v) else v for k, v in
                                                     random_inputs(tiny_config(), 1, 2, 4, 4, seed=i).items()}),
                           recording=f"take{i}", first_frame=4 * i) for i in range(count)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


class ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (.item(), float(), bool()): each a sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- no sync in a micro-batch

@pytest.mark.parametrize("savers", [{}, {"OPTIMIZER_IN_BACKWARD": True}])
def test_a_training_micro_batch_and_its_step_read_no_tensor_value(savers):
    """On the CPU every tensor read is a host read; none happens from the batch to the
    optimizer step (fused AdamW, as on a GPU; the CPU's unfused one reads its step counters),
    the gradient norm left a tensor until the log step."""
    settings = dict(SETTINGS, TRAINING_STRATEGY="full", **savers)
    recipe, model = TrainingRecipe(), tiny_model(seed=0)
    trainable = recipe.prepare(model, settings)
    model.set_gradient_checkpointing(True)
    optimizer = recipe.make_optimizer(trainable, settings, CPU, CPU, imitating_cuda=True)
    loader = DataLoader(NoisedClips(Clips(), 0, SAMPLING), batch_sampler=EpochBatches())
    loader.batch_sampler.set_epoch(0, list(range(6)), [[0, 1]])
    batch = next(iter(loader))
    step_log = StepLog(Ranks())
    with ScalarReads() as reads:
        inputs, sigma, noise = noised_inputs(batch, CPU)
        losses = recipe.micro_batch(model, optimizer, inputs, sigma, noise, nullcontext(), 0.5)
        step_log.micro_batch(losses, torch.zeros(2), batch["recording"], batch["first_frame"])
        norm = recipe.clip_gradients_on_device(optimizer, trainable, settings)
        recipe.optimizer_step(optimizer, None, trainable, 0)
        step_log.step_done(1, 1, 1e-3, norm, 2)
    assert reads.count == 0
    rows = step_log.flush("nothing saved")
    assert rows[0]["loss"] == pytest.approx(losses.sum().item() / 2) and rows[0]["grad_norm"] == norm.item() > 0


def test_a_micro_batch_forward_on_cuda_neither_syncs_nor_waits_for_its_inputs():
    """The forward, the loss and its bookkeeping on fake 'cuda' tensors (a fake run cannot
    run a CUDA backward, see tests/test_fake_cuda.py), the batch pinned by the DataLoader:
    its copies to the GPU do not wait."""
    config = tiny_config()
    batches = EpochBatches()
    batches.set_epoch(0, list(range(6)), [[0, 1]])
    batch = next(iter(DataLoader(NoisedClips(Clips(), 0, SAMPLING), batch_sampler=batches)))
    batch = {k: v.pin_memory() if torch.is_tensor(v) and torch.cuda.is_available() else v for k, v in batch.items()}
    cuda = torch.device("cuda")
    with cuda_autocast_without_gpu(), fake_tensors(imitate_cuda=False, top_mode=HostSyncs()) as syncs:
        model = materialise(meta_module(lambda: WanModel(config)), cuda, torch.bfloat16)
        TrainingRecipe().prepare(model, dict(SETTINGS, TRAINING_STRATEGY="action_only"))
        step_log = StepLog(Ranks())
        for micro_batch in range(2):  # the first one makes the RoPE and action tables, once per run
            syncs.clear()
            inputs, sigma, noise = noised_inputs(batch, cuda)
            losses = flow_matching_step(model, inputs, sigma, noise, autocast_for(cuda))
            step_log.micro_batch(losses, batch["sigma"], batch["recording"], batch["first_frame"])
    assert losses.device.type == "cuda"
    assert syncs.syncs == []
    assert len(syncs.copies) == 7  # the batch's five inputs, sigma and noise: host to GPU, without waiting


# ----------------------------------------------------------------------------- reading the figures

def _log_steps(losses_per_step, norms, ranks=None) -> StepLog:
    step_log = StepLog(ranks or Ranks())
    for step, (losses, norm) in enumerate(zip(losses_per_step, norms), start=1):
        for micro in losses:
            step_log.micro_batch(torch.tensor(micro), torch.tensor([0.5] * len(micro)), ["take"] * len(micro),
                                 torch.arange(len(micro)))
        step_log.step_done(step, 1, 1e-4, torch.tensor(norm), sum(len(m) for m in losses))
    return step_log


def test_the_figures_read_later_are_those_read_at_once():
    losses = [[[0.5, 0.25], [0.125, 1.0]], [[2.0, 0.75], [0.5, 0.5]]]  # 2 steps of 2 micro-batches of 2
    rows = _log_steps(losses, [1.5, 0.5]).flush("")
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["loss"] for r in rows] == [(0.75 + 1.125) / 4, (2.75 + 1.0) / 4]  # as the loop summed them
    assert [r["loss_sum"] for r in rows] == [1.875, 3.75] and [r["samples"] for r in rows] == [4, 4]
    assert [r["grad_norm"] for r in rows] == [1.5, 0.5] and rows[0]["sigma"] == 0.5
    assert rows[0]["seconds_per_step"] == rows[1]["seconds_per_step"] >= 0


def test_a_non_finite_loss_is_named_by_its_step_and_clips_however_late_it_is_read():
    nan = float("nan")
    step_log = _log_steps([[[0.5]], [[0.5]], [[nan]], [[nan]]], [1.0, 1.0, nan, nan])
    with pytest.raises(TrainingError, match=r"loss became nan at optimizer step 3 \(epoch 1; clips take:0\).*"
                                            r"before saving anything of it\. the files remain"):
        step_log.flush("the files remain")
    step_log = _log_steps([[[0.5]], [[0.5]]], [1.0, float("inf")])
    with pytest.raises(TrainingError, match="gradient norm became inf at optimizer step 2"):
        step_log.flush("")


# ----------------------------------------------------------------------------- noise from the workers

def test_the_workers_draw_the_noise_of_the_loops_own_draws_over_epochs():
    clips = Clips()
    batches = EpochBatches()
    loader = DataLoader(NoisedClips(clips, 7, SAMPLING), batch_sampler=batches, num_workers=1,
                        persistent_workers=True)
    for epoch in range(2):
        order = torch.randperm(6, generator=torch.Generator().manual_seed(epoch)).tolist()
        batches.set_epoch(epoch, order, [[0, 1], [2, 3], [4]])
        got = list(loader)
        assert [len(b["noise"]) for b in got] == [2, 2, 1]
        for batch, positions in zip(got, [[0, 1], [2, 3], [4]]):
            for row, p in enumerate(positions):
                sigma, noise = sample_noise(7, epoch, p, clips[order[p]]["latents"].shape, SAMPLING)
                assert torch.equal(batch["noise"][row], noise) and batch["sigma"][row] == sigma[0]
                assert batch["recording"][row] == f"take{order[p]}"
    assert loader._iterator is not None and loader._iterator._workers[0].is_alive()  # one worker for both epochs


# ----------------------------------------------------------------------------- OFFLOAD_FROZEN's prefetching

def _called_order(blocks: int, micro_batches: int) -> list[int]:
    """Checkpointed training: each forward 0..n-1, then the backward recomputes n-1..0."""
    return [i for _ in range(micro_batches) for i in (*range(blocks), *reversed(range(blocks)))]


def test_the_next_block_is_guessed_right_through_forwards_and_backwards():
    for blocks in (1, 2, 30):
        called = _called_order(blocks, 3) + list(range(blocks))  # and a validation forward after
        guessed, previous, direction = [], None, 1
        for index in called:
            expected, direction = next_block(index, previous, direction, blocks)
            guessed.append(expected)
            previous = index
        wrong = [i for i, (guess, actual) in enumerate(zip(guessed, called[1:])) if guess != actual]
        assert wrong == [], blocks


def test_the_planners_imitation_prefetches_the_next_block_and_counts_it():
    settings = dict(SETTINGS, TRAINING_STRATEGY="lora", OFFLOAD_FROZEN=True)
    config = tiny_config(num_layers=3)
    recipe = TrainingRecipe()
    with fake_tensors():
        model = materialise(meta_module(lambda: WanModel(config)), torch.device("cpu"), torch.bfloat16)
        recipe.prepare(model, settings)
        model.set_gradient_checkpointing(True)
        offload = recipe.offload(model, settings, HOST)
        inputs = batch_from_random_inputs(random_inputs(config, 1, 2, 4, 4))
        for _ in range(2):
            recipe.micro_batch(model, None, inputs, torch.rand(1), torch.randn(inputs["latents"].shape),
                               imitated_autocast(True), 1.0)
    assert (offload.misses, offload.hits) == (1, 2 * 2 * 3 - 1)  # only the very first block waits
