import pytest

from lumikb_pipeline.core.config import OFFLINE_RATE_LIMIT, load_settings, parse_rate_limit
from lumikb_pipeline.core.errors import ConfigError


def test_embedded_defaults(lumikb_env) -> None:  # type: ignore[no-untyped-def]
    settings = load_settings()
    assert settings.effective_database_url.startswith("sqlite:///")
    assert str(lumikb_env) in settings.effective_database_url
    assert settings.uses_embedded_redis and settings.uses_embedded_graph
    assert settings.llm_model == "lumikb/offline"
    assert settings.effective_dagster_home == (lumikb_env / "dagster").resolve()


def test_a_provider_model_gets_the_global_limit_and_the_offline_model_its_own(lumikb_env) -> None:  # type: ignore[no-untyped-def]
    settings = load_settings()
    assert settings.rate_limit.per_second == OFFLINE_RATE_LIMIT.per_second == 1000
    provider = settings.model_copy(update={"llm_model": "openai/gpt-4o-mini"})
    assert provider.rate_limit.per_second == 10
    assert provider.max_in_flight == 50


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LUMIKB_LLM_RATE_LIMIT", "fast"),
        ("LUMIKB_LLM_RATE_LIMIT", "0/s"),
        ("LUMIKB_LLM_MAX_IN_FLIGHT", "-3"),
        ("LUMIKB_DATABASE_URL", "mysql://x/y"),
        ("LUMIKB_REDIS_URL", "http://localhost"),
        ("LUMIKB_NEO4J_URI", "http://localhost:7474"),
        ("CELERY_BROKER_URL", "amqp://x"),
        ("LUMIKB_LLM_RATE_LIMITS", "gpt=fast"),
    ],
)
def test_invalid_value_fails_at_start_up_naming_the_variable(
    lumikb_env, monkeypatch: pytest.MonkeyPatch, variable: str, value: str  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert variable in str(raised.value)
    assert raised.value.exit_code == 2


def test_rate_limit_forms() -> None:
    assert parse_rate_limit("600/m").per_second == 10
    assert parse_rate_limit("36000/h").per_second == 10
    assert str(parse_rate_limit("10/s")) == "10/s"


def test_per_model_rate_limit_overrides_the_global_one(lumikb_env, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LUMIKB_LLM_RATE_LIMITS", "openai/gpt-4o-mini=20/s")
    settings = load_settings()
    assert settings.rate_limit_for("openai/gpt-4o-mini").per_second == 20
    assert settings.rate_limit_for("other").per_second == 10


def test_a_per_model_limit_also_overrides_the_offline_models_own(lumikb_env, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LUMIKB_LLM_RATE_LIMITS", "lumikb/offline=5/s")
    assert load_settings().rate_limit.per_second == 5
