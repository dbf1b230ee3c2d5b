"""The renderer service: FrameRenderer (no Ray), and the Ray Serve deployment: the options it gives Serve and a
replica built without Ray, then served on an embedded Ray."""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.request

import numpy as np
import pytest
import torch

from avatars.configs import RenderOptions, tiny_config
from avatars.models import DiffusionAvatarsModel
from avatars.pipelines import AvatarPipeline
from cluster.serve.renderer import FrameRenderer, RendererConfig, RenderRequest

EXPR_DIM = 10
STEPS = 2


def make_model_dir(path, expression_dim=EXPR_DIM, init_seed=0):
    DiffusionAvatarsModel(tiny_config(expression_dim=expression_dim, init_seed=init_seed)).save_pretrained(path)
    return path


def make_requests(n, seed_of=lambda i: 0, size=64, dim=EXPR_DIM, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[:size, :size] / size
        mask = (((yy - 0.5) ** 2 + (xx - 0.5) ** 2) < (0.3 + 0.05 * rng.random()) ** 2).astype(np.float32)[None]
        normals = rng.standard_normal((3, size, size)).astype(np.float32)
        normals /= np.linalg.norm(normals, axis=0, keepdims=True)
        out.append(RenderRequest(
            mask=mask, depth=(1.0 + 0.1 * rng.random((1, size, size), dtype=np.float32)) * mask,
            normals=normals * mask, canonical=rng.uniform(-1, 1, (5, size, size)).astype(np.float32) * mask,
            expression=rng.standard_normal(dim).astype(np.float32), seed=seed_of(i), key=f"frame{i}"))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return make_model_dir(tmp_path_factory.mktemp("avatar") / "model")


def test_frame_renderer_batch_equals_alone_and_pipeline(model_dir):
    renderer = FrameRenderer(model_dir, RendererConfig(num_inference_steps=STEPS, device="cpu"))
    reqs = make_requests(5, seed_of=lambda i: i % 2)
    batched = renderer.render(reqs)
    assert [r.batch_size for r in batched] == [5] * 5 and [r.key for r in batched] == [q.key for q in reqs]
    for q, b in zip(reqs, batched):
        alone = renderer.render([q])[0]
        assert alone.batch_size == 1 and alone.image.shape == (64, 64, 3)
        np.testing.assert_allclose(alone.image, b.image, atol=1e-4)
    # the same as the pipeline's own default noise for that seed (fixed noise per video) ...
    q = reqs[3]
    batch = {k: torch.from_numpy(getattr(q, k))[None] for k in ("mask", "depth", "normals", "canonical", "expression")}
    ref = AvatarPipeline(renderer.model)(batch, num_inference_steps=STEPS, seeds=q.seed)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ref, batched[3].image, atol=1e-4)
    # ... and the seed matters (so the equality above is not trivially true)
    other = renderer.render([RenderRequest(**{**q.__dict__, "seed": 7})])[0]
    assert np.abs(other.image - batched[3].image).max() > 1e-2


def test_frame_renderer_with_one_bucket_is_bit_for_bit_independent_of_batching(model_dir):
    config = RendererConfig(num_inference_steps=STEPS, device="cpu", max_batch_size=4,
                            pipeline=RenderOptions(batch_buckets=(4,)))
    renderer = FrameRenderer(model_dir, config)
    reqs = make_requests(3, seed_of=lambda i: i)
    batched = renderer.render(reqs)
    for q, b in zip(reqs, batched):
        np.testing.assert_array_equal(renderer.render([q])[0].image, b.image)


def test_frame_renderer_renders_with_its_configured_sampler(model_dir):
    """RendererConfig.sampler reaches the pipeline: DDIM renders equal the pipeline's DDIM, not its DDPM."""
    renderer = FrameRenderer(model_dir, RendererConfig(num_inference_steps=STEPS, sampler="ddim", device="cpu"))
    q = make_requests(1, seed_of=lambda i: 5)[0]
    image = renderer.render([q])[0].image
    batch = {k: torch.from_numpy(getattr(q, k))[None] for k in ("mask", "depth", "normals", "canonical", "expression")}
    pipe = AvatarPipeline(renderer.model)
    for sampler, same in (("ddim", True), ("ddpm", False)):
        ref = pipe(batch, num_inference_steps=STEPS, sampler=sampler, seeds=q.seed)[0].permute(1, 2, 0).numpy()
        assert (np.abs(ref - image).max() < 1e-4) == same, sampler
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'; choose one of \('ddpm', 'ddim', 'dpm'\)"):
        RendererConfig(sampler="euler")


def test_frame_renderer_rejects_bad_requests(model_dir, tmp_path):
    renderer = FrameRenderer(model_dir, RendererConfig(num_inference_steps=STEPS, device="cpu"))
    with pytest.raises(ValueError, match=r"expression must be \(10,\)"):
        renderer.render(make_requests(1, dim=7))
    with pytest.raises(ValueError, match="buffers are 32x32 but the avatar renders 64x64"):
        renderer.render(make_requests(1, size=32))
    with pytest.raises(FileNotFoundError, match="no trained avatar"):
        FrameRenderer(tmp_path / "missing", RendererConfig())
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        RendererConfig(max_batch_size=16, max_ongoing_requests=5)


def _bad(req: RenderRequest, **changes) -> RenderRequest:
    return RenderRequest(**{**req.__dict__, **changes, "key": "bad:" + ",".join(changes)})


def bad_requests(good: RenderRequest) -> list[tuple[RenderRequest, str]]:
    """Requests that each break one rule, with the error each must get."""
    nan_expr, inf_depth = good.expression.copy(), good.depth.copy()
    nan_expr[3], inf_depth[0, 5, 5] = np.nan, np.inf
    return [
        (_bad(good, depth=good.depth.astype(np.float64)), "depth must be float32, got float64"),
        (_bad(good, seed=2**64), r"seed must lie in \[0, 2\*\*64 - 1\]"),
        (_bad(good, seed=-1), "seed must lie in"),
        (_bad(good, seed=1.5), "seed must be an int, got float"),
        (_bad(good, normals=None), "normals must be a numpy array, got NoneType"),
        (_bad(good, canonical=good.canonical.tolist()), "canonical must be a numpy array, got list"),
        (_bad(good, expression={"a": 1}), "expression must be a numpy array, got dict"),
        (_bad(good, expression=nan_expr), "expression holds 1 NaN or inf values"),
        (_bad(good, depth=inf_depth), "depth holds 1 NaN or inf values"),
        (_bad(good, depth=-good.depth), r"depth values must lie in \[0, inf\]"),
        (_bad(good, canonical=good.canonical * 3), r"canonical values must lie in \[-1.001, 1.001\]"),
        (_bad(good, mask=good.mask * 0.5), "mask must hold only 0 and 1"),
        (_bad(good, mask=good.mask[0]), r"mask must be \(1, H, W\)"),
    ]


def test_each_bad_request_gets_its_own_error(model_dir):
    """Validation runs per request before batching: every rule names the request and the field."""
    renderer = FrameRenderer(model_dir, RendererConfig(num_inference_steps=STEPS, device="cpu"))
    good = make_requests(1)[0]
    renderer.check(good)
    for bad, message in bad_requests(good):
        with pytest.raises(ValueError, match=rf"request 'bad:.*': {message}"):
            renderer.check(bad)
    with pytest.raises(ValueError, match="must be a RenderRequest, got dict"):
        renderer.check({"mask": good.mask})


@pytest.fixture(scope="module")
def serve_ray():
    ray = pytest.importorskip("ray")
    from ray import serve

    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # address="local": a Ray of its own; without it ray.init joins the newest Ray started on the machine, e.g.
    # the multi-node test's cluster that the other test worker may be running (cluster.ray_connect does the same)
    ray.init(address="local", num_cpus=2, num_gpus=0, object_store_memory=200 * 2**20, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield ray
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _metric(text: str, name: str, person: str) -> float:
    m = re.search(rf'^{re.escape(name)}\{{person="{person}"\}} ([0-9.e+-]+)$', text, re.M)
    assert m, f"{name} missing in:\n{text}"
    return float(m.group(1))


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_serve_batches_concurrent_requests(serve_ray, model_dir):
    from cluster.serve import delete_renderer, deploy_renderer, person_handle

    config = RendererConfig(num_inference_steps=STEPS, max_batch_size=8, batch_wait_timeout_s=0.5,
                            num_cpus=1, device="cpu", metrics_port=19500)
    handle = person_handle(deploy_renderer({"p0": model_dir}, config), "p0")
    try:
        info = handle.info.remote().result()
        assert info == {**info, "person": "p0", "resolution": 64, "expression_dim": EXPR_DIM}
        reqs = make_requests(8, seed_of=lambda i: 3)
        responses = [handle.remote(q) for q in reqs]  # concurrent: all in flight before any result
        batched = [r.result(timeout_s=120) for r in responses]
        assert [r.key for r in batched] == [q.key for q in reqs]
        assert max(r.batch_size for r in batched) > 1, [r.batch_size for r in batched]

        # one at a time: each frame alone, identical to its batched render (fixed noise per video)
        alone = [handle.remote(q).result(timeout_s=60) for q in reqs[:3]]
        assert [r.batch_size for r in alone] == [1, 1, 1]
        for a, b in zip(alone, batched):
            np.testing.assert_allclose(a.image, b.image, atol=1e-4)

        # Prometheus metrics of the replica: frames, batch sizes, latency histogram, queue drained
        text = handle.metrics_text.remote().result()
        assert _metric(text, "da_render_frames_total", "p0") == 11
        assert _metric(text, "da_render_batch_size_sum", "p0") == 11
        assert _metric(text, "da_render_batch_size_count", "p0") < 11  # fewer batches than frames
        assert _metric(text, "da_render_request_latency_seconds_count", "p0") == 11
        assert _metric(text, "da_render_queue_length", "p0") == 0
        assert _metric(text, "da_render_frames_per_second", "p0") > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/metrics", timeout=10) as resp:
            assert 'da_render_frames_total{person="p0"} 11.0' in resp.read().decode()

        # requests cancelled while they wait for their batch (a failed person's frames: the driver cancels them)
        # leave the queue: while the first batch renders, the next 8 wait in the replica's batcher and are cancelled
        first = [handle.remote(q) for q in reqs]
        cancelled = [handle.remote(q) for q in reqs]
        time.sleep(0.1)  # in the replica, behind the first batch (it renders for ~1 s)
        for r in cancelled:
            r.cancel()
        assert all(r.result(timeout_s=120).image.shape == (64, 64, 3) for r in first)
        deadline = time.time() + 30
        while _metric(handle.metrics_text.remote().result(), "da_render_queue_length", "p0") != 0:
            assert time.time() < deadline, "cancelled requests are still counted as waiting"
            time.sleep(0.2)

        # a malformed request fails alone with a clear error
        with pytest.raises(Exception, match=r"expression must be \(10,\)"):
            handle.remote(make_requests(1, dim=4)[0]).result(timeout_s=60)

        # bad requests sent concurrently with good ones: each bad one fails alone, the good ones
        # render (in shared batches) exactly as before
        bad = bad_requests(reqs[0])[:4]
        mixed = [handle.remote(q) for pair in zip(reqs[:4], [b for b, _ in bad]) for q in pair]
        for i, response in enumerate(mixed):
            if i % 2 == 0:
                np.testing.assert_allclose(response.result(timeout_s=60).image, batched[i // 2].image, atol=1e-4)
            else:
                with pytest.raises(Exception, match=bad[i // 2][1]):
                    response.result(timeout_s=60)
    finally:
        delete_renderer()


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_one_application_serves_every_person_and_a_bad_one_fails_alone(serve_ray, model_dir, tmp_path):
    """Two persons' avatars on one replica (one process: its imports paid once) render exactly
    what each renders alone without Serve; a person whose checkpoint is missing or corrupt fails
    with its name, folder and cause, and the others render on."""
    from cluster.serve import ModelLoadError, delete_renderer, deploy_renderer, person_handle

    other = make_model_dir(tmp_path / "p1", init_seed=1)
    corrupt = make_model_dir(tmp_path / "corrupt", init_seed=2)
    (corrupt / "controlnet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a checkpoint")
    models = {"p0": model_dir, "p1": other, "corrupt": corrupt, "missing": tmp_path / "missing"}
    config = RendererConfig(num_inference_steps=STEPS, max_batch_size=4, batch_wait_timeout_s=0.2, num_cpus=1,
                            device="cpu", pipeline=RenderOptions(batch_buckets=(4,)))  # one bucket: bit for bit
    reqs = make_requests(6, seed_of=lambda i: i % 2)
    handle = deploy_renderer(models, config, name="avatars-test", max_models_per_replica=2)
    try:
        infos = {p: person_handle(handle, p).info.remote().result(timeout_s=120) for p in ("p0", "p1")}
        assert infos["p0"]["pid"] == infos["p1"]["pid"]  # one replica process serves both persons
        # both persons' frames in flight at once, interleaved: Serve batches each person's apart
        sent = [(p, q, person_handle(handle, p).remote(q)) for q in reqs for p in ("p0", "p1")]
        served = {(p, q.key): r.result(timeout_s=120) for p, q, r in sent}
        assert max(r.batch_size for r in served.values()) > 1
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the replica's (num_cpus 1): kernels then reduce in the same order
        try:
            for person, folder in (("p0", model_dir), ("p1", other)):
                alone = FrameRenderer(folder, config)  # the single-person path, no Ray
                for q in reqs:
                    np.testing.assert_array_equal(served[person, q.key].image, alone.render([q])[0].image)
        finally:
            torch.set_num_threads(threads)
        assert np.abs(served["p0", "frame0"].image - served["p1", "frame0"].image).max() > 1e-2  # two avatars

        for person, cause in (("corrupt", "diffusion_pytorch_model.safetensors|header|deserializ"),
                              ("missing", "config.json missing")):
            for call in (lambda h: h.info.remote(), lambda h: h.remote(reqs[0])):
                with pytest.raises(ModelLoadError, match=re.escape(f"person {person} from {models[person]}")) as e:
                    call(person_handle(handle, person)).result(timeout_s=60)
                assert re.search(cause, str(e.value)), str(e.value)
        with pytest.raises(Exception, match="not a person of this renderer"):
            person_handle(handle, "nobody").info.remote().result(timeout_s=60)
        again = person_handle(handle, "p0").remote(reqs[1]).result(timeout_s=60)
        np.testing.assert_array_equal(again.image, served["p0", reqs[1].key].image)
    finally:
        delete_renderer("avatars-test")


def test_renderer_base_model_overrides_the_base_recorded_in_the_checkpoint(tmp_path):
    """RendererConfig.base_model: the frozen UNet and VAE come from it, not the checkpoint's recorded base."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from avatars.models.base_networks import build_unet, build_vae

    config = tiny_config(expression_dim=EXPR_DIM)
    bases = {}
    for name, seed in (("recorded", 1), ("override", 2)):
        torch.manual_seed(seed)
        bases[name] = tmp_path / name
        build_unet(config.unet, 4, 4, 16).save_pretrained(bases[name] / "unet")
        build_vae(config.vae, 64).save_pretrained(bases[name] / "vae")
    empty_prompt = torch.randn(1, 77, config.unet.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    model = DiffusionAvatarsModel(config, base_model=bases["recorded"], empty_prompt_embedding=empty_prompt)
    model.save_pretrained(tmp_path / "avatar")

    def same_weights(module, cls, folder) -> bool:
        want, got = cls.from_pretrained(folder).state_dict(), module.state_dict()
        return all(torch.equal(got[k], v) for k, v in want.items())

    settings = dict(num_inference_steps=1, max_batch_size=1, device="cpu")
    for base_model, expected in ((None, "recorded"), (bases["override"], "override")):
        renderer = FrameRenderer(tmp_path / "avatar", RendererConfig(base_model=base_model, **settings))
        assert renderer.model.base_model == str(bases[expected])
        assert same_weights(renderer.model.unet, UNet2DConditionModel, bases[expected] / "unet")
        assert same_weights(renderer.model.vae, AutoencoderKL, bases[expected] / "vae")
    shutil.rmtree(bases["recorded"])  # the override needs nothing from the recorded base
    FrameRenderer(tmp_path / "avatar", RendererConfig(base_model=bases["override"], **settings))


def test_deploy_renderer_gives_serve_the_configured_replicas_requests_and_resources(monkeypatch, tmp_path):
    """num_replicas, max_ongoing_requests, num_cpus and num_gpus of RendererConfig reach the Serve deployment."""
    from ray import serve

    from cluster.serve import deployment

    runs: list[tuple] = []
    monkeypatch.setattr(deployment, "ensure_serve", lambda: None)
    monkeypatch.setattr(serve, "run", lambda app, name, route_prefix: runs.append((app, name)) or "handle")
    config = RendererConfig(num_replicas=3, max_ongoing_requests=17, num_cpus=2, num_gpus=0.5)
    assert deployment.deploy_renderer({"p0": tmp_path}, config, "avatars-x", max_models_per_replica=4) == "handle"
    ((app, name),) = runs
    d = app._bound_deployment
    assert name == "avatars-x" and d.num_replicas == 3 and d.max_ongoing_requests == 17
    assert d.ray_actor_options == {"num_cpus": 2, "num_gpus": 0.5}
    assert d.init_args == ({"p0": str(tmp_path.resolve())}, config, 4)


class _Recorded:
    """A person's loaded renderer in a replica that records the size of each batch it renders."""

    def __init__(self):
        self.batches: list[int] = []

    def check(self, request):
        pass

    def render(self, requests):
        from cluster.serve.renderer import RenderResult

        self.batches.append(len(requests))
        return [RenderResult(np.zeros((1, 1, 3), np.float32), r.key, len(requests), 0.0) for r in requests]


@pytest.fixture
def replica(monkeypatch):
    """``make(config)``: the renderer deployment's class built as a replica builds it, in this process
    without Ray (no Serve replica context: the one @serve.batch reads is stood in for); exporters
    started are stopped, and the batching state left as it was, at the end."""
    from types import SimpleNamespace

    from ray import serve

    import cluster.bind
    from cluster.serve.deployment import AvatarRenderer

    made = []
    monkeypatch.setattr(cluster.bind, "serve_replica_grpc_on_node_ip", lambda node_ip: False)
    # @serve.batch keeps its settings and queue on the class (one per replica process): restored after the test,
    # or the class could no longer be pickled for a deployment
    batching = AvatarRenderer.func_or_class.render_batch.set_max_batch_size.__self__
    for name in ("_queue", "max_batch_size", "batch_wait_timeout_s"):
        monkeypatch.setattr(batching, name, getattr(batching, name))

    def make(config: RendererConfig):
        context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=config.max_ongoing_requests))
        monkeypatch.setattr(serve, "get_replica_context", lambda: context)
        made.append(AvatarRenderer.func_or_class({"p0": "/nowhere"}, config, 2))
        return made[-1]

    yield make
    for r in made:
        if r.exporter is not None:
            r.exporter.stop()
            r.exporter = None  # stopped once, not again when the replica is collected


@pytest.mark.timeout(60)
def test_a_replica_renders_batches_of_at_most_max_batch_size(replica):
    """RendererConfig.max_batch_size caps the batches @serve.batch forms: 7 concurrent requests with a cap of 3."""
    import asyncio

    r = replica(RendererConfig(max_batch_size=3, batch_wait_timeout_s=0.2))
    loaded = _Recorded()

    async def person():
        return "p0", loaded

    r._person = person

    async def send():
        return await asyncio.gather(*[r(q) for q in make_requests(7)])

    out = asyncio.run(send())
    assert [x.key for x in out] == [f"frame{i}" for i in range(7)]
    assert sum(loaded.batches) == 7 and max(loaded.batches) == 3, loaded.batches


def test_a_replica_exporter_listens_on_metrics_host(replica):
    """RendererConfig.metrics_host: the replica's Prometheus exporter listens there (127.0.0.2), not on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        first = s.getsockname()[1]
    r = replica(RendererConfig(metrics_port=first, metrics_host="127.0.0.2"))
    port = r.exporter.port
    with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_renderer_metrics_port_0_is_a_free_port_as_in_training(replica):
    """--renderer.metrics-port 0 means what --train.metrics-port 0 means: an exporter on a port the system picks
    (before: no exporter at all, though 0 is no 'None'); None is still no exporter."""
    r = replica(RendererConfig(metrics_port=0))
    assert r.exporter is not None and r.exporter.port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{r.exporter.port}/metrics", timeout=10) as resp:
        assert resp.status == 200
    assert replica(RendererConfig()).exporter is None


def test_a_replica_whose_exporter_cannot_start_renders_without_it(replica, capsys):
    """A --renderer.metrics-host this node does not have: the replica says so in its log and its info and serves
    (before, its constructor raised and the whole evaluation failed to deploy)."""
    import asyncio
    from types import SimpleNamespace

    r = replica(RendererConfig(metrics_port=19700, metrics_host="192.0.2.1"))  # TEST-NET-1: nobody's address
    assert r.exporter is None and "cannot start the Prometheus exporter on 192.0.2.1" in r.metrics_error
    assert "rendering without its Prometheus exporter" in capsys.readouterr().err

    async def person():
        return "p0", SimpleNamespace(resolution=8, expression_dim=4, device="cpu")

    r._person = person
    info = asyncio.run(r.info())
    assert info["metrics_port"] is None and "192.0.2.1" in info["metrics_error"]
