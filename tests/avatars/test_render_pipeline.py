"""The fast render pipeline (Serve's): buckets and padding, precision, compile, fixed noise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from avatars.configs import tiny_config
from avatars.host_sync import count_host_reads
from avatars.models import DiffusionAvatarsModel
from avatars.pipelines import AvatarPipeline, RenderOptions, RenderPipeline
from avatars.pipelines.cuda_graph import GraphedCall, check_inputs
from avatars.pipelines.render_pipeline import bucket_for, pad_batch
from avatars.testing import activate_zero_layers, synthetic_batch

STEPS = 3


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model(**overrides):
    return activate_zero_layers(DiffusionAvatarsModel(tiny_config(**overrides)))


def _frames(n):
    batch = synthetic_batch(n, seed=n)
    return {k: batch[k] for k in ("mask", "depth", "normals", "canonical", "expression")}


def _take(batch, index):
    return {k: v[index] for k, v in batch.items()}


def test_buckets_and_padding():
    assert RenderOptions().buckets(8) == (1, 2, 4, 8)
    assert RenderOptions().buckets(6) == (1, 2, 4, 6)
    assert RenderOptions().buckets(1) == (1,)
    assert RenderOptions(batch_buckets=(8, 3, 3)).buckets(16) == (3, 8)
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_for(9, (1, 2, 4, 8))
    batch = _frames(3)
    padded = pad_batch(batch, 5)
    assert padded["mask"].shape[0] == 5
    assert torch.equal(padded["canonical"][:3], batch["canonical"])
    assert torch.equal(padded["expression"][3], batch["expression"][2])
    assert torch.equal(padded["expression"][4], batch["expression"][2])
    assert pad_batch(batch, 3) is batch
    with pytest.raises(ValueError, match="pad"):
        pad_batch(batch, 2)
    for bad in (dict(precision="fp16"), dict(compile="yes"), dict(batch_buckets=(0,)), dict(decode_chunk=0),
                dict(cuda_graphs="yes"), dict(cuda_graphs="on", compile="on")):
        with pytest.raises(ValueError):
            RenderOptions(**bad)


def test_cuda_graphs_are_on_for_cuda_when_nothing_compiles():
    """compile's reduce-overhead mode records its own graphs: the two never stack."""
    assert not RenderOptions().graphs_on("cuda") and RenderOptions().compiles_on("cuda")  # the default: compile
    assert RenderOptions(compile="off").graphs_on("cuda")
    graphs = RenderOptions(cuda_graphs="on")  # an explicit "on" takes compile's "auto" off
    assert graphs.graphs_on("cuda") and not graphs.compiles_on("cuda")
    assert not RenderOptions(compile="off", cuda_graphs="off").graphs_on("cuda")
    assert not RenderOptions(compile="off").graphs_on("cpu")  # auto: never off CUDA
    with pytest.raises(ValueError, match="needs a CUDA device"):
        RenderPipeline(_model(), RenderOptions(cuda_graphs="on"))


def test_a_graph_refuses_inputs_it_was_not_recorded_for():
    """The check every replay makes first (a broadcastable input would otherwise be copied into the
    recorded one silently); the recording itself needs CUDA (the gpu test below)."""
    recorded = [torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long)]
    check_inputs(recorded, [torch.ones(2, 4, 8, 8), torch.ones(2, dtype=torch.long)])
    with pytest.raises(ValueError, match="expected 2 inputs, got 1"):
        check_inputs(recorded, recorded[:1])
    with pytest.raises(ValueError, match=r"input 0 is \(1, 4, 8, 8\).*recorded for \(2, 4, 8, 8\)"):
        check_inputs(recorded, [torch.zeros(1, 4, 8, 8), recorded[1]])
    with pytest.raises(ValueError, match="input 1 is .*torch.int32"):
        check_inputs(recorded, [recorded[0], torch.zeros(2, dtype=torch.int32)])
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="need a CUDA device"):
            GraphedCall(lambda x: x, [torch.zeros(1)])


def test_equals_the_plain_pipeline_on_the_padded_batch():
    """fp32 on CPU: the render pipeline computes exactly what AvatarPipeline computes for the
    padded batch (same conditioning, sampler, noise and decode)."""
    model = _model()
    plain = AvatarPipeline(model)
    batch = _frames(3)
    expected = plain(pad_batch(batch, 4), num_inference_steps=STEPS, seeds=[4, 5, 6, 6])
    fast = RenderPipeline(model, RenderOptions(batch_buckets=(4,)))
    assert fast.dtype == torch.float32 and not fast.compiled
    out = fast(batch, num_inference_steps=STEPS, seeds=[4, 5, 6])
    assert out.shape == (3, 3, 64, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected[:3], rtol=0, atol=0)


def test_single_pass_ablation_equals_the_plain_pipeline():
    """w/o diffusion: both pipelines read the one pass the same way (DiffusionAvatarsModel.single_pass)."""
    model = _model(use_diffusion=False)
    batch = _frames(2)
    out = RenderPipeline(model, RenderOptions(batch_buckets=(2,)))(batch)
    torch.testing.assert_close(out, AvatarPipeline(model)(batch), rtol=0, atol=0)
    # no host read in the pass, not even of the schedule (training moves it to the device: on CUDA a read would be
    # a sync, which a CUDA graph's capture refuses)
    cond = torch.zeros(2, 1, 8, 8)
    latents, reads = count_host_reads(lambda: model.single_pass(lambda x, t, c: x + 1.0, cond, (4, 8, 8)))
    assert reads == [] and torch.equal(latents, torch.full((2, 4, 8, 8), model.single_pass_latents(torch.ones(1))[0]))


@pytest.mark.parametrize("diffusion", [True, False])
def test_both_pipelines_render_with_the_configs_conditioning_scale(diffusion):
    """Every denoising call of a render gets ``render_conditioning_scale`` (the tiny preset's 1.4 when sampling,
    1 for the single pass); a render at another scale differs, so the check can fail."""
    model = _model(use_diffusion=diffusion)
    denoise, seen = model.denoise, []

    def spy(*args, conditioning_scale=1.0, **kwargs):
        seen.append(conditioning_scale)
        return denoise(*args, conditioning_scale=conditioning_scale, **kwargs)

    model.denoise = spy
    batch = _frames(2)
    plain = AvatarPipeline(model)(batch, num_inference_steps=STEPS)
    fast = RenderPipeline(model, RenderOptions(batch_buckets=(2,)))(batch, num_inference_steps=STEPS)
    calls = 2 * (STEPS if diffusion else 1)
    assert seen == [1.4 if diffusion else 1.0] * calls
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)
    if diffusion:
        model.config = dataclasses.replace(model.config, conditioning_scale=1.0)
        assert (AvatarPipeline(model)(batch, num_inference_steps=STEPS) - plain).abs().max() > 1e-3


def test_a_frame_renders_bit_for_bit_alone_or_in_a_batch():
    pipe = RenderPipeline(_model(), RenderOptions(batch_buckets=(4,)))
    batch = _frames(4)
    seeds = [3, 9, 3, 1]
    together = pipe(batch, num_inference_steps=STEPS, seeds=seeds)
    for i, seed in enumerate(seeds):
        alone = pipe(_take(batch, slice(i, i + 1)), num_inference_steps=STEPS, seeds=seed)
        torch.testing.assert_close(alone[0], together[i], rtol=0, atol=0)
    # several buckets: a frame alone runs at bucket 1, in the batch at bucket 4 (kernel rounding only)
    pipe.buckets = RenderOptions().buckets(4)
    alone = pipe(_take(batch, slice(1, 2)), num_inference_steps=STEPS, seeds=9)
    torch.testing.assert_close(alone[0], together[1], rtol=0, atol=1e-5)


def test_large_calls_are_split_across_buckets():
    pipe = RenderPipeline(_model(), RenderOptions(batch_buckets=(1, 2)))
    batch = _frames(5)
    out = pipe(batch, num_inference_steps=2, seeds=[0, 1, 2, 3, 4])
    assert out.shape[0] == 5
    second = pipe(_take(batch, slice(2, 4)), num_inference_steps=2, seeds=[2, 3])
    torch.testing.assert_close(out[2:4], second, rtol=0, atol=0)


def test_decode_chunks_and_samplers():
    model = _model()
    batch = _frames(4)
    whole = RenderPipeline(model, RenderOptions(batch_buckets=(4,)))(batch, num_inference_steps=2)
    chunked = RenderPipeline(model, RenderOptions(batch_buckets=(4,), decode_chunk=1))(batch, num_inference_steps=2)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    pipe = RenderPipeline(model, RenderOptions(batch_buckets=(1, 2)))
    for sampler in ("ddim", "dpm"):
        out = pipe(_take(batch, slice(0, 2)), num_inference_steps=3, sampler=sampler, seeds=[1, 1])
        plain = AvatarPipeline(model)(_take(batch, slice(0, 2)), num_inference_steps=3, sampler=sampler, seeds=1)
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
    with pytest.raises(KeyError, match="expression"):
        pipe({k: v for k, v in batch.items() if k != "expression"})


def test_bf16_weights_render_close_to_fp32():
    batch = _frames(2)
    reference = RenderPipeline(_model(), RenderOptions(batch_buckets=(2,)))(batch, num_inference_steps=STEPS)
    pipe = RenderPipeline(_model(), RenderOptions(precision="bf16", batch_buckets=(2,)))
    model = pipe.model
    assert model.unet.dtype == model.controlnet.dtype == model.vae.dtype == torch.bfloat16
    assert model.conditioning.features.spatial.dtype == torch.float32  # the lookup stays float32
    out = pipe(batch, num_inference_steps=STEPS)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - reference).abs().mean() < 0.05


def test_the_ddpm_render_reads_nothing_from_the_device():
    pipe = RenderPipeline(_model(), RenderOptions(batch_buckets=(2,)))
    batch = _frames(2)
    pipe(batch, num_inference_steps=STEPS)  # noise drawn and cached
    _, reads = count_host_reads(lambda: pipe(batch, num_inference_steps=STEPS))
    assert reads == []


def _compiled_matches_eager(backend: str, buckets: tuple[int, ...]):
    import torch._dynamo

    torch._dynamo.reset()
    model = _model()
    eager = RenderPipeline(model, RenderOptions(batch_buckets=buckets))
    batch = _frames(buckets[-1])
    expected = {b: eager(_take(batch, slice(0, b)), num_inference_steps=2, seeds=list(range(b))) for b in buckets}
    pipe = RenderPipeline(model, RenderOptions(compile="on", batch_buckets=buckets), compile_backend=backend)
    assert pipe.compiled
    pipe.warm_up(64, 64, num_inference_steps=2)
    with torch._dynamo.config.patch(error_on_recompile=True):  # warm_up compiled every bucket
        for b in buckets:
            out = pipe(_take(batch, slice(0, b)), num_inference_steps=2, seeds=list(range(b)))
            torch.testing.assert_close(out, expected[b], rtol=0, atol=2e-5)
        for b in buckets:  # a partial batch is padded to its bucket: still no compilation
            if b > 1:
                pipe(_take(batch, slice(0, b - 1)), num_inference_steps=2)
    torch._dynamo.reset()


def test_compiled_path_equals_eager_and_warm_up_covers_every_bucket():
    """torch.compile's graph capture (the aot_eager backend: fast on CPU) of the denoising step,
    including the expression tokens the attention hooks read, across buckets."""
    _compiled_matches_eager("aot_eager", (1, 2, 4))


@pytest.mark.slow
def test_inductor_compiled_path_equals_eager():
    """The real compiler (inductor: C++ kernels on the CPU). Its kernels are scalar C++ here: what this
    checks is inductor's lowering, fusion and buffer reuse of the step, which a GPU shares (its kernels
    are Triton, not C++); vectorised C++ took twice as long to compile on the 2-core CI machine. (g++ at -O0 -g,
    `aot_inductor.debug_compile`, was no faster: 80 and 68 s against 76 and 63 s at -O3, alternated with cold
    caches on the idle machine, 2026-11-30.)"""
    import torch._inductor.config

    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        _compiled_matches_eager("inductor", (2,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_render_is_bf16_compiled_and_never_syncs():
    """On CUDA the defaults are bf16 weights and a compiled step with CUDA graphs; after warm-up a
    render neither compiles nor waits for the GPU, and stays close to the float32 eager render."""
    import torch._dynamo

    from avatars.host_sync import count_host_syncs

    torch._dynamo.reset()
    reference = RenderPipeline(_model().cuda(), RenderOptions(precision="fp32", compile="off", cuda_graphs="off",
                                                              batch_buckets=(1, 4)))
    pipe = RenderPipeline(_model().cuda(), RenderOptions(batch_buckets=(1, 4)))
    assert pipe.dtype == torch.bfloat16 and pipe.compiled
    pipe.warm_up(64, 64, num_inference_steps=STEPS)
    batch = {k: v.cuda() for k, v in _frames(4).items()}
    seeds = [0, 1, 2, 3]
    with torch._dynamo.config.patch(error_on_recompile=True):
        pipe(batch, num_inference_steps=STEPS, seeds=seeds)  # draws the new seeds' noise
        out, syncs = count_host_syncs(lambda: pipe(batch, num_inference_steps=STEPS, seeds=seeds), "cuda")
        alone = pipe(_take(batch, slice(1, 2)), num_inference_steps=STEPS, seeds=1)
        partial = pipe(_take(batch, slice(0, 3)), num_inference_steps=STEPS, seeds=seeds[:3])
    assert syncs.count == 0, syncs.sites
    expected = reference(batch, num_inference_steps=STEPS, seeds=seeds)
    assert (out - expected).abs().mean() < 0.02
    assert (alone[0] - out[1]).abs().mean() < 0.02
    torch.testing.assert_close(partial, out[:3], rtol=0, atol=0)  # same bucket: bit-for-bit
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_render_equals_eager_bit_for_bit():
    """A recorded bucket replays the eager kernels: the same frames bit for bit, for every bucket,
    call after call with new inputs (an earlier result is not overwritten by a later replay), no
    recording after the warm-up and no host sync; the single pass too; DDIM stays eager. Two models
    (two persons of a replica) record into the process's one memory pool: the first one's graphs
    still render right after the second one's were recorded and replayed."""
    from avatars.host_sync import count_host_syncs

    pipelines = []
    for overrides in ({}, {"use_diffusion": False}):
        model = _model(**overrides).cuda()
        eager = RenderPipeline(model, RenderOptions(compile="off", cuda_graphs="off", batch_buckets=(1, 4)))
        graphed = RenderPipeline(model, RenderOptions(compile="off", batch_buckets=(1, 4)))  # the same weights
        assert graphed.graphed and not eager.graphed and not graphed.compiled
        graphed.warm_up(64, 64, num_inference_steps=STEPS)
        assert len(graphed._graphs) == 2
        pipelines.append((graphed, eager))
        first, second = ({k: v.cuda() for k, v in _frames(n).items()} for n in (4, 3))

        def both(batch, seeds):
            return [pipe(batch, num_inference_steps=STEPS, seeds=seeds) for pipe in (graphed, eager)]

        out_first, expected_first = both(first, [0, 1, 2, 3])
        kept = out_first.clone()
        seeds = [5, 6, 7]
        graphed(second, num_inference_steps=STEPS, seeds=seeds)  # noise drawn
        out_second, syncs = count_host_syncs(lambda: graphed(second, num_inference_steps=STEPS, seeds=seeds), "cuda")
        assert syncs.count == 0, syncs.sites
        assert len(graphed._graphs) == 2  # nothing recorded on a live call
        assert torch.equal(out_first, kept)  # not overwritten by the later replays
        torch.testing.assert_close(out_first, expected_first, rtol=0, atol=0)
        torch.testing.assert_close(out_second, eager(second, num_inference_steps=STEPS, seeds=seeds), rtol=0, atol=0)
        alone, expected_alone = both(_take(first, slice(1, 2)), 1)
        torch.testing.assert_close(alone, expected_alone, rtol=0, atol=0)
        if model.config.use_diffusion:  # DDIM: eager through diffusers' scheduler, nothing recorded
            ddim = graphed(first, num_inference_steps=STEPS, sampler="ddim", seeds=0)
            torch.testing.assert_close(ddim, eager(first, num_inference_steps=STEPS, sampler="ddim", seeds=0),
                                       rtol=0, atol=0)
            assert len(graphed._graphs) == 2
    (graphed, eager), _ = pipelines  # the diffusion model's graphs, after the single pass's used the pool
    frames = {k: v.cuda() for k, v in _frames(4).items()}
    torch.testing.assert_close(graphed(frames, num_inference_steps=STEPS, seeds=[9, 8, 7, 6]),
                               eager(frames, num_inference_steps=STEPS, seeds=[9, 8, 7, 6]), rtol=0, atol=0)


def test_decode_chunk_is_the_most_frames_the_vae_decodes_at_once(monkeypatch):
    """RenderOptions.decode_chunk (--renderer.pipeline.decode-chunk) 2: a bucket of 5 frames is decoded as
    2 + 2 + 1; the default (8) decodes the 5 at once."""
    batch = _frames(5)
    chunks = {}
    for options in (RenderOptions(batch_buckets=(5,), decode_chunk=2), RenderOptions(batch_buckets=(5,))):
        pipe = RenderPipeline(_model(), options)
        decode, sizes = pipe.model.decode_latents, []
        monkeypatch.setattr(pipe.model, "decode_latents", lambda latents: sizes.append(latents.shape[0])
                            or decode(latents))
        assert pipe(batch, num_inference_steps=1).shape[0] == 5
        chunks[options.decode_chunk] = sizes
    assert chunks == {2: [2, 2, 1], 8: [5]}
