"""The training speed path, checked on CPU: the frozen base stored in bf16, fp32 masters under
autocast, the fused optimizer, sync-free clipping and micro-steps, channels_last."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from avatars.configs import tiny_config
from avatars.host_sync import count_host_reads
from avatars.models import DiffusionAvatarsModel
from avatars.testing import synthetic_batch
from avatars.training import TrainConfig
from avatars.training.engine import LossModule, deepspeed_config
from avatars.training.optim import clip_gradients, clipped_parameters, make_optimizer
from avatars.training.performance import (
    channels_last_modules,
    resolve_precision,
    store_frozen,
    to_channels_last,
    use_channels_last,
)
from avatars.training.rendezvous import environment_without_group

CPU = torch.device("cpu")


def _model(**overrides) -> DiffusionAvatarsModel:
    return DiffusionAvatarsModel(tiny_config(**overrides))


def _loss(model: DiffusionAvatarsModel, precision, batch: dict) -> torch.Tensor:
    return LossModule(model, precision)(batch, torch.Generator().manual_seed(0))


def test_precision_resolution():
    assert resolve_precision("auto", CPU).bf16 is False
    assert resolve_precision("auto", torch.device("cuda")).bf16 is True
    assert resolve_precision("bf16", CPU).bf16 is True
    assert resolve_precision("fp32", torch.device("cuda")).bf16 is False
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", CPU)
    assert use_channels_last("auto", torch.device("cuda")) and not use_channels_last("auto", CPU)
    assert use_channels_last("channels_last", CPU) and not use_channels_last("contiguous", torch.device("cuda"))


def test_bf16_stores_the_frozen_base_in_bf16_and_keeps_fp32_masters():
    model = _model()
    assert store_frozen(model, resolve_precision("bf16", CPU)) == ["unet", "vae"]
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"conditioning", "controlnet", "expression_tokens", "expression_layers"}
    # "w/o LDM prior": the UNet is trained, so only the VAE is frozen
    assert store_frozen(_model(use_ldm_prior=False), resolve_precision("bf16", CPU)) == ["vae"]
    assert store_frozen(_model(), resolve_precision("fp32", CPU)) == ["unet", "vae"]  # stays float32
    assert all(p.dtype == torch.float32 for p in _model().parameters())


def test_bf16_step_gives_fp32_gradients_and_a_float32_plane_lookup():
    torch.manual_seed(0)
    reference = _model()
    batch = synthetic_batch(2, 64, 16)
    fp32_loss = _loss(reference, resolve_precision("fp32", CPU), batch)
    model = _model()
    precision = resolve_precision("bf16", CPU)
    store_frozen(model, precision)
    loss = _loss(model, precision, batch)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2%); the loss, a mean over many
    # squared errors, moves far less than 2% (a real path error moves it by O(1))
    assert abs(loss.item() - fp32_loss.item()) <= 0.02 * fp32_loss.item()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32, name
        else:
            assert p.grad is None, name
    # at step 0 only the ControlNet's zero convolutions get a gradient (their output is zero)
    assert model.controlnet.controlnet_mid_block.weight.grad.abs().sum() > 0
    with precision.autocast():
        feats = model.conditioning.features(batch["canonical"], batch["mask"])
        cond = model.conditioning(batch)
    assert feats.dtype == torch.float32 and cond.dtype == torch.float32


def test_clip_gradients_is_the_global_norm_clip_without_host_reads():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(3, 4), (5,), (2, 2, 3)]]
    grads = [torch.randn(p.shape, generator=g) * 3 for p in params]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    norm = torch.cat([gr.flatten() for gr in grads]).norm()
    total, reads = count_host_reads(lambda: clip_gradients(params, 1.0))
    assert reads == [] and torch.is_tensor(total)
    torch.testing.assert_close(total, norm)
    for p, gr in zip(params, grads):
        torch.testing.assert_close(p.grad, gr * (1.0 / (norm + 1e-6)))
    assert torch.cat([p.grad.flatten() for p in params]).norm() <= 1.0 + 1e-5
    for p, gr in zip(params, grads):  # below the threshold nothing changes
        p.grad = gr.clone() * 1e-3
    clip_gradients(params, 1.0)
    assert all(torch.equal(p.grad, gr * 1e-3) for p, gr in zip(params, grads))


def test_optimizer_is_one_fused_adamw_over_the_two_groups():
    model = _model()
    optimizer = make_optimizer(model, 1e-4, 1e-2)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("networks", 1e-4), ("features", 1e-2)]
    assert optimizer.defaults["weight_decay"] == 1e-2  # the official AdamW setting (test_optim.py)
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in clipped_parameters(model, "all")}


def test_channels_last_gives_the_same_loss_and_gradients():
    batch = synthetic_batch(2, 64, 16)
    fp32 = resolve_precision("fp32", CPU)
    a, b = _model(), _model()
    assert to_channels_last(b) == ["unet", "controlnet", "vae"]
    conv = b.controlnet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    loss_a, loss_b = _loss(a, fp32, batch), _loss(b, fp32, batch)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.requires_grad:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-3, atol=1e-5, msg=name)
    # ZeRO 1/2 own the trainable storage: only the frozen networks change layout there
    c = _model()
    assert to_channels_last(c, trainable=False) == ["unet", "vae"]
    assert c.controlnet.conv_in.weight.is_contiguous()


def test_eager_training_keeps_the_vae_nchw_and_compiled_training_converts_it():
    """Eager CUDA group norm is NCHW-only: in the VAE encoder the copies around it cost more than
    NHWC convolutions gain; compiled blocks read NHWC (performance.channels_last_modules)."""
    assert channels_last_modules(compiled=False) == ("unet", "controlnet", "cond_embedding")
    assert channels_last_modules(compiled=True) == ("unet", "controlnet", "vae", "cond_embedding")
    model = _model()
    assert to_channels_last(model, modules=channels_last_modules(compiled=False)) == ["unet", "controlnet"]
    assert model.vae.encoder.conv_in.weight.is_contiguous()
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_deepspeed_runs_an_fp32_engine_without_throughput_timer():
    cfg = TrainConfig(zero_stage=0)
    ds = deepspeed_config(cfg)
    assert ds["bf16"] == {"enabled": False} and "fp16" not in ds
    assert ds["timers"] == {"throughput": {"enabled": False}}
    assert ds["gradient_clipping"] == 0.0  # the trainer clips (sync-free)
    assert deepspeed_config(TrainConfig(zero_stage=2, clip_scope="all"))["gradient_clipping"] == 1.0


MICRO_STEPS = textwrap.dedent("""
    import json, sys, torch
    from avatars.host_sync import count_host_reads, count_host_syncs
    from avatars.models import DiffusionAvatarsModel
    from avatars.testing import synthetic_batch
    from avatars.training import TrainConfig
    from avatars.training.engine import build_engine
    from avatars.training.trainer import init_distributed
    _, world = init_distributed()
    results = {}
    for stage in json.loads(sys.argv[1]):
        cfg = TrainConfig(batch_size=2, zero_stage=stage, precision="bf16", clip_scope="all",
                          memory_format="channels_last")
        model = DiffusionAvatarsModel(cfg.model_config(16))
        trainer = build_engine(cfg, model, world)
        noise = torch.Generator().manual_seed(0)
        batch = {k: (v.to(trainer.device) if torch.is_tensor(v) else v) for k, v in synthetic_batch(2, 64, 16).items()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.micro_step(batch, noise)  # first step: the optimizer state is created
        steps = lambda: [trainer.micro_step(batch, noise) for _ in range(2)]
        if trainer.device.type == "cuda":  # count real host synchronisations
            losses, syncs = count_host_syncs(steps, trainer.device)
            reads = syncs.sites if syncs.count else []
        else:  # count the operations that would synchronise on CUDA
            losses, reads = count_host_reads(steps)
        changed = sorted({n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])})
        cl = model.controlnet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        unet_cl = model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        vae_nchw = model.vae.encoder.conv_in.weight.is_contiguous()
        results[stage] = {"reads": reads, "losses": [float(l) for l in losses], "changed": changed,
                          "clipped": len(trainer.clipped), "cl": cl,
                          "frozen_layouts": [unet_cl, vae_nchw],
                          "dtypes": sorted({str(p.dtype) for p in model.unet.parameters()})}
    print("RESULT" + json.dumps(results))
""")



def test_micro_steps_update_only_the_trainable_parts_and_never_read_device_data(tmp_path):
    """No host reads in a step (on CUDA each would be a host sync): DeepSpeed's fp32 engine, the
    fused AdamW and the clipping leave the step asynchronous. ZeRO 2 clips in DeepSpeed."""
    _check_micro_steps(tmp_path, [0, 2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_micro_steps_never_synchronise(tmp_path):
    """The same on CUDA, counted with torch.cuda.set_sync_debug_mode: zero host syncs per step."""
    _check_micro_steps(tmp_path, [0])


def _check_micro_steps(tmp_path, zero_stages: list[int]) -> None:
    env = environment_without_group()
    proc = subprocess.run([sys.executable, "-c", MICRO_STEPS, json.dumps(zero_stages)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULT", 1)[1])
    for stage in zero_stages:
        out = results[str(stage)]
        assert out["changed"] == ["conditioning", "controlnet", "expression_layers", "expression_tokens"]
        assert out["dtypes"] == ["torch.bfloat16"]
        assert all(v == v and v > 0 for v in out["losses"])
        assert out["frozen_layouts"] == [True, True]  # eager: the UNet NHWC, the VAE NCHW (channels_last_modules)
        if stage == 0:
            assert out["reads"] == [] and out["clipped"] > 0 and out["cl"]
        else:
            assert out["clipped"] == 0 and not out["cl"]  # DeepSpeed clips; its flat fp32 partitions stay NCHW
