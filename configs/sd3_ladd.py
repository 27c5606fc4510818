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

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "ladd"
    c.seed = 0
    c.teacher = dict(pipeline="stable-diffusion-3-medium-diffusers", models_dir="", cache_dir="")
    c.synth = dict(dir="", num=100000, shard_size=1000, batch_size=16, steps=28, solver="euler", guidance_scale=7.0,
                   seed=0, prompts=("a photo of a cat", "an astronaut riding a horse"), prompts_file="")
    c.data = dict(batch_size=64)
    c.ladd = dict(loss="hinge", times=(1.0, 0.75, 0.5, 0.25), time_probs=(0.7, 0.1, 0.1, 0.1), renoise_mean=1.0,
                  renoise_std=1.0, r1_weight=0.0, r1_sigma=0.1, distill_weight=0.0, distill_guidance=7.0,
                  d_every=1, g_every=1)
    c.student = dict(optim=dict(lr=5e-6, warmup=500, decay="constant", b1=0.0, b2=0.99, weight_decay=0.0,
                                clip_norm=1.0))
    c.discriminator = dict(blocks=(5, 11, 17, 23), width=256, head="conv",
                           optim=dict(lr=2e-5, warmup=0, decay="constant", b1=0.0, b2=0.99, weight_decay=0.0,
                                      clip_norm=1.0))
    c.train = dict(steps=10000, ema_decay=0.999, log_every=50, ckpt_every=500, keep=2, sample_every=0)
    c.mesh = dict(data=-1, fsdp=1)
    c.sample = dict(steps=4, prompts=("a photo of astronaut", "a photo of coffee"))
    return c
