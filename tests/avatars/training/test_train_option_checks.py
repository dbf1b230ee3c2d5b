"""Training options refused when they are parsed, naming the flag: the Prometheus exporter's port and host, a random
base together with a loaded one, a model that needs a base without one; and the help of the options whose
meaning depends on others (memory_format, random_base / requires_pretrained_base)."""

from __future__ import annotations

import dataclasses

import pytest

from avatars.training import PRESETS, TrainConfig, train_preset


@pytest.mark.parametrize("port", [70000, 65536, 65473, -1])
def test_a_metrics_port_the_exporter_cannot_bind_is_refused_naming_the_flag(port, capsys):
    """70000 made start_http_server raise OverflowError at the training's start (every attempt, after the data
    and base stages); 65473 let the exporter's 64 tries run past 65535; -1 quietly became "any port"."""
    from jobs import launch_all
    from jobs._presets import preset_cli

    with pytest.raises(ValueError, match=r"metrics_port \(--metrics-port; --train.metrics-port in launch_all\) "
                                         r"must be 1 to 65472 .* or 0"):
        TrainConfig(metrics_port=port)
    with pytest.raises(SystemExit) as exit_:
        preset_cli(launch_all.PRESETS, default="tiny", description="", args=["--train.metrics-port", str(port)])
    assert exit_.value.code == 2 and "metrics_port" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["", " 127.0.0.1", "localhost:9000", "my host", "256.0.0.1"])
def test_a_metrics_host_that_is_no_address_is_refused_naming_the_flag(host):
    """An empty host or one with a port failed every one of the exporter's 64 tries, reported as "no free port";
    the rule is the renderer's (--renderer.metrics-host)."""
    from cluster.serve.renderer import host_problem as renderers_rule

    with pytest.raises(ValueError, match=r"metrics_host \(--metrics-host; --train.metrics-host in launch_all\) "):
        TrainConfig(metrics_port=9000, metrics_host=host)
    assert renderers_rule(host) is not None


def test_the_exporters_ports_are_the_ones_the_check_allows():
    """The check's range is the exporter's (PORT_RANGE is not imported by the options); the exporter binds at 0 (a
    port the system picks) and at the highest first port allowed; a colon is allowed in IPv6 addresses."""
    from prometheus_client import CollectorRegistry

    from avatars.training.config import EXPORTER_PORTS, MAX_METRICS_PORT
    from cluster.monitoring.metrics import PORT_RANGE, start_exporter_in_range
    from cluster.serve.renderer import host_problem as renderers_rule

    assert EXPORTER_PORTS == PORT_RANGE and MAX_METRICS_PORT + PORT_RANGE - 1 == 65535
    for port, host in ((0, "127.0.0.1"), (1, "0.0.0.0"), (MAX_METRICS_PORT, "::1"), (None, "node-17.cluster")):
        TrainConfig(metrics_port=port, metrics_host=host)
        assert renderers_rule(host) is None
    for port in (0, MAX_METRICS_PORT):
        exporter = start_exporter_in_range(port, CollectorRegistry())
        try:
            assert exporter.port > 0 and (port == 0 or port <= exporter.port <= 65535)
        finally:
            exporter.stop()


def test_random_base_with_a_base_model_is_refused_when_constructed(tmp_path):
    """Refused when the options are made (was: in the trainer's set-up, after --resume never had cleared the run)."""
    with pytest.raises(ValueError, match=r"random_base .* base_model \(--base-model\)"):
        TrainConfig(random_base=True, base_model=tmp_path)
    with pytest.raises(ValueError, match="random_base"):
        train_preset("paper", random_base=True, base_model=tmp_path)


def test_a_model_that_needs_a_base_without_one_names_base_model(tmp_path):
    """The paper preset is complete without its --base-model (a preset is no run), so the run's entry points ask
    ``base_problem``; a base, random_base or requires_pretrained_base False each answer it."""
    assert "--base-model is required" in train_preset("paper").base_problem()
    tiny_needing_a_base = dataclasses.replace(TrainConfig().model, requires_pretrained_base=True)
    assert "--base-model is required" in TrainConfig(model=tiny_needing_a_base).base_problem()
    no_base = dataclasses.replace(train_preset("paper").model, requires_pretrained_base=False)
    for config in (train_preset("paper", base_model=tmp_path), train_preset("paper", random_base=True),
                   train_preset("paper", model=no_base), TrainConfig()):
        assert config.base_problem() is None


def test_model_config_says_which_of_the_two_switches_wins(tmp_path):
    """requires_pretrained_base as saved with the avatar: True with a base, False with random_base, the option's
    value otherwise, as both helps say."""
    tiny = TrainConfig()
    assert not tiny.model_config(16).requires_pretrained_base
    assert TrainConfig(base_model=tmp_path).model_config(16).requires_pretrained_base
    assert not train_preset("paper", random_base=True).model_config(16).requires_pretrained_base
    no_base = dataclasses.replace(train_preset("paper").model, requires_pretrained_base=False)
    assert not train_preset("paper", model=no_base).model_config(16).requires_pretrained_base


def test_random_base_is_no_flag_but_requires_pretrained_base_is(capsys):
    """The two switches of one thing: the command line offers one of them (--model.no-requires-pretrained-base
    without --base-model builds the random base); random_base stays a field for the benchmarks and ``run``."""
    from jobs._presets import preset_cli

    presets = {name: (text, TrainConfig.for_person(options)) for name, (text, options) in PRESETS.items()}
    with pytest.raises(SystemExit):
        preset_cli(presets, default="tiny", description="d", args=["paper", "--help"])
    out = capsys.readouterr().out
    assert "--random-base" not in out and "--model.no-requires-pretrained-base" in out
    with pytest.raises(SystemExit) as exit_:
        preset_cli(presets, default="tiny", description="d", args=["paper", "--random-base"])
    assert exit_.value.code == 2
    capsys.readouterr()
    config = preset_cli(presets, default="tiny", description="d",
                        args=["paper", "--model.no-requires-pretrained-base"])
    assert config.base_problem() is None and not config.model_config(16).requires_pretrained_base


def test_memory_format_help_names_what_stays_nchw():
    """Under ZeRO 1/2 the trained networks stay NCHW, and eager the frozen VAE (engine.build_engine)."""
    import inspect

    from avatars.training import config as config_module
    from avatars.training.performance import channels_last_modules

    source = inspect.getsource(config_module.TrainOptions)
    help_text = " ".join(source.split("memory_format:")[1].split('"""')[1].split())
    assert "the frozen VAE only with --compile" in help_text
    assert "--zero-stage 1 or 2 the trained networks stay NCHW" in help_text
    assert "vae" not in channels_last_modules(compiled=False) and "vae" in channels_last_modules(compiled=True)
