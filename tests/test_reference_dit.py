"""CPU tests of the reference DiT (bench/reference_dit): checkpoints, sampling, data, tracing."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

rd_data = importlib.import_module("bench.reference_dit.data")
rd_model = importlib.import_module("bench.reference_dit.model")
rd_sample = importlib.import_module("bench.reference_dit.sample")
rd_train = importlib.import_module("bench.reference_dit.train")

VARIANTS = ["image", "video"]


def _tiny_random_dit(variant: str) -> torch.nn.Module:
    """Tiny DiT with every weight random (adaLN-Zero init would make the output identically 0)."""
    torch.manual_seed(0)
    cfg = rd_model.DiTConfig.from_name(variant, **rd_train.tiny_overrides(variant))
    model = rd_model.DiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _require_checkpoint(variant: str) -> None:
    path = rd_sample.checkpoint_path(variant)
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} not present yet: train it (bench/reference_dit/train.py)")


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_loads(variant):
    _require_checkpoint(variant)
    model = rd_sample.load(variant)
    preset = rd_model.DiTConfig.from_name(variant)
    assert model.config == preset, "checkpoint config differs from the preset in model.py"
    meta = json.loads(rd_sample.checkpoint_path(variant).with_suffix(".json").read_text())
    assert meta["complete"] and meta["steps"] > 0 and meta["params"] == rd_model.count_params(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampling_three_steps(variant):
    _require_checkpoint(variant)
    model = rd_sample.load(variant)
    x = rd_sample.sample(model, model.config, torch.tensor([3]), num_steps=3, seed=1)
    assert x.shape == (1, *model.config.sample_shape)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_data_deterministic_by_seed(variant):
    def batch(seed):
        return rd_data.make_batch(variant, 3, torch.Generator().manual_seed(seed))

    (x0, y0), (x1, y1), (x2, _) = batch(7), batch(7), batch(8)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(x0, x2)
    assert x0.shape == (3, *rd_model.PRESETS[variant].sample_shape)
    assert x0.min() >= -1 and x0.max() <= 1
    assert ((y0 >= 0) & (y0 < rd_data.NUM_CLASSES)).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_patchify_roundtrip_and_token_order(variant):
    model = rd_model.DiT(rd_model.DiTConfig.from_name(variant, **rd_train.tiny_overrides(variant)))
    cfg = model.config
    x = torch.randn(2, *cfg.sample_shape)
    tokens = model.patchify(x)
    assert tokens.shape == (2, cfg.num_tokens, 3 * torch.Size(cfg.patch_size).numel())
    assert torch.equal(model.unpatchify(tokens), x)
    # Token 1 is the patch right of token 0 (row-major over the patch grid, last axis fastest).
    ph, pw = cfg.patch_size[-2:]
    first = x[..., :ph, pw : 2 * pw].reshape(2, 3, -1, ph, pw)[:, :, 0]
    assert torch.equal(tokens[:, 1].view(2, ph, pw, 3).permute(0, 3, 1, 2), first)


def test_standalone_euler_matches_diffusers_scheduler():
    """train.py's diffusers-free loop (used on the GPU machine) equals sample.py's scheduler loop."""
    model = _tiny_random_dit("video")
    labels = torch.tensor([5])
    ours = rd_train.euler_sample(model, model.config, labels, num_steps=3, guidance_scale=2.0, seed=3)
    ref = rd_sample.sample(model, model.config, labels, num_steps=3, guidance_scale=2.0, seed=3)
    seq = rd_sample.sample(model, model.config, labels, num_steps=3, guidance_scale=2.0, seed=3, cfg_batched=False)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seq, ref, rtol=1e-5, atol=1e-5)


def test_forward_traces_fullgraph():
    model = _tiny_random_dit("image")
    x = torch.randn(2, *model.config.sample_shape)
    t, y = torch.tensor([999.0, 10.0]), torch.tensor([0, model.config.null_class])
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), model(x, t, y))
