"""The collaboration sampler's pieces (jdistill/sampling/collaborate.py): where refinement starts for
each strength form (against diffusers' img2img ``get_timesteps`` + ``add_noise``), the paper form's
noise level, selection into padded buckets, teacher network calls counted against what the
selection implies, and refine-all at sigma = 1 equal to regeneration bit for bit."""

import collections
import types

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)

from jdistill.denoiser import Denoiser, NullClass
from jdistill.diffusion import schedules
from jdistill.diffusion.timesteps import make_grid
from jdistill.pipelines import scheduling
from jdistill.sampling import collaborate, samplers
from jdistill.sampling.collaborate import Refinement, Teacher
from jdistill.testing import assert_close, nchw, nhwc

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
          timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False)
CASES = [(n, s) for n in (4, 12, 14, 18, 25) for s in (0.3, 0.5, 0.7, 0.75, 1.0)]


@pytest.mark.parametrize("cls", [diffusers.DDIMScheduler, diffusers.EulerDiscreteScheduler,
                                 diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler])
def test_img2img_start_and_noise_follow_diffusers(cls):
    """For each scheduler SD / SDXL pipelines use: the timesteps run equal those diffusers' SD and SDXL
    img2img ``get_timesteps`` return, and the starting z is ``scheduler.add_noise`` at the first of them
    (Euler's in its x = z / a variables) to 1e-6."""
    config = {**dict(cls.from_config(diffusers.DDIMScheduler(**SD).config).config), "_class_name": cls.__name__}
    schedule = scheduling.schedule_from_config(config)
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
    noise = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    for n, strength in CASES:
        plan = scheduling.plan(config, n)
        start = collaborate.img2img_start(n, strength)
        for pipe_cls in (StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline):
            sched = cls.from_config(config)
            sched.set_timesteps(n)
            ts, run = pipe_cls.get_timesteps(types.SimpleNamespace(scheduler=sched), n, strength, "cpu")
            np.testing.assert_array_equal(np.asarray(plan.grid.t[start:]), ts.numpy(), err_msg=f"{pipe_cls} {n} {strength}")
            assert run == n - start
        ref = sched.add_noise(torch.from_numpy(nchw(x)), torch.from_numpy(nchw(noise)), ts[:1])
        if cls is diffusers.EulerDiscreteScheduler:  # x + sigma n in diffusers' variables; z = that * a
            ref = ref / (sched.sigmas[sched.begin_index] ** 2 + 1) ** 0.5
        got = collaborate.renoise(jnp.asarray(x), jnp.asarray(noise), schedule, Refinement("img2img", strength, n),
                                  plan.grid, start)
        assert_close(got, nhwc(ref.numpy()), 1e-6, f"{cls.__name__} add_noise at {n} steps, strength {strength}")


def test_released_codes_step_count():
    """int(T / sigma + 1) nominal steps run about T: the paper's two recipes run exactly 12 and 4."""
    for run, sigma in ((12, 0.7), (4, 0.3), (8, 0.5), (6, 0.6), (4, 1.0), (12, 1.0)):  # full strength: the grid
        n = collaborate.nominal_steps(run, sigma)
        assert n - collaborate.img2img_start(n, sigma) == run
    with pytest.raises(ValueError, match="runs no step"):
        Refinement("img2img", 0.1, 5)


@pytest.mark.parametrize("schedule", [schedules.CosineVP(), schedules.DiscreteVP.from_betas("scaled_linear", 1000, 0.00085, 0.012)],
                         ids=["cosine", "discrete"])
def test_paper_form_starts_at_alpha_bar_one_minus_sigma(schedule):
    for sigma in (0.3, 0.7, 0.95):
        grid = collaborate.paper_grid(schedule, sigma, 6)
        a2, s2 = schedule.variances(grid.t[0])
        assert_close(a2, 1.0 - sigma, 1e-5, f"alpha_bar at the first step, sigma {sigma}")
        assert grid.num_steps == 6 and np.all(np.diff(np.asarray(grid.t)) < 0)
        assert float(schedule.variances(grid.t_next[-1])[0]) > 0.999  # ends at the clean end
    # sigma = 1: the paper's sample is the noise itself, and the teacher runs its own grid
    full, start = collaborate.teacher_grid(schedule, Refinement("paper", 1.0, 8))
    own = make_grid(schedule, 8, "ddim")
    assert start == 0
    np.testing.assert_array_equal(np.asarray(full.t), np.asarray(own.t))
    np.testing.assert_array_equal(np.asarray(full.t_next), np.asarray(own.t_next))
    x, z = jnp.ones((1, 2, 2, 1)), jnp.full((1, 2, 2, 1), 0.25)
    np.testing.assert_array_equal(collaborate.renoise(x, z, schedule, Refinement("paper", 1.0, 8), full, 0), z)
    with pytest.raises(ValueError, match="at sigma = 1 the teacher runs its own grid"):
        collaborate.paper_grid(schedule, 1.0, 8)


# ------------------------------------------------------------------------------ counted teacher

CALLS = collections.defaultdict(list)


class Counted(nn.Module):
    """An analytic class-conditional v-predictor that records every call's batch size on the host."""

    tag: str = "teacher"

    def __call__(self, z, t, class_labels):
        jax.debug.callback(lambda b: CALLS[self.tag].append(int(b.shape[0])), class_labels)
        return 0.7 * jnp.sin(z + t[:, None, None, None] / 1000.0) + 0.01 * class_labels[:, None, None, None]


COSINE = schedules.CosineVP()
DISCRETE = schedules.DiscreteVP.from_betas("scaled_linear", 1000, 0.00085, 0.012)
FLOW = schedules.RectifiedFlow(shift=3.0)


def teacher_den(tag="teacher", schedule=COSINE):
    return Denoiser(params={}, schedule=schedule, module=Counted(tag),
                    prediction="flow" if isinstance(schedule, schedules.RectifiedFlow) else "v",
                    null_cond=NullClass(10))


@pytest.fixture(autouse=True)
def clear_calls():
    CALLS.clear()


def student_batch(n=20):
    x = jax.random.normal(jax.random.key(3), (n, 4, 4, 1)) * 0.5
    labels = np.arange(n, dtype=np.int32) % 10
    scores = np.random.default_rng(4).permutation(n).astype(np.float32)  # distinct: k% is exact
    return x, labels, scores


def run_collab(teacher, refinement, tau, x, labels, scores, buckets=4, key=jax.random.key(7)):
    conds_for = lambda rows: [{"class_labels": jnp.asarray(labels[rows])}] * len(teacher.denoisers)  # noqa: E731
    return collaborate.improve(x, scores, tau, collaborate.refine_rows(teacher, refinement, x, key, conds_for),
                               buckets=buckets)


@pytest.mark.parametrize("tau,selected,bucket", [(float("-inf"), 0, 0), (3.0, 3, 5), (7.5, 8, 10), (12.0, 12, 15),
                                                 (float("inf"), 20, 20)])
def test_teacher_calls_equal_what_the_selection_implies(tau, selected, bucket):
    """20 samples, 4 buckets (5, 10, 15, 20): the teacher runs once per step it takes, on the padded
    bucket doubled by CFG, and not at all when nothing is selected; kept rows are untouched."""
    x, labels, scores = student_batch()
    teacher = Teacher((teacher_den(),), (1.5,))
    refinement = Refinement("img2img", 0.5, 8)
    out, sel = run_collab(teacher, refinement, tau, x, labels, scores)
    assert len(sel.selected) == selected and sel.rows_run == bucket
    _, start, plan = teacher.plan(refinement)
    assert start == 4 and plan.calls() == [4]
    assert CALLS["teacher"] == ([2 * bucket] * 4 if selected else [])
    assert collaborate.teacher_calls(plan, teacher.passes) == 8  # per improved sample: 4 steps x 2 passes
    keep = np.setdiff1d(np.arange(20), sel.selected)
    np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(x)[keep])
    if selected:
        assert not np.allclose(np.asarray(out)[sel.selected], np.asarray(x)[sel.selected])


@pytest.mark.parametrize("refinement,steps,calls", [(Refinement("regenerate", 1.0, 4, "heun"), 4, 7),
                                                     (Refinement("img2img", 0.5, 8, "heun"), 4, 7),
                                                     (Refinement("paper", 0.6, 3, "heun"), 3, 5)],
                         ids=["regenerate", "img2img", "paper"])
def test_a_heun_teacher_is_counted_two_calls_a_step_but_the_last(refinement, steps, calls):
    """Heun calls the network twice a step, once on the run's last (Euler to the clean end): the
    counted calls, the plan's and the budget's per-sample evaluations agree."""
    x, labels, scores = student_batch()
    teacher = Teacher((teacher_den(),), (1.5,))
    run_collab(teacher, refinement, float("inf"), x, labels, scores)
    assert CALLS["teacher"] == [2 * 20] * calls  # every row refined, CFG doubles the batch
    plan = teacher.plan(refinement)[2]
    assert plan.calls() == [calls] and collaborate.teacher_calls(plan, teacher.passes) == 2 * calls
    assert plan.steps() == [steps]  # what the budget reports as steps
    from jdistill.recipes import collab_sweep

    # the budget rule counts the same: 2 passes x (2 n - 1) calls <= 12 - 1 gives n = 3 (5 calls, 10 evaluations)
    assert collab_sweep.teacher_steps(12, 1, 1.0, 2, "heun") == 3 and collab_sweep.teacher_steps(12, 1, 1.0, 2) == 5
    assert collab_sweep.teacher_steps(10, 1, 0.0, 2) == 1  # k = 0: nothing refined, no division by zero


def test_a_sample_is_refined_the_same_whatever_else_is_selected():
    """Z is drawn for the whole batch: row 0's refinement alone or among 15 others (another bucket) agree."""
    x, labels, scores = student_batch()
    teacher = Teacher((teacher_den(),), (1.5,))
    refinement = Refinement("paper", 0.6, 5)
    scores = scores.copy()
    scores[0] = -1.0
    alone, _ = run_collab(teacher, refinement, -0.5, x, labels, scores)
    many, sel = run_collab(teacher, refinement, 14.5, x, labels, scores)
    assert sel.rows_run == 15
    assert_close(np.asarray(many)[0], np.asarray(alone)[0], 1e-6, "row 0 in two selections")


@pytest.mark.parametrize("schedule,solver", [(COSINE, "ddim"), (DISCRETE, "ddim"), (FLOW, "euler")],
                         ids=["cosine", "discrete", "flow-shift-3"])
def test_refine_all_at_sigma_one_is_regeneration_bit_for_bit(schedule, solver):
    """The paper form at sigma = 1 starts from Z on the teacher's own grid: the same as regenerating
    from Z, and as the teacher's own sampler run from Z, on every schedule (an equal unit grid is the
    teacher's own on the cosine schedule only)."""
    x, labels, scores = student_batch()
    teacher = Teacher((teacher_den(schedule=schedule),), (1.5,))
    key = jax.random.key(11)
    refined, _ = run_collab(teacher, Refinement("paper", 1.0, 6, solver), float("inf"), x, labels, scores, key=key)
    regen, _ = run_collab(teacher, Refinement("regenerate", 1.0, 6, solver), float("inf"), x, labels, scores, key=key)
    np.testing.assert_array_equal(np.asarray(refined), np.asarray(regen))
    z = jax.random.normal(jax.random.fold_in(key, collaborate.RENOISE_STREAM), x.shape)
    alone = samplers.sample_jit(teacher_den(schedule=schedule), z, {"class_labels": jnp.asarray(labels)},
                                grid=make_grid(schedule, 6, solver), solver=solver, guidance_scale=1.5)
    np.testing.assert_array_equal(np.asarray(regen), np.asarray(alone))


def test_a_stitched_teacher_refines_from_the_start_step():
    """A T-Stitch teacher (small model for t >= 0.6) entering at step 5 of 10 (t = 0.5): only the large
    model runs, 5 times; from step 2 the small one takes t = 0.8, 0.7, 0.6."""
    x, labels, scores = student_batch()
    teacher = Teacher((teacher_den("small"), teacher_den("large")), (1.5, 1.5), (0.4, 0.6))
    for strength, small, large in ((0.5, 0, 5), (0.8, 3, 5)):
        CALLS.clear()
        refinement = Refinement("img2img", strength, 10)
        run_collab(teacher, refinement, float("inf"), x, labels, scores)
        assert (len(CALLS["small"]), len(CALLS["large"])) == (small, large)
        assert teacher.plan(refinement)[2].calls() == [small, large]


def test_buckets():
    assert collaborate.bucket_sizes(500, 8) == [63, 126, 189, 252, 315, 378, 441, 500]
    assert collaborate.bucket_for(250, 500, 8) == 252 and collaborate.bucket_for(1, 500, 8) == 63
    assert collaborate.bucket_sizes(3, 8) == [1, 2, 3]
    np.testing.assert_array_equal(collaborate.padded(np.array([4, 9]), 5), [4, 9, 4, 4, 4])
