"""Adaptive collaboration of text-to-image pipelines: the paper's recipes as configs.

    jdistill sample --config configs/collab_lcm_sdxl.py --out runs/collab_lcm_sdxl/samples.npz
    jdistill sample --config configs/collab_sdxl_turbo.py --out runs/collab_turbo/samples.npz

The student pipeline samples latents as it samples alone (LCM-SDXL: LCM's scheduler and w
embedding; SDXL-Turbo: trailing Euler ancestral, no guidance); the oracle scores the decoded
images against their prompts; the teacher pipeline (SDXL base, or the SDXL refiner with its
aesthetic-score time ids and text_encoder_2 alone) refines the selected latents in latent space
(both share SDXL's VAE, so no decode / encode round trip) as StableDiffusionXLImg2ImgPipeline does
with ``strength`` sigma, or in the paper's form. tau comes from a calibration file made with the
same student settings (``calibration.file``; computed on ``calibration.prompts`` when absent).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jdistill import images as images_lib
from jdistill.config import ConfigError
from jdistill.metrics import oracles
from jdistill.paths import resolve_model
from jdistill.recipes.collab_calibration import Calibration
from jdistill.sampling import collaborate
from jdistill.sampling.collaborate import Refinement, Teacher, nominal_steps
from jdistill.sampling.stitch import network_calls

CALIBRATION_STREAM = 2**30 + 3  # fold_in(key(calibration seed), .): the calibration batches' noise

# a small default calibration set (the paper used 5000 COCO captions: pass your own)
CALIBRATION_PROMPTS = [
    "a photo of a cat sitting on a windowsill", "an astronaut riding a horse on the moon",
    "a bowl of ramen with an egg, studio lighting", "a lighthouse on a cliff at sunset, oil painting",
    "a red sports car in the rain at night", "a watercolor fox in a snowy forest",
    "a cozy library with tall bookshelves", "a robot playing chess in a park",
]


def _pipeline(cfg, section):
    from jdistill.pipelines.text_to_image import TextToImage

    return TextToImage.from_pretrained(resolve_model(section.pipeline, cfg.get("models_dir")),
                                       cache_dir=cfg.get("cache_dir") or None)


def _size(cfg, t2i) -> tuple[int, int]:
    return tuple(cfg.sample.size) if cfg.sample.get("size") else t2i.default_size()


class TextCollab:
    """A student and a teacher pipeline, an oracle and a refinement, from a ``collab`` config."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.student, self.teacher = _pipeline(cfg, cfg.student), _pipeline(cfg, cfg.teacher)
        if self.student.latent_channels != self.teacher.latent_channels:
            raise ConfigError("the student's and the teacher's latents differ in channels: refinement runs in "
                              "latent space and needs one VAE family")
        self.oracle = oracles.get(cfg.oracle.name, **{k: v for k, v in cfg.oracle.items() if k != "name" and v})
        self.height, self.width = _size(cfg, self.student)
        t = cfg.teacher
        self.guidance = float(t.guidance_scale)
        form, strength, run = t.form, float(t.strength), int(t.steps)
        plan = self.teacher.plan(nominal_steps(run, strength) if form == "img2img" else run)
        self.final_scale = plan.final_scale
        self.solver_options = plan.sample_options()
        self.refinement = Refinement(form, strength, plan.num_steps, plan.solver)
        self.teacher_net = Teacher((self.teacher.denoiser(),), (self.guidance if self.guidance > 1 else None,),
                                   grid_fn=lambda n: self.teacher.plan(n).grid)
        _, _, stitch_plan = self.teacher_net.plan(self.refinement)
        self.teacher_evaluations = collaborate.teacher_calls(stitch_plan, self.teacher_net.passes)
        s = cfg.student  # a pass a call unless the student runs CFG itself (guidance as an input: one)
        self.student_evaluations = (network_calls(self.student.plan(int(s.steps)).solver, int(s.steps))
                                    * self.student.passes(float(s.guidance_scale)))

    def settings(self) -> dict:
        s = self.cfg.student
        return {"student": {"pipeline": os.path.abspath(resolve_model(s.pipeline, self.cfg.get("models_dir"))),
                            "steps": int(s.steps), "guidance_scale": float(s.guidance_scale),
                            "size": [self.height, self.width], "negative_prompt": self.cfg.sample.get("negative_prompt")},
                "oracle": self.oracle.provenance}

    def student_batch(self, prompts, seed):
        """(final latents, decoded float images) of the student alone for ``prompts`` (``seed``: an int
        or a PRNG key)."""
        s = self.cfg.student
        out = self.student.generate(prompts, self._negative(prompts), num_steps=int(s.steps),
                                    guidance_scale=float(s.guidance_scale), seed=seed, height=self.height,
                                    width=self.width)
        return out.latents, out.images

    def _negative(self, prompts):
        neg = self.cfg.sample.get("negative_prompt")
        return [neg] * len(prompts) if neg else None

    def scores(self, images, prompts) -> np.ndarray:
        return self.oracle.score(images, prompts)

    def refine(self, latents, scores, tau: float, prompts, seed: int):
        """(final latents, Selection): the teacher on the latents scoring below tau."""
        cond, uncond = self.teacher.encode_prompt(prompts, self._negative(prompts), guidance=self.guidance > 1,
                                                  height=self.height, width=self.width)
        run = collaborate.refine_rows(
            self.teacher_net, self.refinement, latents, jax.random.key(seed),
            lambda rows: [collaborate.take(cond, rows)],
            unconds_for=None if uncond is None else (lambda rows: [collaborate.take(uncond, rows)]),
            solver_options=self.solver_options)
        return collaborate.improve(latents, scores, tau, lambda rows: run(rows) * self.final_scale,
                                   buckets=int(self.cfg.sample.buckets))

    def calibrate(self) -> Calibration:
        c = self.cfg.calibration
        prompts = list(c.prompts)
        scores = np.concatenate([self.scores(self.student_batch(p, calibration_key(int(c.seed), b))[1], p)
                                 for b, p in enumerate(_batches(prompts, int(self.cfg.sample.batch_size)))])
        return Calibration(np.sort(scores), self.calibration_settings())

    def calibration_settings(self) -> dict:
        """What a calibration file must record to be used: the student and oracle, the calibration set
        and its seed, and the noise stream (files from before the stream drew evaluation seeds' noise)."""
        c = self.cfg.calibration
        return dict(self.settings(), set_size=len(c.prompts), seed=int(c.seed), noise="calibration_key")

    def calibration(self) -> Calibration:
        path = self.cfg.calibration.get("file")
        if path and os.path.isfile(path):
            calib = Calibration.load(path)
            calib.check(self.calibration_settings())  # the calibration these settings would make
            return calib
        calib = self.calibrate()
        if path:
            calib.save(path)
        return calib


def calibration_key(seed: int, batch: int):
    """Calibration batch ``batch``'s key: a stream of the calibration seed of its own, never a key an
    evaluation batch draws (those take ``key(seed + b)``: calibration seed 1 gave evaluation batch 1's
    noise at seed 0)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), CALIBRATION_STREAM), batch)


def _batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_config(cfg, *, num: int | None = None, seed: int = 0, tau: float | None = None) -> dict:
    """Collaborative samples for the config's prompts: uint8 images, which were refined, the budget."""
    collab = TextCollab(cfg)
    tau = collab.calibration().tau(float(cfg.k)) if tau is None else tau
    prompts = list(np.resize(np.asarray(cfg.sample.prompts, object), num or len(cfg.sample.prompts)))
    images, refined, all_scores, rows_run = [], [], [], 0
    for b, batch in enumerate(_batches(prompts, int(cfg.sample.batch_size))):
        latents, student_images = collab.student_batch(batch, seed + b)
        scores = collab.scores(student_images, batch) if collaborate.needs_scores(tau) else np.full(len(batch), np.nan)
        final, sel = collab.refine(latents, scores, tau, batch, seed + b)
        mask = np.zeros(len(batch), bool)
        mask[sel.selected] = True
        out = np.array(student_images)
        if sel.selected.size:
            out[sel.selected] = np.asarray(collab.teacher.decode(final[sel.selected]))
        images.append(images_lib.to_uint8(out))
        refined.append(mask)
        all_scores.append(scores)
        rows_run += sel.rows_run
    refined = np.concatenate(refined)
    share = float(refined.mean())
    budget = {"refined_share": share, "tau": tau, "padded_rows": rows_run,
              "avg_evals": collab.student_evaluations + share * collab.teacher_evaluations,
              "teacher_evaluations_per_refined": collab.teacher_evaluations}
    return {"images": np.concatenate(images), "prompts": prompts, "refined": refined,
            "scores": np.concatenate(all_scores), "budget": budget,
            "description": f"collab {cfg.student.pipeline} {cfg.student.steps} steps -> {cfg.teacher.pipeline} "
                           f"{collab.refinement.describe()}, k={float(cfg.k):g}"}


def save_config_samples(cfg, out: str, *, num: int | None = None, seed: int = 0) -> dict:
    """`jdistill sample --config configs/collab_*.py`: samples, prompts, the refined mask and scores (.npz + PNG)."""
    import time

    start = time.perf_counter()
    result = run_config(cfg, num=num, seed=seed)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, images=result["images"], prompts=np.asarray(result["prompts"]), refined=result["refined"],
             scores=result["scores"])
    png = images_lib.save_grid(os.path.splitext(out)[0] + ".png", result["images"][:64])
    b = result["budget"]
    return {"npz": out, "png": png, "num": len(result["images"]), "seconds": time.perf_counter() - start,
            "description": f"{result['description']} ({b['refined_share']:.0%} refined, {b['avg_evals']:.2f} "
                           "evaluations per sample on average)"}
