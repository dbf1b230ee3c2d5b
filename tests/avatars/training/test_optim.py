"""The official optimizer settings: AdamW weight decay 1e-2, clipping over the ControlNet only; the
learning-rate schedules."""

import pytest
import torch
from _engine_scripts import ENGINE_RESUMES
from fake_engine import fake_engine

from avatars.configs import tiny_config
from avatars.models import DiffusionAvatarsModel
from avatars.training import TrainConfig, train_preset
from avatars.training.engine import deepspeed_config
from avatars.training.optim import COSINE_FLOOR, clip_gradients, clipped_parameters, lr_schedule, make_optimizer


@pytest.fixture(scope="module")
def model():
    return DiffusionAvatarsModel(tiny_config(expression_dim=8))


def test_defaults_are_the_official_settings(model):
    cfg = TrainConfig()
    assert cfg.weight_decay == 1e-2 and cfg.clip_scope == "controlnet" and cfg.grad_clip == 1.0
    paper = train_preset("paper")
    assert paper.weight_decay == 1e-2 and paper.clip_scope == "controlnet"
    opt = make_optimizer(model, 1e-4, 1e-2, cfg.weight_decay)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-2, 1e-2]  # networks and feature planes
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def test_only_the_controlnet_gradient_is_clipped(model):
    controlnet = {id(p) for p in model.controlnet.parameters()}
    clipped = clipped_parameters(model, "controlnet")
    assert {id(p) for p in clipped} == controlnet
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(clipped_parameters(model, "all")) == len(trainable) > len(clipped)
    for p in trainable:  # huge gradients everywhere: only the ControlNet's are scaled down
        p.grad = torch.full_like(p, 10.0)
    clip_gradients(clipped, 1.0)
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in clipped))
    assert abs(float(norm) - 1.0) < 1e-4
    planes = model.conditioning.features.spatial
    assert torch.all(planes.grad == 10.0)
    for p in trainable:
        p.grad = None
    with pytest.raises(ValueError, match="clip scope"):
        clipped_parameters(model, "planes")


def test_without_ldm_prior_the_network_in_the_controlnet_place_is_clipped():
    ablation = DiffusionAvatarsModel(tiny_config(expression_dim=8, use_ldm_prior=False))
    ids = {id(p) for p in clipped_parameters(ablation, "controlnet")}
    assert ids == {id(p) for m in (ablation.unet, ablation.cond_embedding) for p in m.parameters()}


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_2_cannot_clip_the_controlnet_alone(stage):
    """Refused when the options are parsed (it was refused in each trainer's set-up: after the data and base
    stages, and after --resume never had cleared the run); --clip-scope all or --grad-clip 0 is fine."""
    with pytest.raises(ValueError, match=r"clip_scope \(--clip-scope; --train.clip-scope in launch_all\) "
                                         "'controlnet' needs --zero-stage 0.*pass --clip-scope all"):
        TrainConfig(zero_stage=stage)
    TrainConfig(zero_stage=stage, clip_scope="all")
    TrainConfig(zero_stage=stage, grad_clip=0.0)


def test_cosine_schedule_falls_from_each_peak_to_the_floor(model):
    opt = make_optimizer(model, 1e-3, 1e-1)
    assert lr_schedule(opt, "constant", 10) is None  # the official constant rate
    schedule = lr_schedule(opt, "cosine", 10)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        schedule.step()
    lrs.append([g["lr"] for g in opt.param_groups])
    assert lrs[0] == pytest.approx([1e-3, 1e-1])
    assert lrs[-1] == pytest.approx([1e-3 * COSINE_FLOOR, 1e-1 * COSINE_FLOOR])
    assert lrs[5] == pytest.approx([1e-3 * (1 + COSINE_FLOOR) / 2, 1e-1 * (1 + COSINE_FLOOR) / 2])  # halfway
    assert all(a[0] > b[0] for a, b in zip(lrs, lrs[1:]))  # falls at every step
    with pytest.raises(ValueError, match="lr_decay"):
        lr_schedule(opt, "linear", 10)
    with pytest.raises(ValueError, match="lr_decay"):
        train_preset("tiny", lr_decay="linear")


@pytest.mark.xdist_group(ENGINE_RESUMES)
def test_the_cosine_schedule_resumes_where_the_checkpoint_left_it(engine_resumes):
    """DeepSpeed steps the schedule and keeps its state in the checkpoint: a resumed run goes on at
    the rate of the step it resumes from, not at the peak (_engine_scripts.SCHEDULE_RESUME, in a child process)."""
    out = engine_resumes[1]["schedule"]
    assert out["fresh"] == pytest.approx([3e-3, 1e-1])  # the tiny preset's peaks
    assert all(s < f for s, f in zip(out["saved"], out["fresh"]))  # three steps down the cosine
    assert out["loaded"] == pytest.approx(out["saved"], rel=1e-12)
    assert out["next_resumed"] == pytest.approx(out["next"], rel=1e-12)  # the schedule's position too


def _engine(monkeypatch, **options):
    """build_engine(TrainConfig(**options)) on a fresh tiny model with a huge loss (1e3 x the sum of the trainable
    weights); the stand-in engine's step() keeps the gradients the update would apply and steps nothing."""
    return fake_engine(monkeypatch, 1e3, False, **options)


def test_grad_clip_0_leaves_a_huge_gradient_as_it_is(monkeypatch):
    """--grad-clip 0: the micro-step applies the raw gradient (1.0 scales the ControlNet's to norm 1); ZeRO gets 0."""
    clipped = _engine(monkeypatch, grad_clip=1.0)
    clipped.micro_step({}, None)
    controlnet = {n: g for n, g in clipped.engine.applied.items() if n.startswith("controlnet.")}
    assert len(clipped.clipped) == len(controlnet) > 0
    assert torch.sqrt(sum((g.double() ** 2).sum() for g in controlnet.values())).item() == pytest.approx(1.0, rel=1e-4)
    off = _engine(monkeypatch, grad_clip=0.0)
    off.micro_step({}, None)
    assert off.clipped == [] and len(off.engine.applied) == len(clipped.engine.applied)
    assert all(torch.all(g == 1e3) for g in off.engine.applied.values())
    # ZeRO 1/2 clip inside DeepSpeed: 0 turns it off there too, and lifts the ControlNet-only restriction
    zero = _engine(monkeypatch, grad_clip=0.0, zero_stage=1)
    assert zero.engine.config["gradient_clipping"] == 0.0 and zero.clipped == []
    assert deepspeed_config(TrainConfig(zero_stage=1, grad_clip=0.5, clip_scope="all"))["gradient_clipping"] == 0.5


def test_weight_decay_reaches_every_group_and_decays_a_weight_without_gradient(monkeypatch):
    """--weight-decay: every AdamW group of the engine gets it; a step with zero gradients scales each weight by
    1 - lr x decay."""
    trainer = _engine(monkeypatch, weight_decay=0.25, lr_networks=1e-2, lr_features=1e-1)
    optimizer = trainer.engine.optimizer
    assert [(g["name"], g["weight_decay"]) for g in optimizer.param_groups] == [("networks", 0.25), ("features", 0.25)]
    before = {id(p): p.detach().clone() for g in optimizer.param_groups for p in g["params"]}
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for group in optimizer.param_groups:
        for p in group["params"]:
            torch.testing.assert_close(p.detach(), before[id(p)] * (1 - group["lr"] * 0.25), rtol=1e-6, atol=1e-7)
    assert all(before[id(p)].abs().max() > 0 for p in optimizer.param_groups[1]["params"])  # non-zero: decayed


@pytest.mark.parametrize("saved, resumed", [(torch.channels_last, torch.contiguous_format),
                                            (torch.contiguous_format, torch.channels_last)])
def test_a_resume_under_the_other_memory_format_steps_like_one_under_the_same(saved, resumed):
    """Optimizer.load_state_dict keeps the saved moments' strides: after a checkpoint saved under one
    --memory-format was resumed under the other, the fused AdamW paired each moment with the wrong weight element
    (0.095 off after one step at lr 0.1 on the CPU; CUDA's fused kernel refuses it). match_state_layout, which
    checkpoint.load_latest runs, gives the moments their weights' layout."""
    import io

    from avatars.training.optim import match_state_layout

    def trained(fmt):
        w = torch.nn.Parameter(torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(5)).contiguous(
            memory_format=fmt))
        opt = torch.optim.AdamW([w], lr=0.1, fused=True)
        for seed in range(2):
            w.grad = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(seed)).contiguous(
                memory_format=fmt)
            opt.step()
        buf = io.BytesIO()
        torch.save({"w": w.detach(), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        return torch.load(buf)

    def resumed_step(state, fmt, match):
        w = torch.nn.Parameter(state["w"].clone().contiguous(memory_format=fmt))
        opt = torch.optim.AdamW([w], lr=0.1, fused=True)
        opt.load_state_dict(state["opt"])
        if match:
            assert match_state_layout(opt) == 2  # exp_avg and exp_avg_sq
        w.grad = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(9)).contiguous(memory_format=fmt)
        opt.step()
        return w.detach().contiguous()

    expected = resumed_step(trained(resumed), resumed, match=False)  # saved and resumed alike
    assert (resumed_step(trained(saved), resumed, match=False) - expected).abs().max() > 1e-3  # the fault
    torch.testing.assert_close(resumed_step(trained(saved), resumed, match=True), expected)
