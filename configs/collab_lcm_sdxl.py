"""Adaptive collaboration, the paper's first recipe: LCM-SDXL (4 steps) samples, an oracle scores,
SDXL base refines the lowest-scoring half with img2img at strength 0.7 for 12 steps (Starodubcev et
al., CVPR 2024; about 4 + 0.5 x 12 = 10 steps a sample).

    jdistill sample --config configs/collab_lcm_sdxl.py --out runs/collab_lcm_sdxl/samples.npz \
        --config.oracle.model=path/to/PickScore_v1 --config.oracle.tokenizer=path/to/CLIP-ViT-H-14

Pipelines are presets or folders found under $JDISTILL_MODELS (nothing is downloaded). The paper's
oracle is ImageReward; here a PickScore-style reward (a CLIPModel folder) or CLIP score.
"""

import ml_collections

from jdistill.recipes.collab_t2i import CALIBRATION_PROMPTS


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "collab"
    c.task = "text_to_image"
    c.models_dir = None
    c.cache_dir = None
    # the student samples as its authors publish it: LCMScheduler, guidance 8 as LCM's w embedding
    c.student = dict(pipeline="lcm-sdxl", steps=4, guidance_scale=8.0)
    # refinement: "img2img" (diffusers' strength, the released code) or "paper" (sqrt(1-s) O + sqrt(s) Z);
    # steps = teacher steps run (img2img: num_inference_steps = int(steps / strength + 1), as released)
    c.teacher = dict(pipeline="sdxl", steps=12, guidance_scale=8.0, form="img2img", strength=0.7)
    c.oracle = dict(name="pickscore", model="", tokenizer="", size=224)
    c.k = 50.0  # refine the samples below the k-th percentile of the calibration scores
    # calibrated with the same student settings as inference; reused when the file exists (and checked)
    c.calibration = dict(prompts=CALIBRATION_PROMPTS, seed=1, file="")
    c.sample = dict(prompts=["a photo of an astronaut riding a horse", "a bowl of fruit, still life"],
                    negative_prompt="", size=None, batch_size=4, buckets=4)
    return c
