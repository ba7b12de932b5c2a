"""A streaming block ready for a GPU: the student's calls compiled whole (one graph from the
third block on, no graph break, the eager numbers), and no host-device synchronisation or
host copy inside a block (seen on fake 'cuda' tensors).

The compile tests use torch.compile's "aot_eager" backend: dynamo's graphs, guards and
recompilations are those of any backend, and AOTAutograd's functionalisation of the cache
writes (what inductor compiles from) runs for real; inductor's own code generation takes
over a minute per graph on two cores, so its numbers are measured by bench/bench_streaming.py
--compile (bench/RESULTS.md) and on a GPU by tests/test_cuda.py.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from model_helpers import tiny_causal_model
from sync_helpers import HostSyncs
from generation.errors import GenerationError
from generation.streaming import StreamingGenerator
from planning.imitation import cuda_autocast_without_gpu, fake_tensors
from planning.measure import materialise, meta_module
from wan.causal import CausalWanModel
from wan.conditioning import STREAM_COND_LATENT_FRAMES
from wan.config import tiny_config
from wan.device import autocast_for
from wan.model import random_inputs
from wan.vae import StreamingDecoder, VAEConfig, WanVAE

LATENT = (2, 4)
CUDA = torch.device("cuda")


def _actions(block: int):
    """One action per block, changing every block (keyboard [1, 4], mouse [1, 2])."""
    keyboard = torch.zeros(1, 4)
    keyboard[0, block % 4] = 1
    return keyboard, torch.tensor([[0.1 * (block % 3 - 1), 0.05]])


def test_the_compiled_stream_is_one_graph_from_the_third_block_and_computes_the_eager_numbers():
    # 20 blocks (60 latent frames) from 30 frames of conditions: the held conditions from
    # block 10 on change nothing either.
    model = tiny_causal_model(seed=1, local_attn_size=6).eval()
    inputs = random_inputs(model.config, 1, 30, *LATENT, seed=2)

    def stream(compile_mode, after_block=None):
        generator = StreamingGenerator(model, inputs["cond_concat"], inputs["visual_context"], seed=3,
                                       compile_mode=compile_mode, compile_backend="aot_eager")
        latents = []
        for block in range(20):
            latents.append(generator.step(*_actions(block)).latents)
            if block == 1 and after_block is not None:
                after_block.update(counters["stats"])
        return torch.cat(latents, dim=2)

    torch._dynamo.reset()
    counters.clear()
    after_two_blocks = {}
    compiled = stream("default", after_two_blocks)
    assert dict(counters["graph_break"]) == {}
    assert after_two_blocks["unique_graphs"] == 2  # the first block's shapes, then every later block's
    assert counters["stats"]["unique_graphs"] == 2 and counters["stats"]["calls_captured"] > 0
    assert not counters["recompiles"]
    eager = stream("off")
    assert (compiled - eager).abs().max().item() <= 1e-5


def test_a_compile_failure_and_a_wrong_mode_are_named():
    model = tiny_causal_model(seed=1, local_attn_size=4, num_layers=1).eval()
    inputs = random_inputs(model.config, 1, 3, *LATENT, seed=2)

    def no_compiler(graph, example_inputs):
        raise RuntimeError("no working C++ compiler")

    torch._dynamo.reset()
    generator = StreamingGenerator(model, inputs["cond_concat"], inputs["visual_context"], compile_mode="default",
                                   compile_backend=no_compiler)
    with pytest.raises(GenerationError, match="COMPILE=default: torch.compile could not compile .*COMPILE=off"):
        generator.step(*_actions(0))
    with pytest.raises(ValueError, match="COMPILE='fast': choose one of off, default, reduce-overhead"):
        StreamingGenerator(model, inputs["cond_concat"], inputs["visual_context"], compile_mode="fast")


@pytest.fixture
def fake_cuda_syncs(monkeypatch):
    """Fake 'cuda' tensors under HostSyncs. There is no CUDA generator without a GPU: the
    stream's noise generator is a CPU one here (a CUDA generator's draws do not sync)."""
    cpu_generator = torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda device=None: cpu_generator())
    with cuda_autocast_without_gpu(), fake_tensors(imitate_cuda=False, top_mode=HostSyncs()) as mode:
        yield mode


def test_a_streaming_block_neither_syncs_nor_copies_from_the_host(fake_cuda_syncs):
    # As a GPU runs it: bf16 student, fp16 decoder, under autocast; the actions are already on the device
    config = tiny_config(local_attn_size=6, action_blocks=(0,))
    model = materialise(meta_module(lambda: CausalWanModel(config)), CUDA, torch.bfloat16).eval()
    vae = materialise(meta_module(lambda: WanVAE(VAEConfig.tiny())), CUDA, torch.float16).eval()
    cond_concat = torch.empty(1, 20, STREAM_COND_LATENT_FRAMES, *LATENT, device=CUDA)
    visual_context = torch.empty(1, 257, config.clip_dim, device=CUDA)
    generator = StreamingGenerator(model, cond_concat, visual_context, StreamingDecoder(vae))
    syncs = fake_cuda_syncs
    actions = [[a.to(CUDA) for a in _actions(block)] for block in range(3)]
    syncs.clear()
    for block, (keyboard, mouse) in enumerate(actions):
        with autocast_for(CUDA):
            made = generator.step(keyboard, mouse)
        assert syncs.syncs == [], block
        if block >= 2:  # the first blocks copy their window index in, once per stream (pinned, non-blocking)
            assert syncs.copies == [], block
        syncs.clear()
    assert made.video.device.type == "cuda" and made.video.shape[2] == 12


def test_the_host_syncs_mode_sees_what_a_gpu_waits_for(fake_cuda_syncs):
    x = torch.ones(3, device=CUDA)
    x.sum().item()
    assert len(fake_cuda_syncs.syncs) == 1 and "scalar read" in fake_cuda_syncs.syncs[0]
    fake_cuda_syncs.clear()
    x.cpu()
    torch.ones(3).to(CUDA)
    torch.ones(3).to(CUDA, non_blocking=True)
    assert fake_cuda_syncs.syncs == ["aten::_to_copy cuda -> cpu (blocking)", "aten::_to_copy cpu -> cuda (blocking)"]
    assert len(fake_cuda_syncs.copies) == 3
