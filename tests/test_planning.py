"""The GPU planner: fake-tensor memory counts against bytes worked out by hand, against what
autograd saves and against each other; the CUDA-autocast imitation against fake 'cuda'."""

import re
from contextlib import nullcontext

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import finetune_base_model as fb
import generate_preview as gp
from planning import memory
from planning.imitation import (CUDA_AUTOCAST_POLICY, IMITATED_DEVICE, cpu_autocast_overrides,
                                cuda_autocast_rules_on_cpu, cuda_autocast_without_gpu, fake_tensors,
                                imitated_autocast, registered_autocast_ops)
from planning.measure import build_tables, materialise, measure_training, meta_module, training_inputs
from planning.memory import MemoryTracker, allocated_bytes
from planning.plan import (TokenLine, check_fit, fit_card, gib, largest_fitting, plan_preview, plan_training,
                           with_margin)
from training.flow_matching import flow_matching_step, prepare_trainable
from training.recipe import TrainingRecipe, lora_config
from wan.clip import CLIPVisionConfig
from wan.config import tiny_config
from wan.lora import add_lora
from wan.model import STRATEGIES, WanModel, random_inputs, trainable_parameter_names
from wan.vae import VAEConfig

DEVICE = IMITATED_DEVICE


def settings(**overrides) -> dict:
    s = dict(fb.SETTINGS.defaults)
    s.update(LAST_LAYERS=1, VIDEO_HEIGHT=32, VIDEO_WIDTH=64, SEQUENCE_LENGTH=9, LORA_RANK=4)
    s.update(overrides)
    return s


def tiny(keyboard_dim: int = len(fb.KEYBOARD_KEYS)):
    return tiny_config(keyboard_dim=keyboard_dim)


# ----------------------------------------------------------------------------- the tracker

def test_allocations_round_to_the_caching_allocators_blocks_and_views_cost_nothing():
    assert [allocated_bytes(n) for n in (0, 1, 512, 513, 4096)] == [0, 512, 512, 1024, 4096]
    with fake_tensors(top_mode=MemoryTracker(DEVICE)) as tracker:
        x = torch.empty(1000)  # 4000 bytes -> 4096
        view = x[10:].view(-1, 2)
        assert tracker.current == 4096
        host = torch.empty(1000, device="meta")  # another device: not counted
        assert tracker.current == 4096
        del x
        assert tracker.current == 4096  # the view keeps the storage
        del view, host
        assert tracker.current == 0 and tracker.peak == 4096


def test_data_dependent_reads_are_answered_with_zero_and_constants_keep_their_value():
    with fake_tensors() as mode:
        assert torch.randn(3).sum().item() == 0.0
        assert not bool(torch.randn(3).max() > 5)
        assert torch.tensor(2.5).item() == 2.5
        assert mode.answered == 2


def test_linear_with_fused_adamw_holds_the_bytes_worked_out_by_hand():
    layer = meta_module(lambda: torch.nn.Linear(256, 128))
    with fake_tensors(top_mode=MemoryTracker(DEVICE)) as tracker:
        layer = materialise(layer, DEVICE, torch.float32)
        optimizer = torch.optim.AdamW(layer.parameters(), fused=True)
        tracker.track(list(layer.parameters()), memory.WEIGHTS)
        x = torch.empty(64, 256)
        tracker.track(x, memory.INPUTS)
        tracker.reset_peak()
        with tracker.phase(memory.ACTIVATIONS):
            layer(x).sum().backward()
        weights = 256 * 128 * 4 + 128 * 4
        # forward: out [64, 128] then the loss; backward: out is gone, the loss, its seed
        # (one 512-byte block each), then the weight and bias gradients, made in place
        assert tracker.peak == weights + 64 * 256 * 4 + max(64 * 128 * 4 + 512, 512 + 512 + weights)
        assert tracker.peak_op == "aten.sum.dim_IntList (backward)"  # the bias gradient comes last
        tracker.track([p.grad for p in layer.parameters()], memory.GRADIENTS)
        tracker.reset_peak()
        with tracker.phase(memory.OPTIMIZER_STEP):
            optimizer.step()
        tracker.track([t for state in optimizer.state.values() for t in state.values()], memory.OPTIMIZER_STATE)
        # exp_avg and exp_avg_sq per parameter, and a float32 step count each (one block)
        assert tracker.by_label[memory.OPTIMIZER_STATE] == 2 * weights + 2 * 512
        assert tracker.by_label[memory.GRADIENTS] == weights and tracker.by_label[memory.WEIGHTS] == weights
        assert tracker.by_label[memory.OPTIMIZER_STEP] == 0  # the fused kernel works in place


def reached_parameters(config, strategy: str) -> set[str]:
    """Names of the trained parameters a real backward gives a gradient (CPU, real tensors)."""
    torch.manual_seed(0)
    model = WanModel(config)
    trainable = prepare_trainable(model, strategy, 1, lora_config(settings(TRAINING_STRATEGY=strategy)))
    inputs = random_inputs(config, 1, 2, 4, 8)
    model(**inputs).sum().backward()
    return {name for name, p in trainable.items() if p.grad is not None}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_weights_gradients_and_optimizer_state_are_bytes_times_counts(strategy):
    config = tiny()
    step, _ = measure_training(config, settings(TRAINING_STRATEGY=strategy, GRAD_ACCUM_STEPS=2, EMA_DECAY=0.9),
                               2, 4, 8)
    model = meta_module(lambda: WanModel(config))
    if strategy == "lora":
        add_lora(model, lora_config(settings(TRAINING_STRATEGY=strategy)))
    trained = set(trainable_parameter_names(model, strategy, 1))
    reached = reached_parameters(config, strategy)
    assert reached < trained  # the action modules' norm weights get no gradient
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    weights = sum(allocated_bytes(n * (4 if name in trained else 2)) for name, n in sizes.items())
    gradients = sum(allocated_bytes(sizes[name] * 4) for name in reached)
    # AdamW: two moments and a step count per parameter that has a gradient; EMA: a float32
    # copy of every trained parameter
    optimizer = sum(2 * allocated_bytes(sizes[name] * 4) + 512 for name in reached)
    ema = sum(allocated_bytes(sizes[name] * 4) for name in trained)
    assert step.breakdown[memory.WEIGHTS] == weights
    assert step.breakdown[memory.GRADIENTS] == gradients
    assert step.breakdown[memory.OPTIMIZER_STATE] == optimizer + ema
    assert step.trainable_parameters == sum(sizes[name] for name in trained)


def test_another_optimizer_plugs_in_through_the_recipe():
    class PlainSGD(TrainingRecipe):  # no state between steps, unlike AdamW's two moments
        def make_optimizer(self, trainable, settings, device, host, imitating_cuda=False):
            return torch.optim.SGD(list(trainable.values()), lr=settings["LEARNING_RATE"])

    s = settings(TRAINING_STRATEGY="full", GRAD_ACCUM_STEPS=1)
    adamw, _ = measure_training(tiny(), s, 2, 4, 8)
    sgd, _ = measure_training(tiny(), s, 2, 4, 8, recipe=PlainSGD())
    assert adamw.breakdown[memory.OPTIMIZER_STATE] > 0 and sgd.breakdown.get(memory.OPTIMIZER_STATE, 0) == 0
    assert sgd.breakdown[memory.WEIGHTS] == adamw.breakdown[memory.WEIGHTS]


def test_the_memory_savers_are_planned_through_their_own_code():
    """8-bit AdamW's quantised moments, the step in the backward (no gradient kept; its measuring
    pass keeps the graph, not the gradients) and the offloaded optimizer, on the demo's width
    (where torchao quantises most matrices), against plain AdamW."""
    pytest.importorskip("torchao", reason="OPTIMIZER=adamw_8bit needs torchao (requirements.txt)")
    config = tiny_config(keyboard_dim=len(fb.KEYBOARD_KEYS), dim=64, num_layers=3, ffn_dim=128)
    s = settings(TRAINING_STRATEGY="full", GRAD_ACCUM_STEPS=1)
    plans = {name: measure_training(config, dict(s, **savers), 2, 4, 8)[0] for name, savers in (
        ("plain", {}), ("8-bit", {"OPTIMIZER": "adamw_8bit"}), ("in backward", {"OPTIMIZER_IN_BACKWARD": True}),
        ("offloaded", {"OFFLOAD_OPTIMIZER": True}))}
    state = {name: plan.breakdown.get(memory.OPTIMIZER_STATE, 0) for name, plan in plans.items()}
    assert 0.2 < state["8-bit"] / state["plain"] < 0.5  # most numbers 2 bytes instead of 8
    assert state["offloaded"] < 0.05 * state["plain"]  # the step counts of 512 bytes (the imitation counts host scalars)
    assert state["in backward"] == state["plain"]
    assert plans["in backward"].breakdown.get(memory.GRADIENTS, 0) == 0 < plans["plain"].breakdown[memory.GRADIENTS]
    assert plans["in backward"].peak < plans["plain"].peak


@pytest.mark.parametrize("strategy", ["action_only", "full"])
def test_activations_are_what_autograd_saves_for_the_backward(strategy):
    config = tiny()
    model = meta_module(lambda: WanModel(config))
    with fake_tensors(top_mode=MemoryTracker(DEVICE)) as tracker:
        model = materialise(model, DEVICE, torch.bfloat16)
        prepare_trainable(model, strategy, 1)
        inputs, sigma, noise = training_inputs(config, 2, 3, 4, 8, DEVICE)
        build_tables(config, 3, 4, 8, DEVICE)
        tracker.track(list(model.parameters()), memory.WEIGHTS)
        saved = {}

        def pack(t):
            saved[id(t.untyped_storage())] = t
            return t

        with tracker.phase(memory.ACTIVATIONS), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses = flow_matching_step(model, inputs, sigma, noise, imitated_autocast(True))
        made = [t for t in saved.values() if tracker.label_of(t) in (memory.ACTIVATIONS, memory.WEIGHT_COPIES)]
        expected = sum(allocated_bytes(t.untyped_storage().nbytes()) for t in made) + allocated_bytes(losses.nbytes)
        assert tracker.by_label[memory.ACTIVATIONS] + tracker.by_label[memory.WEIGHT_COPIES] == expected
        assert tracker.by_label[memory.WEIGHT_COPIES] > 0  # the bf16 casts of the float32 masters, saved


def test_the_peak_grows_linearly_with_the_tokens_of_a_micro_batch():
    config = tiny()
    for strategy, checkpointing in (("action_only", True), ("full", False)):
        s = settings(TRAINING_STRATEGY=strategy, GRADIENT_CHECKPOINTING=checkpointing)
        steps = [measure_training(config, s, frames, 16, 16)[0] for frames in (4, 8, 16)]
        first, middle, last = steps
        between = first.peak + (last.peak - first.peak) * (middle.tokens - first.tokens) / (last.tokens - first.tokens)
        assert abs(middle.peak - between) < 0.001 * middle.peak
        line = TokenLine(last)
        assert line.peak(last.tokens) == last.peak
        assert line.fixed == sum(last.breakdown.get(label, 0) for label in (
            memory.WEIGHTS, memory.OPTIMIZER_STATE, memory.GRADIENTS, memory.WEIGHT_COPIES))


# ----------------------------------------------------------------------------- the CUDA imitation

class OpTrace(TorchDispatchMode):
    """Every op below autograd with its tensors' dtypes and shapes; device moves that keep the
    dtype are left out (the imitation has a single device, so they are no-ops there)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.prim.device.default:
            return out
        inputs = [(t.dtype, tuple(t.shape)) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [(t.dtype, tuple(t.shape)) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not (func is torch.ops.aten._to_copy.default and inputs[0][0] == outputs[0][0]):
            self.ops.append((str(func), inputs, outputs))
        return out


def forward_trace(device: str, strategy: str, checkpointing: bool) -> list:
    config = tiny()
    model = meta_module(lambda: WanModel(config))
    imitation = device == "cpu"
    with (nullcontext() if imitation else cuda_autocast_without_gpu()), fake_tensors(imitate_cuda=imitation):
        model = materialise(model, torch.device(device), torch.bfloat16)
        prepare_trainable(model, strategy, 1)
        model.set_gradient_checkpointing(checkpointing)
        inputs = {k: v.to(device) if v is not None else None for k, v in random_inputs(config, 2, 3, 4, 6).items()}
        autocast = imitated_autocast(True) if imitation else torch.autocast("cuda", dtype=torch.bfloat16)
        trace = OpTrace()
        # the math attention on both: a fake 'cuda' run can take no other, the imitation
        # takes the CPU's flash kernel otherwise (what a GPU's saves; checked below)
        with sdpa_kernel(SDPBackend.MATH), autocast, trace:
            model(**inputs)
    return trace.ops


@pytest.mark.parametrize("strategy, checkpointing", [("action_only", False), ("full", True)])
def test_the_imitation_runs_the_ops_and_dtypes_of_a_fake_cuda_forward(strategy, checkpointing):
    cuda, imitation = forward_trace("cuda", strategy, checkpointing), forward_trace("cpu", strategy, checkpointing)
    assert any(op == "aten.native_layer_norm.default" and inputs[0][0] == torch.float32
               for op, inputs, _ in cuda)  # CUDA runs layer_norm in float32, the CPU's list does not
    assert len(cuda) == len(imitation)
    for index, (expected, got) in enumerate(zip(cuda, imitation)):
        assert got == expected, f"op {index}"


def test_without_the_rules_the_cpu_autocast_differs_and_the_rules_are_removed_after():
    x, weight = torch.randn(4, 8), torch.ones(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native = torch.nn.functional.layer_norm(x.bfloat16(), (8,), weight.bfloat16()).dtype
        with cuda_autocast_rules_on_cpu():
            ruled = torch.nn.functional.layer_norm(x.bfloat16(), (8,), weight.bfloat16()).dtype
            summed = x.bfloat16().sum().dtype
        after = torch.nn.functional.layer_norm(x.bfloat16(), (8,), weight.bfloat16()).dtype
    assert (native, ruled, summed, after) == (torch.bfloat16, torch.float32, torch.float32, torch.bfloat16)


def test_every_op_cuda_autocasts_has_a_policy_here():
    cuda_ops = registered_autocast_ops("AutocastCUDA")
    assert cuda_ops and cuda_ops <= set(CUDA_AUTOCAST_POLICY)
    overrides = cpu_autocast_overrides()
    assert overrides["layer_norm"] == "fp32" and overrides["cat"] == "passthrough"
    assert "linear" not in overrides  # lower precision on both: the native kernel and its weight cache stay


def test_the_imitation_takes_the_flash_path_with_no_score_matrix():
    config = tiny()
    seen = set()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func))
            return func(*args, **(kwargs or {}))

    model = meta_module(lambda: WanModel(config))
    with fake_tensors() as _:
        model = materialise(model, DEVICE, torch.bfloat16)
        inputs = random_inputs(config, 1, 3, 4, 6)
        with imitated_autocast(True), Ops():
            model(**inputs)
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in seen
    assert "aten._safe_softmax.default" not in seen and "aten.bmm.default" not in seen


def test_autocast_without_its_weight_cache_casts_no_more_often():
    config = tiny()
    counts = {}
    for cache in (True, False):
        model = meta_module(lambda: WanModel(config))
        with fake_tensors(top_mode=MemoryTracker(DEVICE)) as tracker:
            model = materialise(model, DEVICE, torch.bfloat16)
            prepare_trainable(model, "full", 1)
            tracker.track(list(model.parameters()), memory.WEIGHTS)
            casts = []

            class Casts(TorchDispatchMode):
                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    if func is torch.ops.aten._to_copy.default and tracker.label_of(args[0]) == memory.WEIGHTS:
                        casts.append(args[0].shape)
                    return func(*args, **(kwargs or {}))

            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache), Casts(), torch.no_grad():
                model(**random_inputs(config, 1, 3, 4, 6))
            counts[cache] = len(casts)
    assert counts[True] == counts[False] > 0


# ----------------------------------------------------------------------------- the plans

TINY_ENCODERS = (VAEConfig.tiny(), CLIPVisionConfig.tiny())


def _card_between_5_and_6_latent_frames(config, s) -> float:
    """A GPU_MEMORY_GB (GiB) where s's longest clip at batch 1 is 17 frames (5 latent frames)."""
    at_5, at_6 = (measure_training(config, dict(s, BATCH_SIZE=1), frames, 4, 8)[0].peak for frames in (5, 6))
    return gib(with_margin((at_5 + at_6) / 2))


def test_the_training_plan_prints_one_peak_line_and_a_fit_for_every_strategy():
    config = tiny()
    card = _card_between_5_and_6_latent_frames(config, settings())
    plan = plan_training(settings(GPU_MEMORY_GB=card, NUM_CLIPS=10), config=config, encoders=TINY_ENCODERS)
    text = plan.format()
    peaks = re.findall(r"^predicted peak GPU memory: ([0-9.]+) GiB$", text, flags=re.M)
    assert peaks == [f"{plan.step.peak / 2**30:.2f}"]
    assert sum(1 for line in text.splitlines() if "predicted peak GPU memory" in line) == 1
    assert len(plan.fits) == 2 * len(STRATEGIES)
    for name in ("weights", "optimizer state", "gradients", "activations", "backward temporaries", "not counted",
                 "Latent-cache build", "H100 SXM", "RTX 4090", "checked: the longest clip at batch 1"):
        assert name in text
    assert plan.step_flops == plan.step.flops * fb.GRAD_ACCUM_STEPS > 0
    assert plan.cache_build.peak > 0 and plan.training_preview.peak > plan.step.breakdown[memory.WEIGHTS]
    # GiB where it compares GiB; your settings' longest clip and largest batch measured there
    assert f"On a {card:g} GiB card" in text and "GB card" not in text and "24GiB" in text
    mine = next(f for f in plan.fits if f.line.measured is plan.step)
    assert mine.checked and not any(f.checked for f in plan.fits if f is not mine)
    longest, largest = plan.checks
    assert (mine.longest_frames, mine.largest_batch) == (longest.value, largest.value) == (17, 1)
    assert re.search(r"checked: the longest clip at batch 1, 17 frames: measured [0-9.]+ GiB", text)
    beyond = measure_training(config, dict(settings(), BATCH_SIZE=1), 6, 4, 8)[0].peak
    assert with_margin(longest.peak) <= card * 2**30 < with_margin(beyond)
    # the same answer from the line at BATCH_SIZE 2 (the line's own guess differs)
    at_2 = settings(GPU_MEMORY_GB=card, BATCH_SIZE=2)
    measure = lambda at, frames, h, w: measure_training(config, at, frames, h, w)[0]  # noqa: E731
    checked, _ = check_fit(fit_card(TokenLine(measure(at_2, 3, 4, 8)), at_2, 8, 3), measure, at_2, (3, 4, 8), 8)
    assert (checked.longest_frames, checked.largest_batch) == (17, 1)


def test_bad_settings_are_named_not_traced():
    with pytest.raises(ValueError, match="SEQUENCE_LENGTH has 10 frames"):
        plan_training(settings(SEQUENCE_LENGTH=10), config=tiny(), search=False)
    with pytest.raises(ValueError, match="GPU_MEMORY_GB='big'"):
        plan_training(settings(GPU_MEMORY_GB="big"), config=tiny(), search=False)


def test_the_preview_plan_holds_the_model_and_both_encoders():
    encoders = TINY_ENCODERS
    config = tiny_config(keyboard_dim=4, clip_dim=encoders[1].width)
    plan = plan_preview({**gp.SETTINGS.defaults, "WINDOW_FRAMES": 9, "NUM_FRAMES": 17, "VIDEO_HEIGHT": 32,
                         "VIDEO_WIDTH": 64, "NUM_STEPS": 3, "KEYBOARD_KEYS": ("W", "S", "A", "D")}, config=config,
                        encoders=encoders)
    text = plan.format()
    assert len(re.findall(r"^predicted peak GPU memory: [0-9.]+ GiB$", text, flags=re.M)) == 1
    assert set(plan.window.flops_by_part) == {"conditioning", "sampling step", "decode"}
    assert "2 window(s)" in text


# ----------------------------------------------------------------------------- checked answers

@pytest.mark.parametrize("guess", [0, 1, 7, 9, 10, 30, 64])
def test_the_largest_fitting_value_is_found_from_any_guess_and_measured_with_the_value_above(guess):
    # a peak that grows unevenly (not on any line), capacity between x = 9 and x = 10
    peak_at = lambda x: 1000 * x + 30 * x * x  # noqa: E731
    calls = []
    capacity = with_margin((peak_at(9) + peak_at(10)) / 2)
    value, peak, count = largest_fitting(guess, 64, lambda x: calls.append(x) or peak_at(x), capacity, 1000.0)
    assert (value, peak) == (9, peak_at(9)) and count == len(calls) <= 6
    assert {9, 10} <= set(calls)
    assert largest_fitting(guess, 64, peak_at, with_margin(peak_at(1)) - 1, 1000.0)[:2] == (0, 0)  # none fits
    assert largest_fitting(guess, 64, peak_at, with_margin(peak_at(64)) + 1, 1000.0)[0] == 64  # the cap
