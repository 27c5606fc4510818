"""Mixed precision, rematerialisation, scanned blocks and the CPU train-step fixes, on tiny
DiT, SD UNet and MMDiT models with random weights.

Tolerances (fp32 unless said):
* bf16 compute over fp32 params: loss within 2% and the gradient tree within 5% (global
  relative norm) of fp32; no matmul or convolution left in fp32;
* remat ("full", "dots") and ``scan_blocks``: loss and every gradient within 1e-6 of the plain
  model (relative to each tensor's scale, floored at 1e-2 of the largest gradient: key biases
  have gradient 0 in exact arithmetic);
* scanned params are the per-block params stacked, exactly, through the converters and export;
* the train step compiled for CPU keeps ``materialize_cotangent``'s barriers;
* ``dense`` computes through one 2-D product whatever the rank of its input.
"""

import diffusers
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import traverse_util

from jdistill.convert import dit as dit_convert
from jdistill.convert import export
from jdistill.convert import mmdit as mmdit_convert
from jdistill.convert import unet_cond as unet_convert
from jdistill.models import dit as dit_lib
from jdistill.models import layers
from jdistill.models import mmdit as mmdit_lib
from jdistill.testing import assert_close
from jdistill.train import engine as engine_lib
from jdistill.train import mesh as mesh_lib
from jdistill.train import optim

B = 2


def perturbed(params, seed=1, std=0.1):
    """Every leaf moved off its initialisation (adaLN-Zero and zero output layers would make
    most gradients vanish)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def dit():
    return dit_lib.DiT(input_size=8, in_channels=4, out_channels=8, hidden_size=32, depth=3, num_heads=2,
                       num_classes=10, **dit_lib.LAYOUTS["diffusers"])


def dit_original():
    return dit_lib.DiT(input_size=8, in_channels=4, out_channels=4, hidden_size=32, depth=3, num_heads=2,
                       num_classes=10)


def mmdit():
    # SD3.5-like: two dual-attention blocks, two plain ones, the context_pre_only last one
    return mmdit_lib.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, attention_head_dim=8,
                                           num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                           pooled_projection_dim=10, num_layers=5, out_channels=4,
                                           pos_embed_max_size=12, dual_attention_layers=(0, 1), qk_norm="rms_norm")


UNET_CONFIG = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=12,
                   attention_head_dim=2, sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def unet():
    return unet_convert.module_from_config(UNET_CONFIG)


def model_inputs(module):
    """(args, kwargs) of a batch of B random inputs for ``module.apply``."""
    ks = jax.random.split(jax.random.key(7), 4)
    t = jnp.array([3.0, 611.5])
    if isinstance(module, dit_lib.DiT):
        return (jax.random.normal(ks[0], (B, 8, 8, 4)), t), dict(class_labels=jnp.array([1, 10]))
    if isinstance(module, mmdit_lib.SD3Transformer2DModel):
        return ((jax.random.normal(ks[0], (B, 8, 8, 4)), t, jax.random.normal(ks[1], (B, 5, 12)),
                 jax.random.normal(ks[2], (B, 10))), {})
    return (jax.random.normal(ks[0], (B, 8, 8, 4)), t, jax.random.normal(ks[1], (B, 5, 12))), {}


def init(module):
    if isinstance(module, dit_lib.DiT):
        args, kwargs = (), dit_lib.example_inputs(module, B)
    elif isinstance(module, mmdit_lib.SD3Transformer2DModel):
        args, kwargs = mmdit_convert.example_inputs(module, B)
    else:
        args, kwargs = unet_convert.example_inputs(module, B)
    return perturbed(module.init(jax.random.key(0), *args, **kwargs)["params"])


def loss_and_grads(module, params):
    args, kwargs = model_inputs(module)
    target = jax.random.normal(jax.random.key(9), args[0].shape)

    def loss(p):
        out = module.apply({"params": p}, *args, **kwargs)
        return jnp.mean(jnp.square(out[..., :4].astype(jnp.float32) - target))

    return jax.jit(jax.value_and_grad(loss))(params)


MODELS = {"dit": dit, "dit-original": dit_original, "mmdit": mmdit, "unet": unet}


# DiT in the default suite; the other families (each compiles a few more train steps) under -m slow
@pytest.fixture(scope="module", params=[name if name == "dit" else pytest.param(name, marks=pytest.mark.slow)
                                        for name in sorted(MODELS)])
def model(request):
    module = MODELS[request.param]()
    return request.param, module, init(module)


def low_precision_matmuls(jaxpr):
    """(primitive, input dtypes) of every matmul / convolution reading a float32 operand, at
    any depth (inside jit, custom_vjp, remat, scan)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            dtypes = [v.aval.dtype for v in eqn.invars]
            if jnp.float32 in dtypes:
                found.append((eqn.primitive.name, dtypes, str(eqn.source_info.name_stack)))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += low_precision_matmuls(sub)
    return found


def test_bf16_compute_over_fp32_params(model):
    name, module, params = model
    low = module.clone(dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(init(low)))  # storage stays fp32
    args, kwargs = model_inputs(low)
    out = low.apply({"params": params}, *args, **kwargs)
    assert out.dtype == jnp.bfloat16
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(low.apply({"params": p}, *args, **kwargs)
                                                      .astype(jnp.float32))))(params)
    assert low_precision_matmuls(jaxpr.jaxpr) == [], f"{name}: fp32 matmuls under dtype=bf16"

    ref_loss, ref_grads = loss_and_grads(module, params)
    loss, grads = loss_and_grads(low, params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert abs(float(loss) - float(ref_loss)) <= 2e-2 * abs(float(ref_loss)), (name, loss, ref_loss)
    err = optax_norm(jax.tree.map(jnp.subtract, grads, ref_grads)) / optax_norm(ref_grads)
    assert err <= 5e-2, f"{name}: bf16 gradients off by {err:.3g} (relative global norm)"


def optax_norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


LEVERS = {"dit": [dict(remat="full"), dict(remat="dots"), dict(scan_blocks=True),
                  dict(scan_blocks=True, remat="dots")],
          "mmdit": [dict(remat="full"), dict(scan_blocks=True), dict(scan_blocks=True, remat="full")],
          "unet": [dict(remat="full"), dict(remat="dots")]}
LEVERS["dit-original"] = LEVERS["dit"]


def test_remat_and_scan_change_nothing(model):
    name, module, params = model
    ref_loss, ref_grads = loss_and_grads(module, params)
    for fields in LEVERS[name]:
        variant = module.clone(**fields)
        to_variant = getattr(variant, "scanned_params", lambda p: p)
        to_blocks = getattr(variant, "per_block_params", lambda p: p)
        loss, grads = loss_and_grads(variant, to_variant(params))
        assert_close(np.asarray(loss), np.asarray(ref_loss), 1e-6, f"{name} {fields}: loss")
        grads = traverse_util.flatten_dict(to_blocks(grads), sep="/")
        expected_grads = traverse_util.flatten_dict(ref_grads, sep="/")
        # a key projection's bias has gradient 0 in exact arithmetic (softmax ignores a shift
        # shared by all keys): its float residue is judged at the scale of the whole gradient
        floor = 1e-2 * max(float(np.abs(g).max()) for g in expected_grads.values())
        for key, expected in expected_grads.items():
            err = np.abs(np.asarray(grads[key], np.float64) - np.asarray(expected)).max()
            scale = max(float(np.abs(expected).max()), floor)
            assert err <= 1e-6 * scale, f"{name} {fields}: d{key} off by {err:.3g} at scale {scale:.3g}"


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="unknown remat policy"):
        init(dit().clone(remat="some"))


@pytest.mark.parametrize("name", ["dit", pytest.param("mmdit", marks=pytest.mark.slow)])
def test_scanned_params_are_the_blocks_stacked(name):
    module = MODELS[name]()
    params = init(module)
    scanned = module.clone(scan_blocks=True)
    stacked = scanned.scanned_params(params)
    # the scanned module's own tree, shape for shape
    args, kwargs = ((), dit_lib.example_inputs(scanned, B)) if name == "dit" else mmdit_convert.example_inputs(scanned)
    expected = jax.eval_shape(lambda: scanned.init(jax.random.key(0), *args, **kwargs)["params"])
    assert jax.tree.structure(stacked) == jax.tree.structure(expected)
    assert jax.tree.map(lambda a: a.shape, stacked) == jax.tree.map(lambda a: a.shape, expected)
    # and back, exactly
    back = scanned.per_block_params(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    runs = scanned._runs()
    assert runs == ([(0, 3)] if name == "dit" else [(0, 2), (2, 4), (4, 5)])


def diffusers_checkpoint(name, tmp_path):
    torch.manual_seed(0)
    if name == "dit":
        model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                out_channels=8, num_layers=3, sample_size=8,
                                                num_embeds_ada_norm=10)
        module = dit_convert.config_from_diffusers(dict(model.config))
    else:
        model = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, attention_head_dim=8,
                                                num_attention_heads=2, joint_attention_dim=12,
                                                caption_projection_dim=16, pooled_projection_dim=10, num_layers=5,
                                                out_channels=4, pos_embed_max_size=12, dual_attention_layers=(0, 1),
                                                qk_norm="rms_norm")
        module = mmdit_convert.module_from_config(dict(model.config))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    state = safetensors.numpy.load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    return dict(model.config), module, state


@pytest.mark.parametrize("name", ["dit", pytest.param("mmdit", marks=pytest.mark.slow)])
def test_scanned_module_converts_and_exports_unchanged(name, tmp_path):
    """The converter reads the same per-block checkpoint into a scanned module (stacking at
    the boundary), and export writes back the same tensors, bit for bit."""
    config, module, state = diffusers_checkpoint(name, tmp_path / "src")
    conv = dit_convert if name == "dit" else mmdit_convert
    scanned = module.clone(scan_blocks=True)
    plain_params = conv.load_params(state, module)
    scanned_params = conv.load_params(state, scanned)
    jax.tree.map(np.testing.assert_array_equal, scanned_params, scanned.scanned_params(plain_params))
    out = export.export_diffusers(name, scanned, scanned_params, config, tmp_path / "out")
    written = safetensors.numpy.load_file(out / "diffusion_pytorch_model.safetensors")
    assert sorted(written) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


@pytest.mark.slow  # compiles a whole engine step (163 s on the loaded 2-core machine)
def test_cpu_train_step_keeps_cotangent_barriers():
    """``materialize_cotangent`` stores each block's output gradient behind an optimization
    barrier; XLA:CPU deletes barriers before fusion unless the step is compiled with
    ``engine.compiler_options()``, which ``Engine.jit`` does on CPU."""
    assert engine_lib.compiler_options("cpu") == {"xla_disable_hlo_passes": "cse_barrier_expander"}
    assert engine_lib.compiler_options("gpu") is None and engine_lib.compiler_options("tpu") is None
    module = dit()
    params = init(module)
    args, kwargs = model_inputs(module)

    def loss_fn(p, frozen, batch, rng):
        return jnp.mean(jnp.square(module.apply({"params": p}, batch["x"], args[1], **kwargs))), {}

    tx, lr = optim.make_optimizer(1e-3, 10)
    engine = engine_lib.single(loss_fn, tx, lr)
    state = engine.init({"student": params}, jax.random.key(0))
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    batch = {"x": args[0]}
    hlo = engine.jit(mesh, state).lower(state, None, batch).compile().as_text()
    plain = jax.jit(jax.grad(lambda p: loss_fn(p, None, batch, None)[0])).lower(params).compile().as_text()
    if jax.default_backend() == "cpu":
        assert hlo.count("opt-barrier") >= module.depth, "the step lost its cotangent barriers"
        assert "opt-barrier" not in plain  # what XLA:CPU does without the option
    # the barrier is the identity, forwards and backwards
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(layers.materialize_cotangent(x), x)
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(layers.materialize_cotangent(x) ** 2))(x), 2 * x)


@pytest.mark.parametrize("shape", [(5, 6), (2, 5, 6), (2, 3, 5, 6)])
def test_dense_is_one_2d_product(shape):
    """Same result as the N-D product, and every product of its forward and backward contracts
    one axis: the kernel gradient of tokens (B, T, C) is a (C, B T) x (B T, F) GEMM."""
    x = jax.random.normal(jax.random.key(0), shape)
    dense = layers.dense(4, "proj")
    params = dense.init(jax.random.key(1), x)
    out = dense.apply(params, x)
    expected = jnp.einsum("...c,cf->...f", x, params["params"]["kernel"]) + params["params"]["bias"]
    assert_close(np.asarray(out), np.asarray(expected), 1e-6, "dense")
    jaxpr = jax.make_jaxpr(jax.grad(lambda p, x: jnp.sum(dense.apply(p, x) ** 2), argnums=(0, 1)))(params, x)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(len(e.params["dimension_numbers"][0][0]) == 1 for e in dots)
    assert all(v.aval.ndim == 2 for e in dots for v in e.invars)
