"""Guided (progressive) distillation of the digits FLOW teacher: configs/digits_guided.py with
configs/digits_flow_teacher.py as the teacher. Its students are the "progressive" rows of the LADD
table (one teacher, every method): the same DDIM halvings, which on a rectified-flow schedule
(a = 1 - t, s = t) are Euler steps on the unit grid t = i / N.

    jdistill distill --config configs/digits_flow_guided.py --workdir runs/digits_flow_guided
    jdistill ladd-table --workdir runs/digits_ladd --compare progressive=runs/digits_flow_guided
"""

from jdistill.config import sibling_config


def get_config():
    c = sibling_config(__file__, "digits_guided")
    c.teacher.workdir = "runs/digits_flow_teacher"
    c.teacher.config = "configs/digits_flow_teacher.py"
    return c
