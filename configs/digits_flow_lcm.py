"""Consistency distillation (LCM) of the digits FLOW teacher: configs/digits_lcm.py with
configs/digits_flow_teacher.py as the teacher. Its students are the "consistency" rows of the LADD
table (one teacher, every method). The objective reads the teacher through the Denoiser's (x0, eps),
so the flow teacher's one-step DDIM target on its 50-step skip grid is an Euler step of its ODE.

    jdistill distill --config configs/digits_flow_lcm.py --workdir runs/digits_flow_lcm
    jdistill ladd-table --workdir runs/digits_ladd --compare consistency=runs/digits_flow_lcm
"""

from jdistill.config import sibling_config


def get_config():
    c = sibling_config(__file__, "digits_lcm")
    c.teacher.workdir = "runs/digits_flow_teacher"
    c.teacher.config = "configs/digits_flow_teacher.py"
    return c
