"""The passes on hand-written graphs: what is rewritten, what stays dense, and why."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import chipmunk_compile
from chipmunk_compile.testing import TinyDiT


def _compile_and_report(module, *args, options=None, check=True, **kwargs):
    compiled = torch.compile(module, backend="chipmunk", fullgraph=True, options=options or {})
    with torch.no_grad():
        out = compiled(*args, **kwargs)
        ref = module(*args, **kwargs)
    if check:  # dropout makes both sides random
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    return chipmunk_compile.report(compiled)


class Attn(nn.Module):
    def __init__(self, dim=32, heads=2, **sdpa_kwargs):
        super().__init__()
        self.heads, self.kw = heads, sdpa_kwargs
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None):
        b, s, d = x.shape
        ctx = x if context is None else context
        q = self.to_q(x).view(b, s, self.heads, -1).transpose(1, 2)
        k = self.to_k(ctx).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(ctx).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw).transpose(1, 2).reshape(b, s, d)


class Mlp(nn.Module):
    def __init__(self, dim=32, hidden=64, mode="plain"):
        super().__init__()
        self.mode = mode
        self.fc1 = nn.Linear(dim, hidden * (2 if mode == "geglu" else 1))
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)
        self.side = nn.Linear(hidden, 4)

    def forward(self, x):
        h = self.fc1(x)
        if self.mode == "geglu":
            u, g = h.chunk(2, dim=-1)
            return self.fc2(self.drop(u * F.gelu(g)))
        a = F.gelu(h, approximate="tanh")
        if self.mode == "escape_pre":
            return self.fc2(a) + h[..., :32]
        if self.mode == "escape_act":
            return self.fc2(a), self.side(a)
        return self.fc2(self.drop(a))


def _only(report, kind):
    sites = report.by_kind(kind)
    assert len(sites) == 1, str(report)
    return sites[0]


def test_hand_written_dit_is_rewritten_and_op_survives_into_inductor_code():
    model = TinyDiT(depth=2, seq=32)
    compiled = torch.compile(model, backend="chipmunk", fullgraph=True)
    x, t = torch.randn(1, 32, 8), torch.tensor([900.0])
    with torch.no_grad():
        out, code = run_and_get_code(compiled, x, timestep=t)
        torch.testing.assert_close(out, model(x, timestep=t), atol=1e-5, rtol=1e-4)
    text = "\n".join(code)
    assert "torch.ops.chipmunk.attention.default" in text and "torch.ops.chipmunk.mlp.default" in text
    assert counters["chipmunk"]["attention_rewritten"] == 2 and counters["chipmunk"]["mlp_rewritten"] == 2
    report = chipmunk_compile.report(compiled)
    assert len(report.by_kind("attention", "rewritten")) == 2
    assert [s.name for s in report.by_kind("mlp", "rewritten")] == ["blocks.0.fc1", "blocks.1.fc1"]
    assert "rewritten" in str(report)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"is_causal": True}, "causal"),
        ({"dropout_p": 0.1}, "dropout"),
    ],
)
def test_unsupported_attention_stays_dense_with_reason(kwargs, reason):
    report = _compile_and_report(Attn(**kwargs).eval(), torch.randn(2, 16, 32), check="dropout_p" not in kwargs)
    site = _only(report, "attention")
    assert site.status == "dense" and reason in site.reason
    assert counters["chipmunk"]["attention_rewritten"] == 0


def test_arbitrary_mask_stays_dense_but_key_padding_mask_is_handled():
    x = torch.randn(2, 16, 32)
    full = torch.rand(2, 1, 16, 16) > 0.3
    full[..., 0] = True
    site = _only(_compile_and_report(Attn(), x, mask=full), "attention")
    assert site.status == "dense" and "arbitrary attention mask" in site.reason
    torch._dynamo.reset()
    pad = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    pad[1, ..., 12:] = False
    site = _only(_compile_and_report(Attn(), x, mask=pad), "attention")
    assert site.status == "rewritten" and "masked" in site.variant


def test_cross_attention_stays_dense():
    report = _compile_and_report(Attn(), torch.randn(1, 16, 32), context=torch.randn(1, 7, 32))
    site = _only(report, "attention")
    assert site.status == "dense" and "cross-attention" in site.reason


class _CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, hidden_states, encoder_hidden_states):
        b, s, _ = hidden_states.shape
        q = self.to_q(hidden_states).view(b, s, 2, 4).transpose(1, 2)
        k, v = (f(encoder_hidden_states).view(b, -1, 2, 4).transpose(1, 2) for f in (self.to_k, self.to_v))
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("text_len", [16, 12])
def test_cross_attention_stays_dense_even_with_equal_lengths(text_len):
    """Keys from encoder_hidden_states alone: cross-attention, also when the text happens to be as long as
    the token sequence (a small image or video, e.g. Wan at 256x512 px, 1 frame: 512 tokens and 512 text
    tokens), which the lengths alone took for self-attention."""
    site = _only(_compile_and_report(_CrossAttention(), torch.randn(1, 16, 8), torch.randn(1, text_len, 8)),
                 "attention")
    assert site.status == "dense" and "cross-attention" in site.reason, site.reason
    if text_len == 16:
        assert "encoder_hidden_states only" in site.reason, site.reason


def test_gqa_attention_is_rewritten():
    class Gqa(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = nn.Linear(8, 8)

        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(self.to_q(q), k, v, enable_gqa=True)

    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    site = _only(_compile_and_report(Gqa(), q, k, v), "attention")
    assert site.status == "rewritten"


@pytest.mark.parametrize("mode, variant", [("plain", "gelu_tanh"), ("geglu", "gated gelu")])
def test_mlp_forms_are_rewritten(mode, variant):
    site = _only(_compile_and_report(Mlp(mode=mode), torch.randn(2, 10, 32)), "mlp")
    assert site.status == "rewritten" and site.variant == variant


@pytest.mark.parametrize("tokens, status", [(19, "dense"), (20, "rewritten")])
def test_mlp_with_fewer_tokens_than_min_tokens_stays_dense(tokens, status):
    """mlp.min_tokens counts batch × sequence of the traced input; below it the MLP stays dense with a reason."""
    opts = {"mlp.min_tokens": 20}
    site = _only(_compile_and_report(Mlp(), torch.randn(1, tokens, 32), options=opts), "mlp")
    assert site.status == status
    if status == "dense":
        assert site.reason == "19 tokens < mlp.min_tokens=20 (too few to gain from sparsity)"
    site = _only(_compile_and_report(Mlp(), torch.randn(2, 10, 32), options=opts), "mlp")
    assert site.status == "rewritten"  # 2 × 10 tokens


@pytest.mark.parametrize(
    "mode, reason", [("escape_pre", "pre-activation"), ("escape_act", "escapes the pattern")]
)
def test_escaping_mlp_intermediates_stay_dense(mode, reason):
    site = _only(_compile_and_report(Mlp(mode=mode), torch.randn(2, 10, 32)), "mlp")
    assert site.status == "dense" and reason in site.reason
    assert counters["chipmunk"]["mlp_rewritten"] == 0


class _LoraLinear(nn.Module):
    """A linear with an unfused low-rank adapter beside it, as PEFT's LoRA layers compute before fusing."""

    def __init__(self, i, o, r=4):
        super().__init__()
        self.base, self.lora_a, self.lora_b = nn.Linear(i, o), nn.Linear(i, r, bias=False), nn.Linear(r, o, bias=False)

    def forward(self, x):
        return self.base(x) + 0.5 * self.lora_b(self.lora_a(x))


@pytest.mark.parametrize(("where", "reason"), [("fc1", "a linear plus another branch"), ("fc2", "feeds two linears"),
                                              ("gated", "gated pre-activation is a linear plus")])
def test_unfused_lora_mlp_stays_dense_and_says_how_to_fix_it(where, reason):
    """An adapter beside either linear leaves the MLP dense (its weights are not single tensors); the report
    names the layer and suggests fusing the adapter, and the output is the dense one."""

    class Lora(nn.Module):
        def __init__(self):
            super().__init__()
            width = 128 if where == "gated" else 64  # gated: [u | g], a = u * gelu(g) (GEGLU)
            self.fc1 = _LoraLinear(32, width) if where in ("fc1", "gated") else nn.Linear(32, width)
            self.fc2 = _LoraLinear(64, 32) if where == "fc2" else nn.Linear(64, 32)

        def forward(self, x):
            h = self.fc1(x)
            if where == "gated":
                u, g = h.chunk(2, dim=-1)
                return self.fc2(u * F.gelu(g))
            return self.fc2(F.gelu(h, approximate="tanh"))

    model = Lora().eval()
    x = torch.randn(2, 10, 32)
    site = _only(_compile_and_report(model, x), "mlp")
    assert site.status == "dense" and reason in site.reason and "fuse_lora" in site.reason, site.reason
    assert site.name.startswith("fc1"), site.name
    assert counters["chipmunk"]["mlp_rewritten"] == 0


def test_separately_added_bias_is_not_called_an_adapter():
    class BiasAfter(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(32, 64, bias=False), nn.Linear(64, 32)
            self.b1 = nn.Parameter(torch.randn(64))

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x) + self.b1, approximate="tanh"))

    report = _compile_and_report(BiasAfter().eval(), torch.randn(2, 10, 32))
    assert not report.by_kind("mlp", "rewritten") and "LoRA" not in str(report), str(report)


def test_concat_single_stream_mlp_splits_the_output_weight():
    class Single(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attn()
            self.proj_mlp = nn.Linear(32, 64)
            self.proj_out = nn.Linear(32 + 64, 32)

        def forward(self, x):
            return self.proj_out(torch.cat([self.attn(x), F.gelu(self.proj_mlp(x), approximate="tanh")], dim=2))

    report = _compile_and_report(Single(), torch.randn(1, 12, 32))
    site = _only(report, "mlp")
    assert site.status == "rewritten" and "concat" in site.variant
    # the attention branch comes first here, before the MLP's first linear: still after its input
    assert "selection ahead" in site.variant
    assert _only(report, "attention").status == "rewritten"


def test_gated_mlp_selection_ahead_of_a_parallel_attention_changes_nothing():
    """A parallel block (attention and a GEGLU MLP on one normed input, their outputs added): the MLP's
    selection goes ahead of the attention, and six steps give the same outputs as with it off, bit for bit."""

    class Parallel(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.attn, self.mlp = nn.LayerNorm(32), Attn(), Mlp(mode="geglu")

        def forward(self, x):
            h = self.norm(x)
            return x + self.attn(h) + self.mlp(h)

    torch.manual_seed(0)
    block = Parallel().eval()
    xs = [torch.randn(1, 256, 32) for _ in range(6)]
    runs = {}
    for early in (False, True):
        torch._dynamo.reset()
        options = {"mlp.first_dense_layers": 0, "attention.first_dense_layers": 0, "mlp.early_selection": early}
        compiled = torch.compile(block, backend="chipmunk", fullgraph=True, options=options)
        with torch.no_grad():
            runs[early] = ([compiled(x) for x in xs], chipmunk_compile.report(compiled))
    site = _only(runs[True][1], "mlp")
    assert "gated" in site.variant and "selection ahead" in site.variant, str(runs[True][1])
    assert site.selections == 3 and site.selections_ahead == 3  # steps 1, 3, 5 (every 2nd sparse step)
    assert _only(runs[False][1], "mlp").selections_ahead == 0
    for a, b in zip(*(runs[e][0] for e in (False, True))):
        assert torch.equal(a, b)


def test_opcheck_the_ops():
    q = torch.randn(2, 2, 9, 8).transpose(1, 2).contiguous().transpose(1, 2)
    k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    torch.library.opcheck(torch.ops.chipmunk.attention.default, (q, k, v, mask, None, 1, None, False, 0, 0))
    x, w1, b1 = torch.randn(2, 5, 8), torch.randn(12, 8), torch.randn(12)
    w2, b2 = torch.randn(4, 14), torch.randn(4)
    torch.library.opcheck(torch.ops.chipmunk.mlp.default, (x, w1, b1, w2, b2, 2, "gelu", False, 2, 12))
    torch.library.opcheck(torch.ops.chipmunk.mlp.default, (x, w1, None, w2, None, 3, "silu", True, 0, 6))
    # the selection launched ahead, and its token in the attention and MLP ops that it orders
    token = torch.ops.chipmunk.mlp_select.default(x, w1, b1, False)
    assert token.shape == (0,)
    torch.library.opcheck(torch.ops.chipmunk.mlp_select.default, (x, w1, b1, False))
    torch.library.opcheck(torch.ops.chipmunk.attention.default, (q, k, v, mask, None, 1, None, False, 0, 0),
                          {"after": token})
    torch.library.opcheck(torch.ops.chipmunk.mlp.default, (x, w1, b1, w2, b2, 2, "gelu", False, 2, 12, token))


def test_float64_model_stays_dense_with_reason():
    model = TinyDiT(depth=1, seq=16).double().eval()
    report = _compile_and_report(model, torch.randn(1, 16, 8, dtype=torch.float64),
                                 timestep=torch.tensor([500.0], dtype=torch.float64))
    attn, mlp = _only(report, "attention"), report.by_kind("mlp")
    assert attn.status == "dense" and "dtype torch.float64" in attn.reason
    assert all(s.status == "dense" for s in mlp) and any("dtype torch.float64" in s.reason for s in mlp)


def test_additive_float_key_padding_mask_matches_dense_at_full_keep():
    mask = torch.zeros(2, 1, 1, 16)
    mask[1, ..., 10:] = float("-inf")
    model = Attn().eval()
    opts = {"attention.keep": 1.0, "attention.random_keep": 0.0, "attention.first_dense_layers": 0,
            "attention.first_dense_steps": 1}
    compiled = torch.compile(model, backend="chipmunk", options=opts)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        for _ in range(3):  # no timestep input: counting mode, one step per call; steps 1, 2 are sparse
            torch.testing.assert_close(compiled(x, mask=mask), model(x, mask=mask), atol=1e-5, rtol=1e-5)
    site = _only(chipmunk_compile.report(compiled), "attention")
    assert site.status == "rewritten" and site.sparse_calls == 2
