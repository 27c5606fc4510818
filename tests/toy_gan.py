"""A 2-D GAN on the train engine: two parts with their own optimizers, D every step, G every k-th.

Real points come from a fixed Gaussian; the generator is an affine map of 2-D noise, the
discriminator a small MLP; the losses are the non-saturating ones. Imported by
tests/test_train_engine.py, and run as a script (``python tests/toy_gan.py WORKDIR STEPS``)
to train through the real stage runner, checkpoints and all, so a test can SIGKILL it.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdistill.train import engine as engine_lib

REAL_MEAN = np.array([2.0, -1.0], np.float32)
REAL_SCALE = np.array([[0.5, 0.2], [0.0, 0.3]], np.float32)
BATCH = 32


def init_params(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    g = {"w": jnp.eye(2) + 0.1 * jax.random.normal(k[0], (2, 2)), "b": jnp.zeros((2,))}
    d = {"w1": 0.5 * jax.random.normal(k[1], (2, 16)), "b1": jnp.zeros((16,)),
         "w2": 0.5 * jax.random.normal(k[2], (16, 1)), "b2": jnp.zeros((1,))}
    return {"generator": g, "discriminator": d}


def generate(g, z):
    return z @ g["w"] + g["b"]


def discriminate(d, x):
    return (jnp.tanh(x @ d["w1"] + d["b1"]) @ d["w2"] + d["b2"])[:, 0]


def d_loss(d, g, batch, rng):
    fake = jax.lax.stop_gradient(generate(g, jax.random.normal(rng, batch["real"].shape)))
    loss = jnp.mean(jax.nn.softplus(-discriminate(d, batch["real"]))) + jnp.mean(jax.nn.softplus(discriminate(d, fake)))
    return loss, {}


def g_loss(g, d, batch, rng):
    fake = generate(g, jax.random.normal(rng, batch["real"].shape))
    return jnp.mean(jax.nn.softplus(-discriminate(jax.lax.stop_gradient(d), fake))), {}


def engine(g_every: int = 2) -> engine_lib.Engine:
    parts = {"discriminator": engine_lib.Part(optax.adam(1e-2)), "generator": engine_lib.Part(optax.adam(5e-3))}
    updates = [engine_lib.Update("discriminator", d_loss, lambda state, frozen: state.params("generator")),
               engine_lib.Update("generator", g_loss, lambda state, frozen: state.params("discriminator"),
                                 every=g_every)]
    return engine_lib.Engine(parts, updates, {"ema": engine_lib.Average("generator", 0.9)})


def sample_batch(step: int) -> dict:
    z = np.random.default_rng([step, 7]).standard_normal((BATCH, 2)).astype(np.float32)
    return {"real": jnp.asarray(z @ REAL_SCALE + REAL_MEAN)}


def main(workdir: str, steps: int):
    import ml_collections

    from jdistill.recipes import stages

    cfg = ml_collections.ConfigDict(dict(train=dict(ckpt_every=10, keep=10, log_every=5, sample_every=0),
                                         mesh=dict(data=-1, fsdp=1)))
    stage = stages.Stage("", steps, engine(2), init_params, 0, {"recipe": "toy_gan"}, part="generator")

    def batches(start):
        return (jax.device_get(sample_batch(k)) for k in range(start, steps))

    stages.run(stage, workdir, cfg, batches, progress=False)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1], int(sys.argv[2]))
