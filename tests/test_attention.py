"""``layers.attention``: every implementation computes the same attention, and the choice per
backend is the documented one.

* On CPU: the einsum path (custom backward) and ``jax.nn.dot_product_attention``'s XLA path
  against a reference written out here, values and gradients, with and without a mask, fp32
  (1e-5 relative) and bf16 (2e-2);
* cuDNN: on a machine with an NVIDIA GPU its kernel is run against XLA's; everywhere the
  selection logic is checked for a simulated GPU (bf16 / fp16, head width <= 128 and a
  multiple of 8, no mask), and the fall-back to XLA when cuDNN refuses a call.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.models import layers
from jdistill.testing import assert_close


def reference(q, k, v, mask=None):
    """Softmax(q k^T / sqrt(d)) v, head by head, in float64 numpy."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def inputs(t=7, s=5, heads=3, width=8, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (2, t, heads, width), dtype)
    k = jax.random.normal(ks[1], (2, s, heads, width), dtype)
    v = jax.random.normal(ks[2], (2, s, heads, width), dtype)
    mask = jax.random.bernoulli(ks[3], 0.6, (2, 1, t, s)).at[..., 0].set(True)  # no fully masked row
    weights = jax.random.normal(ks[4], (2, t, heads, width), jnp.float32)
    return q, k, v, mask, weights


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("implementation", ["einsum", "xla"])
def test_values_match_reference(implementation, masked):
    q, k, v, mask, _ = inputs()
    mask = mask if masked else None
    out = layers.attention(q, k, v, mask, implementation=implementation)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(np.asarray(out), reference(q, k, v, mask), 1e-5, f"{implementation} vs reference")


@pytest.mark.parametrize("masked", [False, True])
def test_einsum_gradients_match_autodiff(masked):
    """The hand-written backward against JAX's autodiff of the XLA path."""
    q, k, v, mask, w = inputs()
    mask = mask if masked else None

    def grads(implementation):
        f = lambda q, k, v: jnp.sum(layers.attention(q, k, v, mask, implementation=implementation) * w)  # noqa: E731
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    for name, got, expected in zip("qkv", grads("einsum"), grads("xla")):
        assert_close(np.asarray(got), np.asarray(expected), 1e-5, f"d{name}")


def test_bf16_agrees_with_fp32():
    q, k, v, mask, w = inputs(t=16, s=16, width=32)
    ref = reference(q, k, v, mask)
    for implementation in ("einsum", "xla"):
        out = layers.attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), mask, implementation=implementation)
        assert out.dtype == jnp.bfloat16
        assert_close(np.asarray(out, np.float32), ref, 2e-2, f"{implementation} bf16")
        g = jax.grad(lambda q: jnp.sum(layers.attention(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask,
                                                        implementation=implementation).astype(jnp.float32) * w))(
            q.astype(jnp.bfloat16))
        g32 = jax.grad(lambda q: jnp.sum(layers.attention(q, k, v, mask, implementation="xla") * w))(q)
        assert_close(np.asarray(g, np.float32), np.asarray(g32), 5e-2, f"{implementation} bf16 dq")


def simulated(platform, dtype=jnp.bfloat16, width=64, masked=False, cuda=True, monkeypatch=None):
    q, k, v, mask, _ = inputs(width=width, dtype=dtype)
    monkeypatch.setattr(layers, "_is_cuda", lambda: cuda)
    return layers.attention_implementation(q, k, v, mask if masked else None, platform=platform)


def test_selection(monkeypatch):
    pick = lambda platform, **kw: simulated(platform, monkeypatch=monkeypatch, **kw)  # noqa: E731
    assert pick("cpu") == pick("cpu", dtype=jnp.float32) == "einsum"
    assert pick("gpu") == pick("gpu", dtype=jnp.float16) == pick("gpu", width=128) == "cudnn"
    assert pick("gpu", dtype=jnp.float32) == "xla"  # cuDNN's flash kernel is bf16 / fp16 only
    assert pick("gpu", width=160) == pick("gpu", width=36) == "xla"  # SD1.5's widest heads; not a multiple of 8
    assert pick("gpu", masked=True) == "xla"
    assert pick("gpu", cuda=False) == "xla"  # ROCm
    assert pick("tpu") == "xla"
    q, k, v, _, _ = inputs()
    if jax.default_backend() == "cpu":  # without a platform, JAX's default backend decides
        assert layers.attention_implementation(q, k, v) == "einsum"
    with pytest.raises(ValueError, match="unknown attention implementation"):
        layers.attention(q, k, v, implementation="flash")


def test_cudnn_refusal_falls_back_to_xla(monkeypatch):
    """A call cuDNN refuses at trace time (a sequence length, an old compute capability) runs on
    XLA's kernel when the choice was automatic, and raises when cuDNN was asked for by name."""
    q, k, v, _, _ = inputs(dtype=jnp.bfloat16, width=64)
    real = jax.nn.dot_product_attention
    calls = []

    def fake(*args, implementation=None, **kw):
        calls.append(implementation)
        if implementation == "cudnn":
            raise NotImplementedError("cuDNN refuses this layout")
        return real(*args, implementation=implementation, **kw)

    monkeypatch.setattr(layers, "attention_implementation", lambda *a, **kw: "cudnn")
    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    out = layers.attention(q, k, v)
    assert calls == ["cudnn", "xla"]
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(real(q, k, v, implementation="xla"), np.float32))
    with pytest.raises(NotImplementedError):
        layers.attention(q, k, v, implementation="cudnn")


def test_cudnn_matches_xla_where_there_is_a_gpu(monkeypatch):
    """On an NVIDIA GPU: cuDNN's kernel against XLA's at DiT-XL/2's head width, values and
    gradients. Elsewhere the same shapes must select cuDNN for a simulated NVIDIA GPU."""
    q, k, v, _, w = inputs(t=256, s=256, heads=4, width=72, dtype=jnp.bfloat16)
    if not (jax.default_backend() == "gpu" and layers._is_cuda()):
        assert simulated("gpu", width=72, monkeypatch=monkeypatch) == "cudnn"
        return
    assert layers.attention_implementation(q, k, v) == "cudnn"

    def run(implementation):
        f = lambda q, k, v: jnp.sum(layers.attention(q, k, v, implementation=implementation).astype(jnp.float32)  # noqa: E731
                                    * w)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    (loss_c, grads_c), (loss_x, grads_x) = run("cudnn"), run("xla")
    assert_close(np.asarray(loss_c), np.asarray(loss_x), 2e-2, "cudnn loss")
    for name, a, b in zip("qkv", grads_c, grads_x):
        assert_close(np.asarray(a, np.float32), np.asarray(b, np.float32), 5e-2, f"cudnn d{name}")


def test_reference_kernels_switch_every_cpu_speed_up_off_and_keep_forward_values(monkeypatch):
    """JDISTILL_REFERENCE_KERNELS=1: plain dot_general linears, XLA attention, no compile option on
    CPU (training as before the speed-ups, bit for bit: bench/digits_drift.py); a DiT's forward
    values are the same in both modes."""
    from jdistill.models import registry
    from jdistill.models.dit import DiT
    from jdistill.train import engine

    q = jnp.ones((2, 4, 2, 8))
    module = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    args, kwargs = registry.example_inputs(module, batch=3)  # DiT: keyword inputs (x, t, y)
    kwargs = {k: jax.random.normal(jax.random.key(0), v.shape) if k == "x" else v for k, v in kwargs.items()}
    params = module.init(jax.random.key(1), *args, **kwargs)
    fast = module.apply(params, *args, **kwargs)
    assert layers.attention_implementation(q, q, q, platform="cpu") == "einsum"
    assert engine.compiler_options("cpu") is not None
    monkeypatch.setenv(layers.REFERENCE_KERNELS, "1")
    assert layers.attention_implementation(q, q, q, platform="cpu") == "xla"
    assert engine.compiler_options("cpu") is None
    calls = []
    monkeypatch.setattr(jax.lax, "dot_general", lambda *a, **k: calls.append(a[0].shape) or jnp.zeros(()), raising=True)
    layers.matmul_last_axis(jnp.ones((2, 3, 4)), jnp.ones((4, 5)), (((2,), (0,)), ((), ())))
    assert calls == [(2, 3, 4)]  # not flattened to (6, 4)
    monkeypatch.undo()
    monkeypatch.setenv(layers.REFERENCE_KERNELS, "1")
    np.testing.assert_array_equal(np.asarray(module.apply(params, *args, **kwargs)), np.asarray(fast))


@pytest.mark.parametrize("masked", [False, True])
def test_einsum_in_batch_chunks_changes_no_value_or_gradient(masked, monkeypatch):
    """Large logits run the einsum path a few examples at a time (MMDiT's CFG batch: 3.5x its half
    batch's time in one call, bench/mmdit_batch_scaling.py); outputs and gradients are bit-identical
    to one call, with a per-example mask and a broadcast one."""
    ks = jax.random.split(jax.random.key(3), 5)
    q, k, v = (jax.random.normal(kk, (5, 7, 3, 8)) for kk in ks[:3])
    weights = jax.random.normal(ks[3], (5, 7, 3, 8))
    masks = [None] if not masked else [jax.random.bernoulli(ks[4], 0.6, (5, 1, 7, 7)).at[..., 0].set(True),
                                       jax.random.bernoulli(ks[4], 0.6, (1, 1, 7, 7)).at[..., 0].set(True)]

    def out_and_grads():  # a new function each time: jit's trace cache does not see the module's bound
        def f(q, k, v, mask):
            out, pullback = jax.vjp(lambda q, k, v: layers.attention(q, k, v, mask, implementation="einsum"), q, k, v)
            return out, pullback(weights)
        return jax.jit(f)

    monkeypatch.setattr(jax, "device_count", lambda: 1)  # a CPU user's one device (this session has 8)
    bound = layers.EINSUM_LOGITS_BYTES
    for mask in masks:
        layers.EINSUM_LOGITS_BYTES = bound
        assert "concatenate" not in out_and_grads().lower(q, k, v, mask).as_text()
        whole = out_and_grads()(q, k, v, mask)
        layers.EINSUM_LOGITS_BYTES = 2 * 7 * 7 * 3 * 4  # chunks of 2, 2, 1
        assert "concatenate" in out_and_grads().lower(q, k, v, mask).as_text()  # the chunks do run
        chunked = out_and_grads()(q, k, v, mask)
        layers.EINSUM_LOGITS_BYTES = bound
        for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    calls = []
    monkeypatch.setattr(layers, "EINSUM_LOGITS_BYTES", 2 * 7 * 7 * 3 * 4)
    monkeypatch.setattr(layers, "attention_einsum", lambda q, *a: calls.append(q.shape[0]) or q)
    layers.attention(q, k, v, implementation="einsum")
    assert calls == [2, 2, 1]
    calls.clear()
    with layers.planning():  # a pod's step, compiled here by `jdistill plan`: its batch is never sliced
        layers.attention(q, k, v, implementation="einsum")
    monkeypatch.setattr(jax, "device_count", lambda: 8)  # a batch sharded over devices: never sliced either
    layers.attention(q, k, v, implementation="einsum")
    assert calls == [5, 5]

