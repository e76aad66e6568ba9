import pytest
import torch

from chipmunk_compile import PRESETS, ChipmunkConfig, ConfigError
from chipmunk_compile.backend import backend
from chipmunk_compile.testing import TinyDiT


def test_presets_follow_the_papers_configs():
    flux = ChipmunkConfig.from_name("flux")
    assert flux.attention.keep == pytest.approx(672 / 4352)
    assert not flux.attention.recompute_selection
    assert flux.mlp.enabled and flux.mlp.keep == 0.3 and flux.mlp.random_keep == 0.05
    hunyuan = ChipmunkConfig.from_name("hunyuan")
    assert hunyuan.attention.dense_steps == (0, 1, 10, 40) and not hunyuan.mlp.enabled
    assert [s for s in range(50) if hunyuan.attention.is_dense_step(s)] == [0, 1, 10, 40]
    wan = ChipmunkConfig.from_name("wan")
    assert [s for s in range(50) if wan.attention.is_dense_step(s)] == [0, 1, 10, 20, 30, 40]
    # of consecutive dense steps only the last makes caches: step 0 is plain dense in all three
    for cfg in (flux.attention, hunyuan.attention, wan.attention):
        assert [s for s in range(50) if cfg.is_plain_dense_step(s)] == [0]
    assert not [s for s in range(50) if flux.mlp.is_plain_dense_step(s)]  # MLP dense at 0, 10, ...: none
    assert set(PRESETS) == {"default", "flux", "hunyuan", "wan"}


def test_dotted_overrides_and_passthrough():
    cfg, rest = ChipmunkConfig.from_options(
        {"preset": "flux", "attention.keep": 0.2, "mlp.dense_steps": [0, 5], "check_error": True,
         "max_autotune": False}
    )
    assert cfg.attention.keep == 0.2 and cfg.mlp.dense_steps == (0, 5) and cfg.check_error
    assert cfg.mlp.keep == 0.3  # untouched preset field
    assert rest == {"max_autotune": False}
    assert ChipmunkConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "options, match",
    [
        ({"attention.kep": 0.1}, "attention.kep"),
        ({"attention.keep": 1.5}, "attention.keep"),
        ({"attention.keep": "a lot"}, "attention.keep"),
        ({"mlp.block": 100}, "mlp.block"),
        ({"attention.query_group": 96}, "attention.query_group"),
        ({"mlp.dense_every": -1}, "mlp.dense_every"),
        ({"preset": "sdxl"}, "sdxl"),
        ({"streams_per_step": 0}, "streams_per_step"),
        ({"check_error": "yes"}, "check_error"),
        ({"mlp.early_selection": 1}, "mlp.early_selection"),
        ({"mlp.sparse_ahead": "on"}, "mlp.sparse_ahead"),
    ],
)
def test_bad_options_raise_naming_the_key(options, match):
    with pytest.raises(ConfigError, match=match):
        ChipmunkConfig.from_options(options)


def test_unknown_option_fails_at_compile_with_the_key():
    model = TinyDiT(depth=1, seq=16)
    compiled = torch.compile(model, backend="chipmunk", options={"not_a_knob": 1})
    with pytest.raises(Exception, match="not_a_knob"), torch.no_grad():
        compiled(torch.randn(1, 16, 8), timestep=torch.tensor([500.0]))


def test_typed_backend_validates_eagerly():
    with pytest.raises(ConfigError, match="ChipmunkConfig"):
        backend({"attention.keep": 0.1})
    with pytest.raises(ConfigError, match="mode"):
        backend(ChipmunkConfig(), mode="warp-speed")
