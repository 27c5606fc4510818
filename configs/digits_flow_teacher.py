"""The digits flow teacher: the digits DiT (configs/digits_teacher.py, same network, data, optimizer
and steps) trained by rectified flow matching, as SD3 is: velocity prediction u = eps - x on
z_t = (1 - t) x + t eps, training times logit-normal(0, 1) then SD3's shift
t' = S t / (1 + (S - 1) t), label dropout 0.1 for classifier-free guidance. Sampled with Euler +
CFG on the shifted flow grid. It is the teacher of LADD (configs/digits_ladd.py) and of the
progressive / consistency students the LADD table compares against it.

    jdistill train --config configs/digits_flow_teacher.py --workdir runs/digits_flow_teacher
"""

from jdistill.config import sibling_config


def get_config():
    c = sibling_config(__file__, "digits_teacher")
    c.diffusion = dict(kind="flow", prediction="flow", shift=3.0)
    c.loss = dict(weighting="constant", cond_drop_prob=0.1, time_sampling="logit_normal", logit_mean=0.0,
                  logit_std=1.0)
    c.sample.solver = "euler"
    return c
