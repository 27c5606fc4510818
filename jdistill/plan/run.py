"""``jdistill plan``: compile a config's steps for a mesh of N host devices, report per device.

    jdistill plan --config configs/dit_xl_guided_imagenet.py --mesh data=4,fsdp=16 --mesh data=16,fsdp=16 \\
        --target v5p --out runs/plans/dit_xl_guided

Each mesh is compiled in a subprocess started with exactly as many CPU devices as the mesh
(``--xla_force_host_platform_device_count``), so the result does not depend on this
process's devices. The subprocess builds the recipe's steps from the config alone
(``Recipe.plan``), compiles each (:func:`jdistill.plan.compile.analyse`) and writes JSON; this
process adds the fit and advice per accelerator (:mod:`jdistill.plan.fit`) and writes
``plan.json`` and ``plan.md``. The compiled code is never run, so the subprocess asks XLA for
its fastest backend settings (memory and cost analyses do not depend on them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from jdistill.errors import InvalidArgument, UserError
from jdistill.plan import fit as fit_lib
from jdistill.plan import report

AXES = ("data", "fsdp", "tensor")
# the code is analysed, never run: skip LLVM's slow optimisations (buffer assignment is unchanged)
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# XLA:CPU hands dot fusions to YNNPACK, whose scratch (an attention's logits, for one) is allocated
# outside XLA's buffer assignment: temp then undercounts what the program allocates (1.2-1.4x, measured
# by tests/measure_step_memory.py). An accelerator's executable holds every intermediate in its temp,
# so plans compile without them.
BUFFER_ASSIGNMENT_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="
USER_ERROR = "jdistill-plan-user-error: "


class PlanFailed(RuntimeError):
    """The compile subprocess died of something that is not the user's input (its output is attached)."""


def parse_mesh(text: str, devices: int | None = None) -> dict[str, int]:
    """``"data=4,fsdp=16[,tensor=2]"`` -> {data, fsdp, tensor}; data may be left out (or -1) when
    ``devices`` says how many there are."""
    sizes = {"data": -1, "fsdp": 1, "tensor": 1}
    for item in filter(None, (s.strip() for s in str(text).split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in AXES:
            raise InvalidArgument(f"--mesh {text!r}: expected items NAME=SIZE with NAME in {', '.join(AXES)}")
        try:
            size = int(value)
        except ValueError:
            raise InvalidArgument(f"--mesh {text!r}: {name}={value!r} is not an integer") from None
        if size < 1 and not (name.strip() == "data" and size == -1):
            raise InvalidArgument(f"--mesh {text!r}: {name} must be >= 1 (data may be -1: what is left)")
        sizes[name.strip()] = size
    rest = sizes["fsdp"] * sizes["tensor"]
    if sizes["data"] == -1:
        if devices is None:
            raise InvalidArgument(f"--mesh {text!r}: give data=D or --devices N")
        if devices % rest:
            raise InvalidArgument(f"--devices {devices}: not a multiple of fsdp x tensor = {rest}")
        sizes["data"] = devices // rest
    n = sizes["data"] * rest
    if devices is not None and devices != n:
        raise InvalidArgument(f"--mesh {text!r} has {n} devices, --devices says {devices}")
    return sizes


def _worker_env(n: int) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}", FAST_COMPILE_FLAGS,
                                 BUFFER_ASSIGNMENT_FLAGS])
    env["JAX_NUM_CPU_DEVICES"] = str(n)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def compile_in_subprocess(config: str | None, overrides, mesh: dict, *, model: dict | None = None, only=(),
                          progress: bool = True) -> dict:
    """The compile of every planned step of ``config`` (or of a preset's sampler step, ``model``: the
    arguments of :func:`jdistill.plan.steps.preset_sampler_call`) for ``mesh``, in a fresh process
    with that many devices."""
    n = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        spec = json.dumps({"config": config, "overrides": list(overrides), "model": model, "mesh": mesh, "out": out,
                           "only": list(only), "progress": progress})
        proc = subprocess.run([sys.executable, "-m", "jdistill.plan.run", "--worker", spec], env=_worker_env(n),
                              stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith(USER_ERROR):
                raise UserError(line[len(USER_ERROR):])
        if proc.returncode != 0 or not os.path.exists(out):
            raise PlanFailed(f"the plan's compile process for mesh {mesh} failed (exit {proc.returncode}):\n"
                             + (proc.stdout or "")[-4000:] + (proc.stderr or "")[-4000:])
        with open(out) as f:
            return json.load(f)


def plan(config: str | None, overrides=(), meshes=("",), *, model: dict | None = None, devices: int | None = None,
         target: str = "v5p", only=(), out_dir: str | None = None, progress: bool = True) -> dict:
    """Plan ``config`` (or the preset sampler step ``model``) on each mesh (the steps named in
    ``only``, default all); returns the report (and writes plan.json / plan.md to ``out_dir``)."""
    acc = fit_lib.get(target)
    if model is None:
        from jdistill import config as config_lib
        from jdistill.recipes import get_recipe

        cfg = config_lib.load_config(config, list(overrides))
        recipe = get_recipe(cfg)
        if recipe.plan is None:
            raise UserError(f"the {recipe.name!r} recipe has no plan yet (its Recipe gives no plan function)")
        name, default_mesh = recipe.name, _config_mesh(cfg)
    else:
        from jdistill.convert import presets

        if presets.find(model["preset"]) is None:
            raise InvalidArgument(f"--model {model['preset']!r}: no such preset; known: {', '.join(presets.PRESETS)}")
        name, default_mesh = "preset sampler step", ""
    runs = []
    for text in meshes:
        mesh = parse_mesh(text or default_mesh, devices)
        result = compile_in_subprocess(config, overrides, mesh, model=model, only=only, progress=progress)
        for step in result["steps"]:
            step["fit"] = {a.name: fit_lib.fit(step, a) for a in fit_lib.ACCELERATORS.values()}
            step["advice"] = fit_lib.advice(step, acc, mesh)
            step["fix"] = fit_lib.fix(step, acc, mesh)
        runs.append(result)
    out = {"config": config or f"--model {model['preset']}", "overrides": list(overrides) if model is None else
           [f"--{k}={v}" for k, v in model.items() if k != "preset" and v is not None],
           "recipe": name, "target": acc.name, "runs": runs}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "plan.json"), "w") as f:
            json.dump(out, f, indent=1)
        with open(os.path.join(out_dir, "plan.md"), "w") as f:
            f.write(report.markdown(out))
    return out


def _config_mesh(cfg) -> str:
    m = cfg.get("mesh") or {}
    return ",".join(f"{a}={int(m[a])}" for a in AXES if a in m)


# -- the compile subprocess ------------------------------------------------------------------

def worker(spec: dict) -> None:
    import jax

    from jdistill import config as config_lib
    from jdistill.plan.compile import analyse
    from jdistill.recipes import get_recipe
    from jdistill.train import mesh as mesh_lib
    from jdistill.train import partitioning

    m = spec["mesh"]
    if spec.get("model"):
        from jdistill.plan.steps import preset_sampler_call

        cfg = {}
        steps = [preset_sampler_call(**spec["model"])]
    else:
        cfg = config_lib.load_config(spec["config"], spec["overrides"])
        steps = get_recipe(cfg).plan(cfg)
    if spec.get("only"):
        unknown = sorted(set(spec["only"]) - {s.name for s in steps})
        if unknown:
            raise InvalidArgument(f"--step {', '.join(unknown)}: this config plans {', '.join(s.name for s in steps)}")
        steps = [s for s in steps if s.name in spec["only"]]
    mesh = mesh_lib.make_mesh(m["data"], m["fsdp"], m["tensor"])
    rules = partitioning.rules_from_config(cfg.get("mesh")) if cfg else None
    results = []
    for i, step in enumerate(steps):
        if spec.get("progress"):
            print(f"[plan {i + 1}/{len(steps)}] {step.name} on {len(jax.devices())} devices {m}: lowering and "
                  "compiling (minutes for a large network)", file=sys.stderr, flush=True)
        results.append(analyse(step, mesh, rules))
        for opt in results[-1]["options"].values():  # can the advice say --config.KEY=VALUE
            section, _, leaf = opt["key"].rpartition(".")
            opt["in_config"] = bool(cfg) and (leaf in (cfg.get(section) or {}) if section else leaf in cfg)
        if spec.get("progress"):
            r = results[-1]
            print(f"[plan {i + 1}/{len(steps)}] {step.name}: compiled in {r['compile_seconds']:.0f} s, peak "
                  f"{report.gib(r['memory']['peak'])} per device", file=sys.stderr, flush=True)
    out = {"mesh": m, "devices": len(jax.devices()), "jax": jax.__version__, "backend": jax.default_backend(),
           "steps": results}
    with open(spec["out"], "w") as f:
        json.dump(out, f)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m jdistill.plan.run --worker SPEC_JSON (started by `jdistill plan`)", file=sys.stderr)
        return 2
    try:
        worker(json.loads(argv[1]))
    except UserError as e:
        print(USER_ERROR + str(e).replace("\n", " "), flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
