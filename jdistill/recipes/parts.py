"""The demo's parts, one per method, in the order `make demo` runs them (``jdistill demo [PART ...]``).

* ``teacher``: the digits teacher's 64-step DDIM + CFG samples against the held-out digits;
* ``guided``: Meng et al.'s guided distillation of it (stage 1, then halvings), the
  teacher-vs-student table and the paper's claims;
* ``stitch``: T-Stitch of the small digits teacher before the large one;
* ``consistency``: LCM of the digits teacher (a 4-step student with guidance as an input), then a
  slice of CoDi: 2x super-resolution from the teacher as an unconditional prior, CoDi against the
  fine-tuned conditional model.
* ``ladd``: LADD of the digits flow teacher (synthetic data, then the adversarial stage), its
  unguided 1- / 4-step students against the teacher's Euler + CFG, and the paper's claims.
* ``collab``: adaptive teacher-student collaboration: the guided part's 1-step student, an oracle,
  the teacher refining the lowest-scoring half.

A new method adds its part here (a function of a :class:`~jdistill.recipes.demo.Demo`
returning ``{"claims": [...], ...}``) and registers it in :data:`PARTS`.
"""

from __future__ import annotations

import os

import jax

from jdistill import images as images_lib
from jdistill.recipes import assets, codi, codi_table, collab_report, collab_sweep, consistency, evaluation, guided
from jdistill.recipes import guided_table, ladd, ladd_table, lcm_table, runs, stitch
from jdistill.recipes import teacher as teacher_lib
from jdistill.recipes.demo import Demo, Part, claim, run
from jdistill.train.loop import training_seconds

# The demo's guided distillation: the shipped stage-1 student (configs/digits_guided.py's 1500 steps
# from the shipped teacher, 27 CPU minutes), then halvings from 8 steps on a budget that still meets
# the paper's claims (``--full``: configs/digits_guided.py as is, stage 1 included).
GUIDED_STAGE1 = "digits_guided_stage1"
GUIDED_DEMO = ["--config.progressive.start_steps=8",
               "--config.progressive.train_steps.default=300", "--config.progressive.train_steps.2=400",
               "--config.progressive.train_steps.1=800"]
GUIDED_QUICK = ["--config.stage1.steps=20", "--config.progressive.start_steps=4",
                "--config.progressive.train_steps.default=10", "--config.progressive.train_steps.2=10",
                "--config.progressive.train_steps.1=10"]


def teacher_part(demo: Demo) -> dict:
    from jdistill.metrics.classifier import load_digits_classifier, real_vs_real_fd

    workdir = demo.teacher("digits_teacher")
    sampler = teacher_lib.make_sampler(runs.open_run(workdir), steps=64, solver="ddim")
    row, images = evaluation.score(sampler, demo.num, repeats=1)  # no timing claim here: one run
    images_lib.save_grid(os.path.join(demo.out("teacher"), "teacher_ddim64.png"), images[:100], ncol=10)
    floor = real_vs_real_fd(load_digits_classifier(), subsample=demo.num)
    ref = floor[f"train{floor['subsample']}_vs_test"]
    seconds = training_seconds(workdir)
    steps = runs.read_config(workdir).train.steps
    print(f"{row['sampler']}: FD {row['fd']:.2f}, {100 * row['class_acc']:.1f}% classified as their label; "
          f"real-vs-real FD {ref:.2f} ({floor['subsample']} train digits vs the held-out split); trained "
          f"{steps} steps in {seconds / 60 if seconds else float('nan'):.1f} min")
    claims = [claim("teacher FD over the real-vs-real FD", row["fd"] / ref, "<= 2.5", row["fd"] <= 2.5 * ref),
              claim("share classified as their label", row["class_acc"], ">= 0.95", row["class_acc"] >= 0.95)]
    return dict(row, real_vs_real_fd=ref, train_seconds=seconds, claims=claims)


def guided_run(demo: Demo):
    """(config, workdir) of the demo's guided distillation, trained unless finished (the guided and
    collab parts share it)."""
    teacher_dir = demo.teacher("digits_teacher")
    budget = GUIDED_QUICK if demo.quick else [] if demo.full else GUIDED_DEMO
    cfg = demo.config("digits_guided", [f"--config.teacher.workdir={teacher_dir}", "--config.teacher.config=",
                                        *budget])
    workdir = demo.run_dir("digits_guided" if demo.full else "digits_guided_demo")
    if not (demo.full or demo.quick) and assets.available(GUIDED_STAGE1):
        assets.install(GUIDED_STAGE1, workdir, teacher_workdir=teacher_dir)
        print(f"{GUIDED_STAGE1}: the shipped stage-1 student as {os.path.join(workdir, 'stage1')}")
    guided.train(cfg, workdir)
    return cfg, workdir


def guided_part(demo: Demo) -> dict:
    cfg, workdir = guided_run(demo)
    scales = (1.5, 2.0) if demo.full else (1.5,)
    kw = {} if demo.full else dict(teacher_steps=(4, 8, 64), student_steps=(1, 4), stochastic=False)
    table = guided_table.results_table(workdir, guidance_scales=scales, num=demo.num, out_dir=demo.out("guided"),
                                       progress=False, **kw)
    print(guided_table.format_results(table))
    return {"rows": table["rows"], "claims": [dict(c, claim=f"g={c['g']:g}: {c['claim']}") for c in table["checks"]],
            "train_minutes": sum(training_seconds(os.path.join(workdir, name)) or 0
                                 for name, _ in guided.stage_steps(cfg)) / 60}


def stitch_part(demo: Demo) -> dict:
    large = demo.teacher("digits_teacher")
    small = demo.teacher("digits_teacher_small")
    steps_list = (16, 64) if demo.full else (16,)
    fractions = None if demo.full else [0.0, 0.2, 0.4, 0.6, 1.0]
    sweep = stitch.sweep(small, large, steps_list=steps_list, fractions=fractions, num=demo.num,
                         out_dir=demo.out("stitch"), progress=False)
    print(stitch.format_table(sweep))
    claims = []
    for row in sweep["rows"]:
        if row["fraction"] == 0.4:
            claims += [claim(f"{row['steps']} steps, fraction 0.4: FD over the large model alone",
                             row["fd_vs_large"], "<= 1.05", row["fd_vs_large"] <= 1.05),
                       claim(f"{row['steps']} steps, fraction 0.4: wall time over the large model alone",
                             row["time_vs_large"], "<= 0.7", row["time_vs_large"] <= 0.7)]
    return {"rows": sweep["rows"], "claims": claims, "device": f"{jax.devices()[0].platform}"}


# The demo's consistency part: LCM, then CoDi against the fine-tuned conditional model on 2x
# super-resolution (``--full``: configs/digits_lcm.py and configs/digits_codi.py as they are).
LCM_DEMO = ["--config.lcm.steps=600"]
LCM_QUICK = ["--config.lcm.steps=10", "--config.train.ckpt_every=10"]
CODI_DEMO = ["--config.methods=('finetune', 'codi')", "--config.finetune.steps=400", "--config.codi.steps=400"]
CODI_QUICK = ["--config.methods=('finetune', 'codi')", "--config.finetune.steps=10", "--config.codi.steps=10",
              "--config.train.ckpt_every=10"]


def consistency_part(demo: Demo) -> dict:
    teacher_dir = demo.teacher("digits_teacher")
    teacher = [f"--config.teacher.workdir={teacher_dir}", "--config.teacher.config="]
    lcm_budget = LCM_QUICK if demo.quick else [] if demo.full else LCM_DEMO
    lcm_dir = demo.run_dir("digits_lcm" if demo.full else "digits_lcm_demo")
    cfg = demo.config("digits_lcm", [*teacher, *lcm_budget])
    consistency.train(cfg, lcm_dir)
    kw = {} if demo.full else dict(teacher_steps=(4, 64), student_steps=(1, 4))
    table = lcm_table.results_table(lcm_dir, guidance_scales=(1.5,), num=demo.num, out_dir=demo.out("lcm"),
                                    progress=False, **kw)
    print(lcm_table.format_results(table))
    claims = [dict(c, claim=f"LCM g={c['g']:g}: {c['claim']}") for c in table["checks"]]

    codi_budget = CODI_QUICK if demo.quick else [] if demo.full else CODI_DEMO
    codi_dir = demo.run_dir("digits_codi_sr2" if demo.full else "digits_codi_sr2_demo")
    codi.train(demo.config("digits_codi", [*teacher, *codi_budget]), codi_dir)
    conditional = codi_table.results_table([codi_dir], num=demo.num, out_dir=demo.out("codi"), progress=False)
    print(codi_table.format_results(conditional))
    claims += [dict(c, claim=f"CoDi {c['task']}: {c['claim']}") for c in conditional["checks"]]
    for c in claims:
        claim(c["claim"], c["value"], c["target"], c["ok"])
    return {"lcm_rows": table["rows"], "codi_rows": conditional["rows"], "claims": claims}


# The demo's LADD: one seed on fewer synthetic samples and steps, the student's average over ~100 of
# them (``--full``: configs/digits_ladd.py as is, three seeds, and the progressive and consistency
# students of the same teacher in the table).
LADD_DEMO = ["--config.synth.num=3000", "--config.train.steps=400", "--config.train.ema_decay=0.99"]
LADD_QUICK = ["--config.synth.num=200", "--config.synth.shard_size=100", "--config.synth.steps=8",
              "--config.train.steps=10", "--config.data.batch_size=32"]
LADD_SEEDS = (0, 1, 2)


def ladd_part(demo: Demo) -> dict:
    teacher_dir = demo.teacher("digits_flow_teacher")
    budget = LADD_QUICK if demo.quick else [] if demo.full else LADD_DEMO
    tag = "" if demo.full else "_demo"
    workdirs = []
    for seed in LADD_SEEDS if demo.full else LADD_SEEDS[:1]:
        cfg = demo.config("digits_ladd", [f"--config.teacher.workdir={teacher_dir}", "--config.teacher.config=",
                                          f"--config.synth.dir={demo.run_dir('digits_flow_synth' + tag)}",
                                          f"--config.seed={seed}", *budget])
        workdirs.append(demo.run_dir(f"digits_ladd_seed{seed}{tag}"))
        ladd.train(cfg, workdirs[-1])
    compare = {}
    if demo.full:  # the other students of the same flow teacher, each at its config's budget
        for name, config, recipe in (("progressive", "digits_flow_guided", guided),
                                     ("consistency", "digits_flow_lcm", consistency)):
            compare[name] = demo.run_dir(config)
            recipe.train(demo.config(config, [f"--config.teacher.workdir={teacher_dir}", "--config.teacher.config="]),
                         compare[name])
    kw = {} if demo.full else dict(teacher_steps=(1, 4, 64), student_steps=(1, 4))
    table = ladd_table.results_table(workdirs, compare=compare, num=demo.num, out_dir=demo.out("ladd"),
                                     progress=False, **kw)
    print(ladd_table.format_results(table))
    claims = [claim(c["claim"], c["value"], c["target"], c["ok"]) for c in table["checks"]]
    return {"rows": table["rows"], "seeds": table["seeds"], "claims": claims,
            "train_minutes": sum(training_seconds(w) or 0 for w in workdirs) / 60}


def collab_part(demo: Demo) -> dict:
    teacher_dir = demo.teacher("digits_teacher")
    _, workdir = guided_run(demo)  # after the guided part: its finished run, nothing trained here
    # the realism oracle (the confidence one picks atypical but clear digits: docs/collaboration.md);
    # the default demo checks the claims at ~10 evaluations with the sweep's pick for this student
    # (k 50, sigma 0.4); --full sweeps every budget, k and sigma
    grid = {} if demo.full else dict(budgets=(10,), ks=(50,), sigmas=(0.4,), repeats=2)
    result = collab_sweep.sweep(os.path.join(workdir, "steps_001"), teacher_dir, num=demo.num,
                                calibration_num=demo.num, out_dir=demo.out("collab"), progress=False,
                                oracle="digits_realism", **grid)
    print(collab_report.summary_table(result))
    claims = [claim(c["claim"], c["value"], c["target"], c["ok"]) for c in result["checks"]]
    return {"rows": result["rows"], "claims": claims}


PARTS = {p.name: p for p in (
    Part("teacher", "the digits teacher (64-step DDIM + CFG)", teacher_part),
    Part("guided", "guided distillation (Meng et al.)", guided_part),
    Part("stitch", "T-Stitch: the small teacher for the early steps", stitch_part),
    Part("consistency", "consistency distillation (LCM) and CoDi", consistency_part),
    Part("ladd", "LADD: adversarial distillation of the flow teacher (Sauer et al.)", ladd_part),
    Part("collab", "adaptive teacher-student collaboration (Starodubcev et al.)", collab_part),
)}


def main(names=None, **kw) -> dict:
    return run(PARTS, names, **kw)
