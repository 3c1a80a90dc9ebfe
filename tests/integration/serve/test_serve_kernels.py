"""The fused CPU decoding kernels (`serve/kernels`) against the torch operations they replace, in fp32 and bf16:
RMS norm (with the residual add before it), rotary embedding with the cache write, decode attention over a
left-padded strided cache, SiLU-and-multiply. The library is built with the machine's compiler (once, cached)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from tuneforge.serve import kernels

pytestmark = pytest.mark.timeout(300)
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return kernels.build(tmp_path_factory.mktemp("kernels"))


def _kernels(dtype: torch.dtype) -> kernels.DecodeKernels:
    k = kernels.load(dtype, torch.device("cpu"))
    assert k is not None, "the kernels did not build on this machine"
    return k


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, ulps: float = 1.0) -> None:
    """fp32: equal up to the order of sums; bf16: within `ulps` units in the last place of the larger value."""
    got, want = got.float(), want.float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        ulp = torch.maximum(got.abs(), want.abs()).clamp(min=1e-3) * 2.0**-7
        assert bool(((got - want).abs() <= ulps * ulp).all()), (got - want).abs().max()


def test_build_is_cached_and_atomic(built, tmp_path):
    assert built.exists() and built.suffix == ".so"
    assert kernels.build(built.parent) == built  # the same source, compiler and CPU: the same file, not rebuilt
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no partial file left behind


def test_load_applies_to_cpu_float32_and_bfloat16_only():
    assert kernels.load(torch.float16, torch.device("cpu")) is None
    assert kernels.load(torch.float32, torch.device("meta")) is None
    assert isinstance(kernels.load(torch.float32, torch.device("cpu")), kernels.DecodeKernels)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual_add(dtype):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    norm = norm.to(dtype)
    x = (torch.randn(7, 96) * 3).to(dtype)
    add = torch.randn(7, 96 * 2).to(dtype)[:, :96]  # a column view: rows strided
    want_x = x + add
    want = norm(want_x)
    out = torch.empty_like(x)
    _kernels(dtype).rms_norm(x, add, norm.weight.detach(), out, norm.variance_epsilon)
    assert torch.equal(x, want_x)  # the residual add is one rounding, as torch's
    _close(out, want, dtype)
    out2 = torch.empty_like(x)
    _kernels(dtype).rms_norm(x, None, norm.weight.detach(), out2, norm.variance_epsilon)
    assert torch.equal(out2, out) and torch.equal(x, want_x)  # no add: x unchanged


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_cache_append(dtype):
    torch.manual_seed(1)
    rows, heads, kvh, d, cap, col = 5, 6, 2, 16, 12, 7
    qkv = torch.randn(rows, (heads + 2 * kvh) * d).to(dtype)
    q, k, v = qkv.split([heads * d, kvh * d, kvh * d], dim=1)
    angles = torch.rand(rows, 1, d // 2) * 6
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(dtype)
    want_q, want_k = apply_rotary_pos_emb(q.reshape(rows, heads, 1, d), k.reshape(rows, kvh, 1, d), cos, sin)
    kbuf = torch.zeros(rows, kvh, cap, d, dtype=dtype)
    vbuf = torch.zeros(rows, kvh, cap, d, dtype=dtype)
    q_out = torch.empty(rows, heads, d, dtype=dtype)
    cos2, sin2 = cos.reshape(rows, d).contiguous(), sin.reshape(rows, d).contiguous()
    _kernels(dtype).rotary_append(q, k, v, cos2, sin2, q_out, kbuf, vbuf, col, heads, kvh)
    assert torch.equal(q_out, want_q[:, :, 0])  # the same three roundings as torch's
    assert torch.equal(kbuf[:, :, col], want_k[:, :, 0])
    assert torch.equal(vbuf[:, :, col], v.reshape(rows, kvh, d))
    others = [c for c in range(cap) if c != col]
    assert not kbuf[:, :, others].any() and not vbuf[:, :, others].any()  # nothing else written


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 9, 300])
@pytest.mark.parametrize("d", [32, 64])  # 64: the compiled fixed shapes (head size 64 or 128, group 1-8)
def test_decode_attention_over_left_padded_cache(dtype, width, d):
    torch.manual_seed(2)
    rows, heads, kvh, cap = 6, 6, 2, width + 5
    kbuf = torch.randn(rows, kvh, cap, d).to(dtype)
    vbuf = torch.randn(rows, kvh, cap, d).to(dtype)
    q = torch.randn(rows, heads, d).to(dtype)
    lens = torch.tensor([width, 1, max(1, width // 2), width, 2 if width > 1 else 1, width])
    starts = width - lens
    out = torch.empty(rows, heads * d, dtype=dtype)
    scale = d**-0.5
    _kernels(dtype).attend(q, kbuf, vbuf, starts, width, out, heads, kvh, scale)
    g = heads // kvh
    for r in range(rows):
        s = int(starts[r])
        keys = kbuf[r, :, s:width].float().repeat_interleave(g, dim=0)  # [heads, n, d]
        values = vbuf[r, :, s:width].float().repeat_interleave(g, dim=0)
        probs = torch.softmax((q[r].float()[:, None, :] @ keys.transpose(1, 2))[:, 0] * scale, dim=-1)
        want = (probs[:, None, :] @ values)[:, 0].reshape(heads * d)
        _close(out[r], want.to(dtype), dtype, ulps=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    torch.manual_seed(3)
    gu = (torch.randn(4, 2 * 80) * 4).to(dtype)
    gate, up = gu[:, :80], gu[:, 80:]
    want = torch.nn.functional.silu(gate) * up
    out = torch.empty(4, 80, dtype=dtype)
    _kernels(dtype).silu_mul(gate, up, out)
    _close(out, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_logsumexp(dtype):
    torch.manual_seed(4)
    logits = (torch.randn(5, 1000) * 5).to(dtype)
    logits[1, 17] = logits[1, 600] = 40.0  # a tie: the first maximum, as torch's max
    logits[2] = -torch.inf
    logits[2, 3] = 1.0  # one finite logit
    index, maximum, lse = _kernels(dtype).argmax_logsumexp(logits[:, :999])  # rows strided
    ref = logits[:, :999].float()
    assert index.tolist() == ref.max(dim=-1).indices.tolist()
    assert index[1] == 17
    assert torch.equal(maximum, ref.max(dim=-1).values)
    torch.testing.assert_close(lse, torch.logsumexp(ref, dim=-1), rtol=1e-6, atol=1e-5)


def test_a_failed_build_says_why_and_leaves_nothing(monkeypatch, tmp_path):
    broken = tmp_path / "decode.cpp"
    broken.write_text("this is not C++;\n")
    monkeypatch.setattr(kernels, "SOURCE", broken)
    with pytest.raises(RuntimeError, match=r"building decode\.cpp failed"):
        kernels.build(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # no partial library to load later


def test_without_a_compiler_the_engine_keeps_torch_operations(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    monkeypatch.setattr(kernels, "cache_dir", lambda: tmp_path)
    kernels._library.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="tuneforge.serve.kernels"):
            assert kernels.load(torch.float32, torch.device("cpu")) is None
        assert "no C++ compiler" in caplog.text
    finally:
        kernels._library.cache_clear()  # the next caller builds (or finds) the real library again


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_rows_applies_each_rows_own_adapter(dtype):
    """The gathered low-rank term against a per-row reference: slot 0 rows untouched, every other row its own
    slot's (x A^T) B^T added, into a column view of a wider output (as the q/k/v members of the fused matmul)."""
    torch.manual_seed(5)
    slots_n, r, d_in, d_out, rows = 4, 8, 40, 24, 9
    a = torch.randn(slots_n, r, d_in).to(dtype)
    b = torch.randn(slots_n, d_out, r).to(dtype)
    a[0], b[0] = 0, 0
    x = torch.randn(rows, d_in).to(dtype)
    wide = torch.randn(rows, d_out + 10).to(dtype)
    y = wide[:, 5 : 5 + d_out]
    slots = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2, 2])
    want = y.float().clone()
    for i, s in enumerate(slots.tolist()):
        if s:
            want[i] += (x[i].float() @ a[s].float().t()) @ b[s].float().t()
    before = wide.clone()
    a_all = a.reshape(slots_n * r, d_in).contiguous()
    bt_all = b.permute(0, 2, 1).reshape(slots_n * r, d_out).contiguous()
    _kernels(dtype).lora_rows(x, y, a_all, bt_all, slots, r)
    _close(y, want.to(dtype), dtype, ulps=2.0)
    assert torch.equal(y[0], before[0, 5 : 5 + d_out]) and torch.equal(y[5], before[5, 5 : 5 + d_out])
    assert torch.equal(wide[:, :5], before[:, :5]) and torch.equal(wide[:, 5 + d_out :], before[:, 5 + d_out :])


def test_every_kernel_refuses_tensors_it_would_read_or_write_past():
    """A wrong shape, dtype or column is a ValueError before the kernel runs, never a read past a buffer."""
    k = _kernels(torch.float32)
    x, w = torch.zeros(4, 8), torch.zeros(8)
    with pytest.raises(ValueError, match="rms_norm"):
        k.rms_norm(x, None, torch.zeros(7), torch.empty_like(x), 1e-5)  # weight too short
    with pytest.raises(ValueError, match="rms_norm"):
        k.rms_norm(x, None, w, torch.empty(4, 8, dtype=torch.bfloat16), 1e-5)  # another dtype
    kbuf = torch.zeros(4, 2, 5, 8)
    q = torch.zeros(4, 4, 8)
    with pytest.raises(ValueError, match="attend"):
        k.attend(q, kbuf, kbuf.clone(), torch.zeros(4, dtype=torch.long), 6, torch.empty(4, 32), 4, 2, 1.0)  # end > 5
    with pytest.raises(ValueError, match="attend"):
        k.attend(q, kbuf, kbuf.clone(), torch.zeros(3, dtype=torch.long), 5, torch.empty(4, 32), 4, 2, 1.0)
    qkv = torch.zeros(4, 64)
    cs = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="rotary_append"):
        k.rotary_append(qkv[:, :32], qkv[:, 32:48], qkv[:, 48:], cs, cs, q, kbuf, kbuf.clone(), 5, 4, 2)  # column 5
    with pytest.raises(ValueError, match="silu_mul"):
        k.silu_mul(x, x, torch.empty(4, 8).t())  # not contiguous
    with pytest.raises(ValueError, match="lora_rows"):
        k.lora_rows(x, torch.zeros(4, 6), torch.zeros(16, 8), torch.zeros(16, 6), torch.zeros(4, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="argmax_logsumexp"):
        k.argmax_logsumexp(torch.zeros(4, 8).t())
