"""``Denoiser.features`` against the PyTorch modules' intermediate outputs (fp32, <= 1e-4 relative).

For each family -- DiT (diffusers ``DiTTransformer2DModel``), MMDiT (``SD3Transformer2DModel``),
``UNet2DConditionModel`` and ``UNet2DModel`` -- a tiny diffusers model keeping every block type
(the builders of the family's own parity tests), converted as a checkpoint is, then:

* every block ``den.features(z, t, cond)`` returns equals the output of the matching PyTorch
  block read with a forward hook: transformer blocks' image tokens (B, T, D); each down block's,
  the mid block's and each up block's output map (NHWC here, NCHW there);
* ``blocks=[...]`` returns exactly the blocks asked for;
* the gradient with respect to z of a scalar of one tapped feature equals PyTorch autograd's.

The Denoiser gives the network its schedule's time (``model_time``): integer timesteps for the
discrete schedules, 1000 t for rectified flow, so the PyTorch side gets those values.
"""

import dataclasses
from typing import Callable

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import test_dit
import test_mmdit
import test_unet2d
import test_unet_cond
import torch

from jdistill.convert import dit as convert_dit
from jdistill.convert import mmdit as convert_mmdit
from jdistill.convert import unet_cond as convert_unet_cond
from jdistill.convert.unet2d import load_unet2d_params
from jdistill.denoiser import Denoiser
from jdistill.diffusion import schedules
from jdistill.errors import InvalidArgument
from jdistill.models import registry
from jdistill.models.unet2d import UNet2DModel, config_from_diffusers
from jdistill.testing import assert_close, nchw, nhwc

TOL = 1e-4
DISCRETE = schedules.DiscreteVP.from_betas("linear", 1000, 1e-4, 0.02)


@dataclasses.dataclass
class Case:
    den: Denoiser
    z: np.ndarray  # NHWC
    t: np.ndarray  # in the Denoiser's schedule units
    cond: dict  # the Flax module's condition
    forward: Callable  # NCHW torch tensor -> runs the PyTorch model
    taps: dict  # block name -> (PyTorch submodule, its output -> the tapped tensor)
    grad_tap: str  # the block whose scalar is differentiated


def unet_taps(model):
    """diffusers' down blocks return (hidden_states, skip states); mid and up blocks a tensor."""
    taps = {f"down_{i}": (b, lambda out: out[0]) for i, b in enumerate(model.down_blocks)}
    if model.mid_block is not None:
        taps["mid"] = (model.mid_block, lambda out: out)
    taps.update({f"up_{i}": (b, lambda out: out) for i, b in enumerate(model.up_blocks)})
    return taps


def dit_case(tmp_path):
    model = test_dit.tiny_diffusers(**test_dit.DIFFUSERS_CASES["p2-sigma"])  # learned sigma: 8 channels out
    model.save_pretrained(tmp_path, safe_serialization=True)
    module = convert_dit.config_from_diffusers(tmp_path)
    params = convert_dit.load_dit_params(
        safetensors.numpy.load_file(tmp_path / "diffusion_pytorch_model.safetensors"), module)
    x, t, y = test_dit.inputs(4)
    forward = lambda xt: model(xt, torch.from_numpy(t), torch.from_numpy(y))  # noqa: E731
    taps = {f"block_{i}": (b, lambda out: out) for i, b in enumerate(model.transformer_blocks)}
    return Case(Denoiser.for_module(module, DISCRETE, "eps", params), x, t, {"class_labels": y.astype(np.int32)},
                forward, taps, "block_1")


def mmdit_case(tmp_path):
    """SD3.5-like: dual-attention blocks, qk RMS norm, the context_pre_only last block."""
    model = test_mmdit.randomise(diffusers.SD3Transformer2DModel(**test_mmdit.TINY, **test_mmdit.CASES["sd35"]).eval())
    module = convert_mmdit.module_from_config(dict(model.config))
    params = convert_mmdit.load_params(model.state_dict(), module)
    x, t, ehs, pooled = test_mmdit.inputs((6, 10))
    t_flow = (t / 1000.0).astype(np.float32)
    model_t = np.float32(1000.0) * t_flow  # what RectifiedFlow.model_time hands the network

    def forward(xt):
        return model(hidden_states=xt, encoder_hidden_states=torch.from_numpy(ehs),
                     pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(model_t))

    taps = {f"block_{i}": (b, lambda out: out[1]) for i, b in enumerate(model.transformer_blocks)}
    den = Denoiser.for_module(module, schedules.RectifiedFlow(), "flow", params)
    return Case(den, x, t_flow, {"encoder_hidden_states": ehs, "pooled_projections": pooled}, forward, taps,
                "block_1")


def unet_cond_case(tmp_path):
    """SDXL-like: plain and cross-attention down blocks, cross-attention mid, both up block
    types, transformer depths (1, 2), the "text_time" embedding of pooled text and size ids."""
    cfg, shape, extras = test_unet_cond.CASES["sdxl"]
    model = test_unet_cond.randomize_(diffusers.UNet2DConditionModel(**cfg), seed=0).eval()
    config, state = test_unet_cond.checkpoint(model, tmp_path)
    module = convert_unet_cond.module_from_config(config)
    params = convert_unet_cond.load_params(state, module)
    inputs = test_unet_cond.make_inputs(module, shape, extras, np.random.default_rng(0))
    cond = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}

    def forward(xt):
        added = {k: torch.from_numpy(v) for k, v in cond["added_cond_kwargs"].items()}
        return model(xt, torch.from_numpy(inputs["timestep"]),
                     encoder_hidden_states=torch.from_numpy(cond["encoder_hidden_states"]), added_cond_kwargs=added)

    return Case(Denoiser.for_module(module, DISCRETE, "eps", params), inputs["sample"], inputs["timestep"], cond,
                forward, unet_taps(model), "mid")


def unet2d_case(tmp_path):
    """Plain and attention down / up blocks, attention mid block, scale_shift, a class table."""
    cfg, shape, t, labels = test_unet2d.CASES["attn_scaleshift_classes"]
    model = test_unet2d.randomize_(diffusers.UNet2DModel(**cfg), seed=0).eval()
    config, state = test_unet_cond.checkpoint(model, tmp_path)
    module = UNet2DModel(**config_from_diffusers(config))
    params = load_unet2d_params(state, module)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    forward = lambda xt: model(xt, torch.from_numpy(t), class_labels=torch.from_numpy(labels))  # noqa: E731
    return Case(Denoiser.for_module(module, DISCRETE, "eps", params), x, t, {"class_labels": labels}, forward,
                unet_taps(model), "up_0")


CASES = {"dit": dit_case, "mmdit": mmdit_case, "unet_cond": unet_cond_case, "unet2d": unet2d_case}


def torch_features(case: Case, grad: bool):
    """({block: NHWC / token features}, d sum(f cos f) / dz of the grad tap, NHWC, or None)."""
    xt = torch.from_numpy(nchw(case.z)).requires_grad_(grad)
    feats = {}

    def keep(name, pick):
        return lambda mod, args, out: feats.__setitem__(name, pick(out))

    hooks = [m.register_forward_hook(keep(name, pick)) for name, (m, pick) in case.taps.items()]
    try:
        with torch.set_grad_enabled(grad):
            case.forward(xt)
    finally:
        for h in hooks:
            h.remove()
    dz = None
    if grad:
        f = feats[case.grad_tap]
        (f * torch.cos(f)).sum().backward()
        dz = nhwc(xt.grad.numpy())
    as_numpy = {k: v.detach().numpy() for k, v in feats.items()}
    return {k: v if v.ndim == 3 else nhwc(v) for k, v in as_numpy.items()}, dz


# DiT runs by default (about 12 s on 2 cores); the UNets and MMDiT take 30-40 s each to compile
# forward and gradient, beyond the default suite's budget, so they run with `-m slow`.
FAST = ("dit",)


@pytest.mark.parametrize("family", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in CASES])
def test_features_and_their_gradients_match_torch(family, tmp_path):
    case = CASES[family](tmp_path)
    expected, expected_dz = torch_features(case, grad=True)
    den, t, cond = case.den, jnp.asarray(case.t), case.cond

    def objective(z):
        tapped = den.features(z, t, cond, blocks=[case.grad_tap])
        assert list(tapped) == [case.grad_tap]
        f = tapped[case.grad_tap]
        return jnp.sum(f * jnp.cos(f))  # weights every position differently

    # one program: every sown block, and the gradient through the tapped one
    feats, dz = jax.jit(lambda z: (den.features(z, t, cond), jax.grad(objective)(z)))(jnp.asarray(case.z))
    assert sorted(feats) == sorted(expected)
    for name, want in expected.items():
        assert_close(feats[name], want, TOL, f"{family} {name}")
    assert np.abs(expected_dz).max() > 0
    assert_close(dz, expected_dz, TOL, f"{family} d {case.grad_tap} / dz")


def test_asking_for_a_block_the_network_does_not_sow_is_named():
    """Traced only (abstract params): the error names the block and what the network sows."""
    module = registry.build_model(dict(name="dit", input_size=8, patch_size=4, in_channels=1, hidden_size=8, depth=2,
                                       num_heads=2, num_classes=10))
    args, kwargs = registry.example_inputs(module)
    params = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)["params"]
    den = Denoiser.for_module(module, DISCRETE, "eps")
    z, cond = jnp.zeros((2, 8, 8, 1)), {"class_labels": jnp.zeros((2,), jnp.int32)}

    def features(p, blocks):
        return den.replace(params=p).features(z, jnp.ones((2,)), cond, blocks=blocks)

    # blocks by index or name; a pytree dict comes back key-sorted, so compare the sets
    assert set(jax.eval_shape(lambda p: features(p, [1]), params)) == {"block_1"}
    assert set(jax.eval_shape(lambda p: features(p, [1, "block_0"]), params)) == {"block_0", "block_1"}
    with pytest.raises(InvalidArgument, match=r"DiT has no block 'mid'; it sows \['block_0', 'block_1'\]"):
        jax.eval_shape(lambda p: features(p, ["mid"]), params)
