"""Prices by kind of token: a cache price not configured is the input price, a reservation's worst
case prices every prompt token at the dearest input price, a reply is priced by what it used."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, ModelConfig, Settings
from gateway.generation.task import cost_usd
from gateway.policy.admission import worst_cost
from gateway.providers.base import UsageReport

PRICED = """
[providers.local]
kind = "demo"
[models.cached]
provider = "local"
input_price_per_mtok = 3.0
cached_input_price_per_mtok = 0.3
cache_write_price_per_mtok = 3.75
output_price_per_mtok = 15.0
[models.plain]
provider = "local"
input_price_per_mtok = 2.0
output_price_per_mtok = 8.0
"""


def test_cache_prices_are_read_and_a_missing_one_is_the_input_price(config_file):
    models = Settings.from_env({"GATEWAY_CONFIG": config_file(PRICED)}).models
    cached, plain = models["cached"], models["plain"]
    assert (cached.cached_price, cached.cache_write_price, cached.highest_input_price) == (0.3, 3.75, 3.75)
    assert (plain.cached_price, plain.cache_write_price, plain.highest_input_price) == (2.0, 2.0, 2.0)


def test_a_cache_price_that_is_not_a_number_is_refused(config_file):
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"GATEWAY_CONFIG": config_file(PRICED.replace("0.3", '"cheap"'))})
    assert "cached_input_price_per_mtok" in str(raised.value)


def test_reservation_worst_case_uses_the_dearest_input_price():
    model = ModelConfig("m", "p", "u", input_price_per_mtok=3.0, cached_input_price_per_mtok=0.3,
                        cache_write_price_per_mtok=3.75, output_price_per_mtok=15.0)
    # 1000 prompt tokens all written to the cache (3.75) and 100 output tokens (15), per million
    assert worst_cost(1000, 100, model) == 0.00525


def test_a_reply_is_priced_by_kind_and_reasoning_as_output():
    model = ModelConfig("m", "p", "u", input_price_per_mtok=3.0, cached_input_price_per_mtok=0.3,
                        cache_write_price_per_mtok=3.75, output_price_per_mtok=15.0)
    usage = UsageReport(170, 40, cached_tokens=100, cache_write_tokens=50, reasoning_tokens=30)
    assert cost_usd(model, usage) == pytest.approx((20 * 3.0 + 100 * 0.3 + 50 * 3.75 + 40 * 15.0) / 1e6, abs=1e-15)
    assert cost_usd(ModelConfig("p", "p", "u", input_price_per_mtok=3.0, output_price_per_mtok=15.0), usage) == \
        pytest.approx((170 * 3.0 + 40 * 15.0) / 1e6, abs=1e-15)
