"""LADD of Stable Diffusion 3 Medium (Sauer et al., 2024, the paper's setting): the MMDiT student
starts as the teacher, trains on the teacher's own latents (28-step Euler, CFG 7) for a prompt
list, and the discriminator's heads read the frozen teacher's image tokens at four of its 24
blocks, conditioned on the re-noising level and the pooled text embedding.

The teacher is a diffusers (or converted jdistill) SD3 pipeline folder, by path or under
$JDISTILL_MODELS. Prompts: ``synth.prompts_file`` (one per line) or ``synth.prompts``. On TPU pods /
GPU clusters raise ``mesh.fsdp`` to shard the 2B-parameter student, the frozen teacher and the
optimizer state. configs/sd35_large_ladd.py is the same recipe for SD3.5 Large.

    jdistill synth   --config configs/sd3_ladd.py --config.synth.prompts_file=prompts.txt
    jdistill distill --config configs/sd3_ladd.py --workdir runs/sd3_ladd
    jdistill sample  --workdir runs/sd3_ladd --steps 4
"""

from jdistill.config import sibling_config


def get_config():
    """configs/digits_ladd.py's recipe (losses, student times, re-noising, D:G ratio) at SD3's scale."""
    c = sibling_config(__file__, "digits_ladd")
    c.teacher = dict(pipeline="stable-diffusion-3-medium-diffusers", models_dir="", cache_dir="")
    c.synth = dict(dir="", num=100000, shard_size=1000, batch_size=16, steps=28, solver="euler", guidance_scale=7.0,
                   seed=0, prompts=("a photo of a cat", "an astronaut riding a horse"), prompts_file="")
    c.data.batch_size = 64
    c.ladd.distill_guidance = 7.0
    # the paper's re-noising, t ~ logit-normal(1, 1): mostly high noise, global structure at 1024 px
    # (digits_ladd's 0.0 lets its heads judge the grain of 8x8 digits)
    c.ladd.renoise_mean = 1.0
    c.student.optim.lr = 5e-6
    c.student.optim.warmup = 500
    c.discriminator.blocks = (5, 11, 17, 23)
    c.discriminator.width = 256
    c.discriminator.optim.lr = 2e-5
    # nonfinite: a NaN / inf loss, gradient or param, or a divergent update (one over max_update_ratio times
    # its part's norm), stops the run by name ("skip": count it, go on)
    c.train = dict(steps=10000, ema_decay=0.999, log_every=50, ckpt_every=500, keep=2, sample_every=0,
                   nonfinite="stop", max_update_ratio=100.0)
    c.sample = dict(steps=4, prompts=("a photo of astronaut", "a photo of coffee"))
    # fields of the MMDiT: `jdistill plan` builds it from these (--config.model.num_layers=1 compiles a
    # reduced depth); training sets remat and dtype on the pipeline's network and checks the others
    # against it (its weights fix them). remat="full" rematerialises each block: at 1024 px, one image a
    # device, fsdp=4, the fp32 step plans at 39.4 GiB a device with it and 143 GiB without
    # (docs/pod-scale.md). --config.model.dtype=bfloat16 computes in bf16 (params stay fp32)
    c.model = dict(num_layers=24, remat="full", dtype="float32")
    return c
