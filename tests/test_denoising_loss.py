"""The teacher's denoising loss (objectives/denoising.py) against closed forms and diffusers.

* Every weighting for every target: the loss equals, computed by hand in float64 from the same
  network output, the weighted x-space error mean(w(SNR) ||x_hat - x||^2) (w = max(SNR, 1) or
  min(SNR, gamma)), and the constant weighting equals plain MSE on the target, which is the
  closed form c ||x_hat - x||^2 with c = SNR (eps), SNR + 1 (v), 1 (x0), 1 / s^2 (flow).
* min-SNR-gamma against diffusers' training scripts (``compute_snr`` and
  ``min(snr, gamma) / snr`` for eps, ``/ (snr + 1)`` for v).
* Logit-normal training times: logit(t) has mean m and std s; with SD3's shift the times follow
  the shifted closed-form CDF (a KS test that rejects a wrong shift).
* Condition dropout: the dropped share within binomial bounds, dropped rows exactly the null
  condition, kept rows untouched, every key of a row dropped together.
"""

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.training_utils import compute_snr
from scipy import special, stats

from jdistill.denoiser import Denoiser, NullClass
from jdistill.diffusion import schedules
from jdistill.objectives import denoising

GAMMA = 5.0
BATCH = 64
TOL = 1e-5


class SmallNet(nn.Module):
    """A small class-conditional conv net: the loss reads only the network's output, so the
    network need not be one of the registry's (a DiT compiles 10x slower on two cores)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, t, class_labels):
        emb = nn.Dense(8)(jnp.sin(jnp.asarray(t, jnp.float32)[:, None] / jnp.array([1.0, 10.0, 100.0, 1000.0])))
        emb = emb + nn.Embed(self.num_classes + 1, 8)(class_labels)
        h = nn.Conv(8, (3, 3))(x) * (1 + emb[:, None, None]) + emb[:, None, None]
        return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))


@pytest.fixture(scope="module")
def net():
    """The network, its params (scaled so the outputs are O(1)), a batch of 8x8x1 images."""
    module = SmallNet()
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (BATCH, 8, 8, 1)).astype(np.float32),
             "label": rng.integers(0, 10, BATCH).astype(np.int32)}
    params = jax.jit(module.init)(jax.random.key(0), batch["image"], np.zeros(BATCH), batch["label"])["params"]
    return module, jax.tree.map(lambda p: 2 * p, params), batch


# schedule kind -> (schedule, its (a, s) written out from diffusers' table or the definition,
# the network's time input written out)
DDPM = diffusers.DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
AB = DDPM.alphas_cumprod.numpy().astype(np.float64)


def by_hand(kind):
    """(schedule, times drawn as the loss draws them, (a, s) in float64, the network's time input)."""
    if kind == "discrete":
        return (schedules.DiscreteVP.from_betas("linear", 1000, 1e-4, 0.02),
                lambda k, n: jax.random.randint(k, (n,), 0, 1000),
                lambda t: (np.sqrt(AB[t]), np.sqrt(1 - AB[t])), lambda t: t)
    if kind == "cosine":  # logSNR(t) = -2 log tan(a t + b), clipped to [-20, 20]
        b = np.arctan(np.exp(-10.0))
        a = np.arctan(np.exp(10.0)) - b
        return (schedules.CosineVP(-20.0, 20.0),
                lambda k, n: jax.random.uniform(k, (n,), minval=1e-5, maxval=1 - 1e-5),
                lambda t: (np.cos(a * t + b), np.sin(a * t + b)), lambda t: 1000.0 * t)
    return (schedules.RectifiedFlow(),
            lambda k, n: jax.random.uniform(k, (n,), minval=1e-5, maxval=1 - 1e-5),
            lambda t: (1.0 - t, t), lambda t: 1000.0 * t)


def hand_terms(module, params, batch, rng, kind, prediction):
    """Per example: (network output, regression target, x-space error ||x_hat - x||^2, SNR, s, t),
    the target and x_hat written out for each prediction type (float64 where computed here)."""
    schedule, draw_t, alpha_sigma, model_time = by_hand(kind)
    x = batch["image"]
    k_t, k_eps, _ = jax.random.split(rng, 3)  # the loss's key use: times, noise, dropout
    t = np.asarray(draw_t(k_t, len(x)))
    t = t if t.dtype.kind == "i" else t.astype(np.float64)
    eps = np.asarray(jax.random.normal(k_eps, x.shape), np.float64)
    a, s = (np.asarray(v, np.float64).reshape(-1, 1, 1, 1) for v in alpha_sigma(t))
    x64 = x.astype(np.float64)
    z = a * x64 + s * eps
    out = np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(z, jnp.float32),
                                           jnp.asarray(model_time(t), jnp.float32), batch["label"]), np.float64)
    target = {"eps": eps, "v": a * eps - s * x64, "x0": x64, "flow": eps - x64}[prediction]
    x_hat = {"eps": (z - s * out) / a, "v": a * z - s * out, "x0": out, "flow": z - s * out}[prediction]
    x_err = np.mean((x_hat - x64) ** 2, axis=(1, 2, 3))
    snr = (a / s).reshape(-1) ** 2
    return out, target, x_err, snr, s.reshape(-1), t


CASES = [("discrete", "eps"), ("discrete", "v"), ("discrete", "x0"), ("cosine", "v"), ("flow", "flow")]


@pytest.mark.parametrize("kind,prediction", CASES, ids=[f"{k}-{p}" for k, p in CASES])
def test_weightings_are_the_weighted_x_space_error(net, kind, prediction):
    module, params, batch = net
    schedule = by_hand(kind)[0]
    den = Denoiser.for_module(module, schedule, prediction)
    rng = jax.random.key(7)
    out, target, x_err, snr, s, _ = hand_terms(module, params, batch, rng, kind, prediction)
    target_mse = np.mean((out - target) ** 2, axis=(1, 2, 3))
    # the closed form behind "constant": target MSE = c x-space MSE
    c = {"eps": snr, "v": snr + 1, "x0": np.ones_like(snr), "flow": 1 / s**2}[prediction]
    np.testing.assert_allclose(target_mse, c * x_err, rtol=1e-9)
    expected = {"constant": np.mean(target_mse), "truncated_snr": np.mean(np.maximum(snr, 1.0) * x_err),
                "min_snr": np.mean(np.minimum(snr, GAMMA) * x_err)}
    fns = [denoising.denoising_loss(den, weighting=w, min_snr_gamma=GAMMA) for w in expected]
    got = jax.jit(lambda p: [fn(p, None, batch, rng) for fn in fns])(params)  # one compile for all three
    for (weighting, want), (loss, metrics) in zip(expected.items(), got):
        np.testing.assert_allclose(float(loss), want, rtol=TOL, err_msg=f"{weighting} {prediction}")
        np.testing.assert_allclose(float(metrics["mse"]), np.mean(target_mse), rtol=TOL)
    # the three weightings really differ here (a wrong branch would not pass unnoticed)
    assert len({round(v, 6) for v in expected.values()}) == 3


@pytest.mark.parametrize("prediction,diffusers_type", [("eps", "epsilon"), ("v", "v_prediction")])
def test_min_snr_matches_diffusers_training_scripts(net, prediction, diffusers_type):
    """train_text_to_image.py's --snr_gamma branch, on the same network output and timesteps."""
    module, params, batch = net
    schedule = by_hand("discrete")[0]
    den = Denoiser.for_module(module, schedule, prediction)
    rng = jax.random.key(11)
    out, target, _, _, _, t = hand_terms(module, params, batch, rng, "discrete", prediction)
    scheduler = diffusers.DDPMScheduler.from_config({**DDPM.config, "prediction_type": diffusers_type})
    timesteps = torch.from_numpy(t.astype(np.int64))
    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, GAMMA * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / snr if diffusers_type == "epsilon" else weights / (snr + 1)
    mse = torch.nn.functional.mse_loss(torch.from_numpy(out).float(), torch.from_numpy(target).float(),
                                       reduction="none")
    want = (mse.mean(dim=list(range(1, mse.ndim))) * weights).mean().item()
    loss, _ = jax.jit(denoising.denoising_loss(den, weighting="min_snr", min_snr_gamma=GAMMA))(
        params, None, batch, rng)
    np.testing.assert_allclose(float(loss), want, rtol=TOL)
    assert np.any(t < 200) and np.any(t > 400)  # both sides of SNR = gamma are in the batch


N_TIMES = 20000


def shifted_cdf(y, m, s, shift):
    """P(t' <= y) for t' = S t / (1 + (S - 1) t), logit(t) ~ N(m, s^2): t = y / (S - (S - 1) y)."""
    t = y / (shift - (shift - 1.0) * y)
    return stats.norm.cdf((special.logit(t) - m) / s)


def test_logit_normal_times_have_the_configured_mean_and_std():
    m, s = 0.3, 0.8
    t = np.asarray(denoising.sample_times(jax.random.key(0), schedules.RectifiedFlow(), N_TIMES, "logit_normal",
                                          m, s), np.float64)
    logit = special.logit(t)
    se = s / np.sqrt(N_TIMES)
    assert abs(logit.mean() - m) < 4 * se
    assert abs(logit.std() - s) < 4 * s / np.sqrt(2 * N_TIMES)


def test_shifted_logit_normal_times_follow_the_closed_form():
    """SD3's shift 3 on logit-normal(0, 1) times: a KS test against the analytic CDF passes at
    the 1e-3 level, and the same test rejects shifts of 2.5 and 1 (so it can tell)."""
    m, s, shift = 0.0, 1.0, 3.0
    t = np.asarray(denoising.sample_times(jax.random.key(3), schedules.RectifiedFlow(shift=shift), N_TIMES,
                                          "logit_normal", m, s), np.float64)
    assert stats.kstest(t, lambda y: shifted_cdf(y, m, s, shift)).pvalue > 1e-3
    for wrong in (2.5, 1.0):
        assert stats.kstest(t, lambda y: shifted_cdf(y, m, s, wrong)).pvalue < 1e-6, wrong


def test_condition_dropout_drops_whole_rows_to_the_null_condition():
    n, p = 20000, 0.1
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n).astype(np.int32)
    text = rng.standard_normal((n, 3, 4)).astype(np.float32)
    null_text = np.full((1, 3, 4), -7.0, np.float32)

    def null_cond(cond):  # the null class and a fixed "empty prompt" embedding, as a text task has
        return {**NullClass(10)(cond), "text": jnp.broadcast_to(null_text, cond["text"].shape)}

    out = denoising.drop_condition(jax.random.key(5), {"class_labels": labels, "text": text}, null_cond, p)
    got_labels, got_text = np.asarray(out["class_labels"]), np.asarray(out["text"])
    dropped = got_labels == 10
    k = dropped.sum()
    assert abs(k - n * p) < 4 * np.sqrt(n * p * (1 - p)), k
    np.testing.assert_array_equal(got_text[dropped], np.broadcast_to(null_text, (k, 3, 4)))
    np.testing.assert_array_equal(got_labels[~dropped], labels[~dropped])
    np.testing.assert_array_equal(got_text[~dropped], text[~dropped])
    # probability 0 leaves the condition as it was
    same = denoising.drop_condition(jax.random.key(5), {"class_labels": labels, "text": text}, null_cond, 0.0)
    assert same["class_labels"] is labels
