"""Shared helpers of tests/test_play*.py: a tiny random stream, and a served player."""

import threading
import time
from contextlib import contextmanager

import torch

from model_helpers import tiny_causal_model
from test_vae import fully_random
from generation.streaming import StreamingGenerator
from play.controls import controls_for, page_controls
from play_world import controls_help
from play.player import Player
from play.server import PlayServer
from play.session import InputSession
from wan.conditioning import STREAM_COND_LATENT_FRAMES
from wan.model import random_inputs
from wan.shapes import VAE_SPACE_STRIDE
from wan.vae import StreamingDecoder, VAEConfig, WanVAE

LATENT = (2, 4)  # 16 x 32 pixels: the smallest picture the tiny VAE makes quickly
KEYS = ("W", "S", "A", "D")


def tiny_stream(seed: int = 0, latent=LATENT, **config) -> StreamingGenerator:
    """A tiny random student with a tiny random VAE, and random first-frame conditions long
    enough for a stream of any length."""
    model = tiny_causal_model(seed=seed, **{"local_attn_size": 6, **config}).eval().requires_grad_(False)
    torch.manual_seed(seed)
    vae = fully_random(WanVAE(VAEConfig.tiny())).eval()
    inputs = random_inputs(model.config, 1, STREAM_COND_LATENT_FRAMES, *latent, seed=seed)
    return StreamingGenerator(model, inputs["cond_concat"], inputs["visual_context"], StreamingDecoder(vae), seed=seed)


def wait_for(condition, what: str, timeout: float = 60.0, every: float = 0.05):
    """Poll condition() until it returns something true; fail naming `what` after timeout
    seconds (a bound on a hang, not a speed requirement)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@contextmanager
def served_player(generator: StreamingGenerator | None = None, keys=KEYS, mode: str = "universal",
                  host: str = "127.0.0.1", **player):
    """A Player on a tiny stream behind a PlayServer on a free port of host, both running."""
    generator = generator or tiny_stream()
    has_mouse = generator.model.config.action_config.enable_mouse
    controls = controls_for(mode, keys, has_mouse)
    session = InputSession(controls, mouse_sensitivity=0.01, mouse_limit=0.25, key_aliases={"UP": "W"})
    info = {"model": "tiny random student", "mode": mode, **page_controls(mode, controls, 0.25),
            "size": [VAE_SPACE_STRIDE * d for d in generator.latent_size], "help": controls_help(controls),
            "warning": None}
    server = PlayServer((host, 0), Player(generator, session, keys, **player), session, info)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    server.player.start()
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        server.player.stop()
