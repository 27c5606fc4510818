"""`jdistill plan`: the real steps of the recipes compiled for meshes of many host devices, on
abstract arrays, and the figures it reports checked against a hand count (params, Adam moments,
EMA, frozen teacher, batch), an analytic FLOP count, and a measured run on 8 CPU devices."""

import json
import os
import textwrap

import pytest
from cli_helpers import REPO, run_cli, run_script

from jdistill.errors import InvalidArgument
from jdistill.plan import fit as fit_lib
from jdistill.plan.compile import collectives, hlo_bytes
from jdistill.plan import report
from jdistill.plan import run as plan_run
from jdistill.plan.run import parse_mesh
from jdistill.train.partitioning import MIN_SIZE

GUIDED = os.path.join(REPO, "configs", "dit_xl_guided_imagenet.py")
STITCH = os.path.join(REPO, "configs", "stitch_dit_s_xl.py")


def derived_config(tmp_path, shipped: str, body: str) -> str:
    """A config file that loads a shipped one and changes it in Python (``body`` edits ``c``): a
    network's depth is not a key of the shipped configs, so it cannot be overridden on the command line."""
    path = tmp_path / f"derived_{os.path.basename(shipped)}"
    path.write_text(textwrap.dedent(f"""
        import importlib.util
        _spec = importlib.util.spec_from_file_location("shipped", {shipped!r})
        _shipped = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_shipped)


        def get_config():
            c = _shipped.get_config()
        """) + textwrap.indent(textwrap.dedent(body), "    ") + "    return c\n")
    return str(path)


def run_plan(args, timeout=1800):
    proc = run_cli(["plan", *args], devices=1)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def read_plan(out_dir):
    with open(os.path.join(out_dir, "plan.json")) as f:
        return json.load(f)


# -- the hand counts ------------------------------------------------------------------------------

def dit_elements(d: int, depth: int, classes: int = 1000, patch: int = 2, channels: int = 4, guidance=False):
    """(elements of big leaves, of small leaves) of an original-layout DiT with a learned sigma,
    counted from the architecture (Peebles & Xie): kernels and the label table are big (split by
    fsdp), biases are small (under the partitioner's MIN_SIZE at DiT-XL width: replicated)."""
    out = patch * patch * 2 * channels
    big = (patch * patch * channels * d  # patch embedding (conv)
           + 256 * d + d * d + (classes + 1) * d  # timestep MLP, label table with the null class
           + depth * (6 * d * d + 4 * d * d + 8 * d * d)  # adaLN-Zero, q/k/v/o, MLP 4x
           + 2 * d * d + d * out)  # final adaLN and projection
    small = 3 * d + depth * (6 * d + 4 * d + 4 * d + d) + 2 * d + out
    if guidance:  # the student's guidance embedding: sin-cos features -> MLP
        big, small = big + 256 * d + d * d, small + 2 * d
    return big, small


def assert_split_as_counted(d: int, patch: int = 2, channels: int = 4):
    """At width ``d`` the partitioner splits exactly the leaves dit_elements calls big."""
    out = patch * patch * 2 * channels
    assert max(6 * d, out) < MIN_SIZE <= min(patch * patch * channels * d, d * out)


def dit_forward_flops(d: int, depth: int, tokens: int = 256) -> float:
    """Matmul FLOPs (2 per multiply-add) of one DiT forward pass of one image: per block q/k/v/o
    and the 4x MLP over every token, and attention's two token-by-token products."""
    return depth * (2 * tokens * 12 * d * d + 4 * tokens * tokens * d)


# -- pure pieces ------------------------------------------------------------------------------------

def test_mesh_argument_and_accelerators():
    assert parse_mesh("data=4,fsdp=16") == {"data": 4, "fsdp": 16, "tensor": 1}
    assert parse_mesh("fsdp=8,tensor=2", devices=64) == {"data": 4, "fsdp": 8, "tensor": 2}
    for text, devices, match in (("data=4,fsdp=x", None, "not an integer"), ("pipe=2", None, "NAME=SIZE"),
                                 ("fsdp=16", None, "give data=D or --devices"), ("data=2,fsdp=4", 16, "has 8 devices"),
                                 ("fsdp=3", 16, "not a multiple")):
        with pytest.raises(InvalidArgument, match=match):
            parse_mesh(text, devices)
    assert fit_lib.get("TPU v5p").memory == 95 * 2**30 and fit_lib.get("h200").memory == 141 * 2**30
    with pytest.raises(InvalidArgument, match="unknown accelerator"):
        fit_lib.get("v9")


def test_plan_command_refuses_bad_input_in_one_line(tmp_path, capsys):
    """Named errors before anything compiles: the CLI prints one line and exits 2."""
    from jdistill import cli

    for args, match in ((["--config", GUIDED, "--mesh", "data=4,fsdp=x"], "not an integer"),
                        (["--config", GUIDED, "--model", "sdxl"], "not both"),
                        (["--model", "sdxl"], "--model needs --batch"),
                        (["--model", "no-such-model", "--batch", "8", "--mesh", "data=8"], "no such preset"),
                        (["--config", GUIDED, "--target", "v9"], "unknown accelerator")):
        assert cli.main(["plan", *args, "--out", str(tmp_path), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("jdistill plan: error:") and match in err and "\n" not in err, err


def test_collectives_are_read_from_hlo_text():
    hlo = """
      %all-gather.1 = f32[1152,4608]{1,0} all-gather(f32[288,4608]{1,0} %p), channel_id=1, dimensions={0}
      %ars = (bf16[64]{0}, bf16[64]{0}) all-reduce-start(bf16[64]{0} %x), to_apply=%add
      ROOT %cp = s32[2,3]{1,0} collective-permute(s32[2,3]{1,0} %y), source_target_pairs={{0,1}}
      %fusion = f32[8]{0} fusion(f32[8]{0} %all-gather.1), kind=kLoop
    """
    c = collectives(hlo)
    assert c["all-gather"] == {"count": 1, "bytes": 1152 * 4608 * 4}
    assert c["all-reduce"] == {"count": 1, "bytes": 64 * 2}
    assert c["collective-permute"] == {"count": 1, "bytes": 24}
    assert c["reduce-scatter"]["count"] == c["all-to-all"]["count"] == 0
    assert hlo_bytes("(f32[2,2]{1,0}, pred[])") == 17


def test_fit_advice_and_fix_for_a_step_over_capacity():
    """A step 4 GiB over a v5e's 16 GiB: the fit says by how much, each setting's estimate follows its
    stated assumption, and the fix is the first setting whose estimate fits."""
    state = {"params": 2 * 2**30, "optimizer": 4 * 2**30, "averages": 2 * 2**30, "frozen": 2 * 2**30}
    step = {"memory": {"peak": 20 * 2**30, "temp": 9 * 2**30}, "bytes": dict(state, batch=2**20), "flops": 1.97e12,
            "param_counts": {"trained": {"count": 10, "dtypes": {"float32": 10}}},
            "options": {"param_dtype": {"key": "model.param_dtype", "available": True, "values": ["float32"],
                                        "in_config": True},
                        "remat": {"key": "model.remat", "available": False, "values": []}},
            "batch_per_device": 8}
    v5e = fit_lib.get("v5e")
    f = fit_lib.fit(step, v5e)
    assert not f["fits"] and f["headroom"] == -4 * 2**30 and f["ideal_seconds"] == pytest.approx(0.01)
    advice = {a["setting"]: a for a in fit_lib.advice(step, v5e, {"data": 8, "fsdp": 2, "tensor": 1})}
    assert advice["bf16 params"]["estimated_peak"] == 15 * 2**30 and advice["bf16 params"]["fits"]
    assert advice["bf16 params"]["how"] == "--config.model.param_dtype=bfloat16"
    assert advice["fsdp x2"]["estimated_peak"] == 15 * 2**30 and advice["fsdp x2"]["how"] == "--mesh data=4,fsdp=4"
    assert "fsdp x4" not in advice  # x2 fits already
    assert advice["remat"]["estimated_peak"] is None and "no activation-checkpointing" in advice["remat"]["note"]
    assert advice["half the per-device batch"]["estimated_peak"] == int(15.5 * 2**30)
    assert fit_lib.fix(step, v5e, {"data": 8, "fsdp": 2})["setting"] == "bf16 params"
    assert fit_lib.fix(step, fit_lib.get("v5p"), {"data": 8, "fsdp": 2}) is None  # fits: nothing to fix
    step["options"]["param_dtype"]["available"] = False
    assert fit_lib.fix(step, v5e, {"data": 8, "fsdp": 2})["setting"] == "fsdp x2"
    # a network with remat: the advice names the policy the models take (a boolean is refused by them)
    step["options"]["remat"] = {"key": "model.remat", "available": True, "values": ["none"], "in_config": True}
    advice = {a["setting"]: a for a in fit_lib.advice(step, v5e, {"data": 8, "fsdp": 2, "tensor": 1})}
    assert advice["remat"]["how"] == "--config.model.remat=full"
    assert advice["remat"]["estimated_peak"] == int(15.5 * 2**30)
    step["options"]["remat"]["values"] = ["full"]
    assert "remat" not in {a["setting"] for a in fit_lib.advice(step, v5e, {"data": 8, "fsdp": 2, "tensor": 1})}
    step["batch_per_device"] = 1
    # no data axis to fold into fsdp: the state sharded over twice the devices (20 - 10 / 2 = 15 GiB)
    twice = fit_lib.fix(step, v5e, {"data": 1, "fsdp": 16})
    assert twice["setting"] == "fsdp over twice the devices" and twice["how"] == "--mesh data=1,fsdp=32 --devices 32"
    assert twice["estimated_peak"] == 15 * 2**30
    step["memory"]["peak"] = 30 * 2**30
    assert fit_lib.fix(step, v5e, {"data": 1, "fsdp": 16}) is None  # no setting it knows is enough


# -- jdistill plan, end to end ------------------------------------------------------------------------

@pytest.mark.parametrize("halving", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_plan_guided_dit_xl_width_on_16_devices(tmp_path, halving):
    """Stage 1 (and, slow, a halving) of the DiT-XL/2 ImageNet config, at DiT-XL/2 width and one block
    (the full depth is a slow test below), compiled for 16 devices (data=4, fsdp=4)."""
    d, depth, batch, fsdp = 1152, 1, 256, 4
    config = derived_config(tmp_path, GUIDED, f"""
        c.model.depth = {depth}
        c.train.ema_decay = 0.9999  # an EMA of the student, to count
        c.data.batch_size = {batch}
        """)
    # in-process (the command's parsing is tested above); the compile runs in its own 16-device process
    plan = plan_run.plan(config, meshes=[f"data=4,fsdp={fsdp}"], target="v5e", only=() if halving else ["stage1"],
                         out_dir=str(tmp_path / "plan"), progress=False)
    assert "| stage1 | 16 | data=4,fsdp=4 | 16 |" in report.summary_table(plan)
    assert read_plan(tmp_path / "plan") == json.loads(json.dumps(plan))
    run = plan["runs"][0]
    assert run["devices"] == 16 and run["backend"] == "cpu"
    assert [s["name"] for s in run["steps"]] == ["stage1", "steps_032"][:1 + halving]
    stage1, steps = run["steps"][0], run["steps"]

    # hand count, exact: params x 4 bytes / fsdp (biases replicated), Adam's two moments plus its
    # two int32 step counters and the part's update counter, the EMA, the frozen teacher, the batch
    assert_split_as_counted(d)
    big_s, small_s = dit_elements(d, depth, guidance=True)
    big_t, small_t = dit_elements(d, depth)
    student = 4 * (big_s // fsdp + small_s)
    b = stage1["bytes"]
    assert b["params"] == student
    assert b["optimizer"] == 2 * student + 3 * 4
    assert b["averages"] == student
    assert b["frozen"] == 4 * (big_t // fsdp + small_t)
    assert b["batch"] == batch // 16 * (32 * 32 * 4 * 4 + 4)
    assert sum(b.values()) == stage1["memory"]["argument"]  # what XLA says the arguments take
    assert stage1["param_counts"]["trained"]["count"] == big_s + small_s
    if halving:
        assert steps[1]["bytes"]["frozen"] == student  # a halving's teacher is the previous student

    # FLOPs per device: stage 1 = teacher with CFG (2 passes) + student forward and backward (3);
    # a halving = two DDIM steps of the previous student (2) + the student (3)
    per_device = batch // 16
    for step in steps:
        assert step["flops"] == pytest.approx(5 * per_device * dit_forward_flops(d, depth), rel=0.15)
    # fsdp gathers weights and reduces gradients; the data axis all-reduces
    for step in steps:
        assert step["collectives"]["all-gather"]["count"] > 0, step["collectives"]
        assert step["collectives"]["all-reduce"]["count"] + step["collectives"]["reduce-scatter"]["count"] > 0
        # the blocks pin their activations' batch to (data, fsdp), so the partitioner gathers weights
        # and all-reduces gradients only, never activations (without the pins: 1.09 GiB in stage 1,
        # f32[128,256,4608] per device for one MLP; docs/pod-scale.md)
        assert step["collectives"]["all-reduce"]["bytes"] < 4 * (big_s + small_s), step["collectives"]

    # the fit per accelerator is the peak against its memory; the report has a row for each
    for name, acc in fit_lib.ACCELERATORS.items():
        f = stage1["fit"][name]
        assert f["fits"] == (stage1["memory"]["peak"] <= acc.memory) and f["headroom"] == acc.memory - f["peak"]
    assert stage1["fit"]["v5e"]["fits"] and stage1["fix"] is None
    md = (tmp_path / "plan" / "plan.md").read_text()
    assert all(acc.title in md for acc in fit_lib.ACCELERATORS.values())


@pytest.mark.slow
def test_plan_matches_a_measured_8_device_run(tmp_path):
    """The plan of a small DiT's guided stage 1 on 8 devices against the same step run for real on 8
    CPU devices (tests/measure_step_memory.py): the arguments a device holds are the plan's to the
    byte, the executable that runs has the plan's temp to the byte, and the memory the step
    allocates while it runs (peak RSS over the call minus RSS before, over 8 devices) is within 20%
    of that temp (1.06x at batch 64, 1.05x at 256). Both compile without XLA:CPU's YNNPACK fusions
    (plan.run.BUFFER_ASSIGNMENT_FLAGS): with them the run allocated 1.17-1.38x, their scratch lying
    outside the buffer assignment the plan reads (docs/pod-scale.md)."""
    config = derived_config(tmp_path, GUIDED, """
        c.model.update(hidden_size=384, num_heads=6, depth=1)  # DiT-S width, one block
        c.data.batch_size = 64
        """)
    run_plan(["--config", config, "--mesh", "data=4,fsdp=2", "--step", "stage1", "--out", str(tmp_path / "plan"),
              "--quiet"])
    planned = read_plan(tmp_path / "plan")["runs"][0]["steps"][0]
    proc = run_script("measure_step_memory.py", [config, "stage1", "4", "2", str(tmp_path / "measured.json")],
                      devices=8)
    out, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, out[-4000:]
    with open(tmp_path / "measured.json") as f:
        measured = json.load(f)
    assert measured["argument_bytes_device0"] == planned["memory"]["argument"]
    assert measured["executable_temp"] == planned["memory"]["temp"]
    per_device = measured["step_peak_all_devices"] / 8
    temp = planned["memory"]["temp"]
    assert temp > 64 * 2**20  # large enough that the process's own noise does not matter
    assert per_device == pytest.approx(temp, rel=0.2), (per_device, temp)


@pytest.mark.slow
def test_plan_tstitch_sampler_and_its_models_steps(tmp_path):
    """The T-Stitch config's stitched sampler (one block per model, both at their real widths) for a
    batch over 8 devices, and one step of each model alone: XLA counts each loop body once, so the
    sampler's FLOPs are one step of each model."""
    config = derived_config(tmp_path, STITCH, """
        c.small.model.depth = 1
        c.large.model.depth = 1
        c.sample.steps = 10
        c.plan.batch_size = 64
        """)
    run_plan(["--config", config, "--mesh", "data=8", "--out", str(tmp_path / "plan"), "--quiet"])
    sampler, small, large = read_plan(tmp_path / "plan")["runs"][0]["steps"]
    assert (sampler["name"], small["name"], large["name"]) == ("tstitch", "DiT-S/2 step", "DiT-XL/2 step")
    assert sampler["loops"] == {"DiT 0 steps": 4, "DiT 1 steps": 6}  # fraction 0.4 of 10 steps on DiT-S/2
    assert sampler["batch_per_device"] == 8
    s_big, s_small = dit_elements(384, 1)
    l_big, l_small = dit_elements(1152, 1)
    assert sampler["bytes"]["params"] == 4 * (s_big + s_small + l_big + l_small)  # data parallel: replicated
    for step, d in ((small, 384), (large, 1152)):  # CFG: 2 passes of the per-device batch
        assert step["flops"] == pytest.approx(2 * 8 * dit_forward_flops(d, 1), rel=0.15)
    assert sampler["flops"] == pytest.approx(small["flops"] + large["flops"], rel=0.05)
    assert sampler["fit"]["v5e"]["fits"]


@pytest.mark.slow
def test_plan_full_dit_xl_guided_stage1_on_16_devices(tmp_path):
    """The shipped DiT-XL/2 config as it is (28 blocks, 675M params), stage 1 on 16 devices."""
    run_plan(["--config", GUIDED, "--mesh", "data=4,fsdp=4", "--step", "stage1", "--out", str(tmp_path / "plan"),
              "--quiet"], timeout=7200)
    step = read_plan(tmp_path / "plan")["runs"][0]["steps"][0]
    assert_split_as_counted(1152)
    big_s, small_s = dit_elements(1152, 28, guidance=True)
    big_t, small_t = dit_elements(1152, 28)
    assert big_t + small_t == 674_834_720  # DiT-XL/2 as published (675M)
    assert step["bytes"]["params"] == 4 * (big_s // 4 + small_s)
    assert step["bytes"]["optimizer"] == 2 * step["bytes"]["params"] + 12
    assert step["bytes"]["frozen"] == 4 * (big_t // 4 + small_t)
    assert step["flops"] == pytest.approx(5 * 16 * dit_forward_flops(1152, 28), rel=0.15)
    assert step["fit"]["v5p"]["fits"]


@pytest.mark.slow
def test_plan_sdxl_cfg_denoiser_step(tmp_path):
    """One CFG step of the SDXL UNet (2.6B params) at 128x128 latents, batch 16 on 8 devices: what
    adaptive collaboration's teacher runs per refinement step."""
    run_plan(["--model", "sdxl", "--batch", "16", "--guidance", "5", "--mesh", "data=8", "--out",
              str(tmp_path / "plan"), "--quiet"], timeout=7200)
    step = read_plan(tmp_path / "plan")["runs"][0]["steps"][0]
    assert step["param_counts"]["weights"]["count"] == 2_567_463_684
    assert step["bytes"]["params"] == 4 * 2_567_463_684  # data parallel: every device holds the UNet
    assert step["batch_per_device"] == 2 and step["fit"]["h100"]["fits"]
