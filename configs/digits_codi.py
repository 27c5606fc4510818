"""CoDi on digits: the digits teacher as an unconditional prior (its null class), distilled into
few-step conditional samplers, with the baselines on the same prior, data and budget.

``condition.kind``: "sr2" (4x4 -> 8x8 super-resolution), "inpaint" (a random half masked) or
"edges" (Canny). Methods (one stage each): the conditional model fine-tuned on the denoising loss,
the two-stage baseline (LCM of the prior, then conditional fine-tuning), CoDi and PE-CoDi.

    jdistill distill --config configs/digits_codi.py --workdir runs/digits_codi_sr2
    jdistill distill --config configs/digits_codi.py --workdir runs/digits_codi_inpaint --config.condition.kind=inpaint
    jdistill codi-table --workdir runs/digits_codi_sr2 runs/digits_codi_inpaint --out runs/codi_table
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "codi"
    c.seed = 0
    c.teacher = dict(workdir="runs/digits_teacher", config="configs/digits_teacher.py")
    c.data = dict(name="digits", batch_size=64, data_dir=None)
    c.condition = dict(kind="sr2")
    # the paper's gated fusion (mu = 0 at init); "controlnet": a trainable copy of copy_depth blocks
    c.adapter = dict(kind="gated", width=32, copy_depth=0)
    c.methods = ("finetune", "two_stage", "codi", "pe_codi")
    budget = 800
    c.finetune = dict(steps=budget, weighting="constant")
    # two-stage: LCM of the prior (no guidance), then fine-tuning: budget / 2 each
    c.lcm = dict(steps=budget // 2, num_steps=50, scale_range=None, solver="ddim", distance="l2", huber_c=0.001,
                 timestep_scaling=10.0, target_decay=0.95)
    c.two_stage = dict(finetune_steps=budget // 2)
    # a skip grid of 20 steps (k = 50), not LCM's 50: see docs/codi.md, "How the 4 steps sample"
    c.codi = dict(steps=budget, num_steps=20, scale_range=None, guidance_weight=1.0, ode="model", solver="ddim",
                  distance="l2", huber_c=0.001, timestep_scaling=10.0, target_decay=0.95)
    c.optim = dict(lr=2e-4, warmup=50, decay="linear", end_factor=0.0, b1=0.9, b2=0.999, weight_decay=0.0,
                   clip_norm=1.0)
    # nonfinite: a NaN / inf loss, gradient or param, or a divergent update (one over max_update_ratio times
    # its part's norm), stops the run by name ("skip": count it, go on)
    c.train = dict(ema_decay=0.99, log_every=50, ckpt_every=200, keep=2, sample_every=0,
                   nonfinite="stop", max_update_ratio=100.0)
    c.mesh = dict(data=-1, fsdp=1)
    # LCMScheduler's sampler (fresh noise between steps; "codi": CoDi's deterministic one) at the skip
    # grid's "quadratic" picks (remaining fractions (1 - i/n)^2, 4 of 20 steps at
    # unit times 1.0, 0.55, 0.25, 0.05) or "lcm" (LCMScheduler's linear picks)
    c.sample = dict(steps=4, solver="lcm", spacing="quadratic")
    return c
