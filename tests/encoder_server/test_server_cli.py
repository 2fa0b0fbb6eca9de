"""``flux2-encoder serve`` flags: every one has a default shown in --help and an environment variable."""

from __future__ import annotations

import pytest

from encoder_server.cli import build_parser, config_from_args, env_name


def serve_actions():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # noqa: SLF001 - argparse keeps them here
    return serve, [a for a in serve._actions if a.option_strings and a.dest != "help"]  # noqa: SLF001 - argparse lists actions only privately


def test_every_serve_flag_shows_its_default_and_environment_variable():
    serve, actions = serve_actions()
    text = " ".join(serve.format_help().split())  # unwrapped
    for action in actions:
        assert f"env {env_name(action.dest)})" in text, action.dest
        assert action.help, f"{action.option_strings[0]} has no description"
    assert "--port PORT gRPC port; 0 picks a free one (default: 50051; env FLUX2_PORT)" in text


def test_environment_variables_set_defaults_and_flags_win(monkeypatch):
    monkeypatch.setenv("FLUX2_PORT", "6000")
    monkeypatch.setenv("FLUX2_MAX_BATCH_TOKENS", "1024")
    monkeypatch.setenv("FLUX2_CACHE_SCOPE", "user")
    monkeypatch.setenv("FLUX2_HTTP_PORT", "8080")
    monkeypatch.setenv("FLUX2_LOG_LEVEL", "debug")
    config = config_from_args(build_parser().parse_args(["serve", "--port", "7000"]))
    assert config.port == 7000  # the command line wins
    assert config.batching.max_batch_tokens == 1024
    assert config.cache.scope == "user"
    assert config.http.port == 8080
    assert build_parser().parse_args(["serve"]).log_level == "DEBUG"


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("FLUX2_PORT", "fifty", "$FLUX2_PORT='fifty'"),
        ("FLUX2_MAX_CONCURRENT_CALLS", "0", "must be at least 1"),
        ("FLUX2_CACHE_SCOPE", "everyone", "choose from auto, shared, user"),
    ],
)
def test_a_bad_environment_value_names_the_variable(monkeypatch, capsys, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        build_parser()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert name in err and message in err


def test_fairness_and_privacy_flags_reach_the_config():
    args = build_parser().parse_args(
        [
            "serve",
            "--max-concurrent-calls-per-user",
            "3",
            "--write-timeout",
            "5",
            "--body-timeout",
            "2",
            "--cache-scope",
            "shared",
            "--metrics-port",
            "9100",
            "--metrics-host",
            "0.0.0.0",
        ]
    )
    config = config_from_args(args)
    assert (config.limits.max_concurrent_calls_per_user, config.limits.write_timeout_s) == (3, 5.0)
    assert config.limits.body_timeout_s == 2.0 and config.cache.scope == "shared"
    assert (config.metrics_port, config.metrics_host) == (9100, "0.0.0.0")


def test_memory_defaults_to_each_recipes_depth_and_lists_every_bundled_encoder(capsys):
    from pathlib import Path

    import common
    from encoder_server.cli import main

    qwen3_4b = Path(common.__file__).parent / "configs" / "qwen3_4b_text_encoder.json"
    assert main(["memory", "--config", str(qwen3_4b)]) == 0
    assert "decoder layers kept (1-27)" in capsys.readouterr().out
    assert main(["memory"]) == 0
    assert "decoder layers kept (1-30)" in capsys.readouterr().out
    assert main(["memory", "--all"]) == 0
    table = capsys.readouterr().out
    for row in ("Mistral-Small-3.x 24B | 30 of 40", "Qwen3-4B | 27 of 36", "Qwen3-8B | 27 of 36"):
        assert row in table
