"""The model's explicit positions and masks, the layer-range forward and the positioned cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from mlxeff.cache import UNFILLED, PositionedKVCache, trim_cache
from mlxeff.models.attention import rope_at, rope_real

from conftest import make_model, tiny_args


def _ids(n, seed=0, vocab=96):
    return mx.array(np.random.default_rng(seed).integers(3, vocab, size=(1, n)), dtype=mx.uint32)


def test_default_positions_and_causal_mask_equal_the_plain_forward_bit_for_bit():
    model = make_model()
    x = _ids(23)
    plain = model(x)
    explicit = model(x, positions=mx.arange(23)[None], mask="causal")
    assert mx.array_equal(plain, explicit)


def test_positions_with_a_cache_equal_the_plain_cached_forward_bit_for_bit():
    model = make_model()
    x = _ids(20)
    c1, c2 = model.make_cache(), model.make_cache()
    a = [model(x[:, :12], cache=c1), model(x[:, 12:19], cache=c1), model(x[:, 19:], cache=c1)]
    b = [model(x[:, :12], cache=c2, positions=mx.arange(12)[None], mask="causal"),
         model(x[:, 12:19], cache=c2, positions=mx.arange(12, 19)[None], mask="causal"),
         model(x[:, 19:], cache=c2, positions=mx.array([[19]]), mask="causal")]
    for p, q in zip(a, b):
        assert mx.array_equal(p, q)


def test_causal_by_position_equals_the_index_rule_for_ordered_rows():
    model = make_model()
    x = _ids(16)
    plain = model(x, cache=model.make_cache())
    by_position = model(x, cache=model.make_cache(), positions=mx.arange(16)[None])
    np.testing.assert_allclose(np.array(plain), np.array(by_position), atol=1e-5)


def test_forward_layers_in_ranges_equals_the_whole_stack():
    model = make_model()
    x = _ids(9)
    h = model.transformer.token_embeddings(x)
    t = model.transformer
    split = t.forward_layers(t.forward_layers(h, 0, 2), 2, 4)
    assert mx.array_equal(t.norm(split), t(x))


def test_a_mask_array_restricts_what_rows_see():
    """Two segments with a block-diagonal mask compute as two separate forwards."""
    model = make_model()
    a, b = _ids(6, 1), _ids(6, 2)
    both = mx.concatenate([a, b], axis=1)
    pos = mx.concatenate([mx.arange(6), mx.arange(6)])[None]
    blocks = np.zeros((12, 12), bool)
    blocks[:6, :6] = np.tril(np.ones((6, 6), bool))
    blocks[6:, 6:] = np.tril(np.ones((6, 6), bool))
    out = model(both, positions=pos, mask=mx.array(blocks))
    np.testing.assert_allclose(np.array(out[:, :6]), np.array(model(a)), atol=1e-5)
    np.testing.assert_allclose(np.array(out[:, 6:]), np.array(model(b)), atol=1e-5)


def test_rope_at_integer_positions_is_exact_and_real_positions_agree():
    model = make_model()
    rope = model.layers[0].attn.rope
    x = mx.random.normal((2, 3, 5, 16))
    pos = mx.array([[4, 5, 6, 7, 8], [4, 5, 6, 7, 8]])
    assert mx.array_equal(rope_at(x, pos, rope), rope(x, offset=4))
    np.testing.assert_allclose(np.array(rope_real(x, pos.astype(mx.float32), rope)),
                               np.array(rope(x, offset=4)), atol=2e-5)
    half = rope_at(x, mx.full((2, 5), 2.5), rope)  # between positions 2 and 3: a real rotation
    assert half.shape == x.shape and not mx.array_equal(half, rope(x, offset=2))


def test_cache_trim_then_redecode_equals_never_having_decoded():
    model = make_model()
    x = _ids(14)
    cache = model.make_cache()
    model(x[:, :10], cache=cache)
    reference = model(x[:, 10:12], cache=cache)
    model(x[:, 12:], cache=cache)
    assert trim_cache(cache, 4) == 4
    assert cache[0].offset == 10 and cache[0].next_position == 10
    again = model(x[:, 10:12], cache=cache)
    assert mx.array_equal(reference, again)


def test_explicit_positions_are_recorded_and_trimmed():
    c = PositionedKVCache()
    k = mx.zeros((1, 2, 3, 4))
    c.update_and_fetch(k, k)
    assert c.ordered and c.next_position == 3
    c.update_and_fetch(k[:, :, :2], k[:, :, :2], positions=mx.array([[7, 5]]))
    assert not c.ordered
    assert c.positions.tolist() == [0, 1, 2, 7, 5] and c.next_position == 8
    c.update_and_fetch(k[:, :, :1], k[:, :, :1])  # appended after everything: position 8
    assert c.positions.tolist() == [0, 1, 2, 7, 5, 8]
    c.trim(2)
    assert c.positions.tolist() == [0, 1, 2, 7] and c.next_position == 8
    buf = np.array(c.slot_position_array())
    assert buf[:4].tolist() == [0, 1, 2, 7] and (buf[4:] == 2**31 - 1).all()


def test_prompt_cache_saved_and_reloaded_continues_with_identical_logits(tmp_path):
    model = make_model()
    x = _ids(12)
    cache = model.make_cache()
    model(x[:, :8], cache=cache)
    f = str(tmp_path / "prompt.safetensors")
    save_prompt_cache(f, cache, {"model": "tiny"})
    loaded, meta = load_prompt_cache(f, return_metadata=True)
    assert meta == {"model": "tiny"} and all(isinstance(c, PositionedKVCache) for c in loaded)
    a = model(x[:, 8:], cache=cache)
    b = model(x[:, 8:], cache=loaded)
    assert mx.array_equal(a, b)


def test_positioned_state_round_trips_through_the_prompt_cache_files(tmp_path):
    c = PositionedKVCache()
    k = mx.random.normal((1, 2, 3, 4))
    c.update_and_fetch(k, k, positions=mx.array([[0, 4, 2]]))
    f = str(tmp_path / "c.safetensors")
    save_prompt_cache(f, [c])
    (d,) = load_prompt_cache(f)
    assert d.positions.tolist() == [0, 4, 2] and d.next_position == 5 and d.offset == 3
    assert mx.array_equal(d.keys[:, :, :3], k)


def test_device_positions_are_read_back_when_first_needed_and_equal_host_ones():
    """A write with positions only on the device leaves the host table unread until something
    needs it; every view then equals the cache written with the same positions from the host."""
    k = mx.random.normal((1, 2, 9, 4), key=mx.random.key(0))
    writes = [np.array([[0, 5, 2]]), np.array([[7, 3]]), None, np.array([[1, 4, 9]])]
    host, device = PositionedKVCache(), PositionedKVCache()
    start = 0
    for w in writes:
        n = 1 if w is None else w.shape[1]
        host.update_and_fetch(k[:, :, start:start + n], k[:, :, start:start + n], positions=w)
        device.update_and_fetch(k[:, :, start:start + n], k[:, :, start:start + n],
                                positions=None if w is None else mx.array(w.astype(np.int32)))
        start += n
        if w is not None and start < 6:
            assert device._pending  # not read back at the write
    assert device.next_position == host.next_position == 10
    assert not device._pending
    assert np.array_equal(device.positions, host.positions)
    assert mx.array_equal(device.slot_position_array(), host.slot_position_array())
    device.update_and_fetch(k[:, :, :1], k[:, :, :1], positions=mx.array([[20]]))
    assert device.trim(2) == 2 and device.next_position == 9
    assert np.array_equal(device.positions, host.positions[:-1])


def test_a_batch_with_different_positions_per_row_is_refused():
    c = PositionedKVCache()
    k = mx.zeros((2, 1, 2, 4))
    with pytest.raises(ValueError, match="one position per slot"):
        c.update_and_fetch(k, k, positions=mx.array([[0, 1], [1, 2]]))


def test_mlx_lm_generate_runs_with_the_positioned_cache(tmp_path):
    from mlx_lm.generate import generate_step

    model = make_model(tiny_args())
    prompt = mx.array([5, 6, 7, 8], dtype=mx.uint32)
    ours = [t for t, _ in generate_step(prompt, model, max_tokens=6)]
    cache = model.make_cache()
    assert isinstance(cache[0], PositionedKVCache)
    plain = [int(mx.argmax(model(prompt[None])[0, -1]))]
    assert ours[0] == plain[0]


def test_few_rows_route_reads_every_cached_slot_causally(monkeypatch):
    """Rows appended in order take the pruned-attention route on a CUDA GPU (the kernel is replaced
    by its plain-MLX reference here): the logits of a multi-row forward after a cached prompt, and
    after a trim, equal the SDPA path's."""
    import mlxeff.models.attention as attention
    from mlxeff.models.pruned_attention import pruned_attention_reference

    model = make_model()
    x = _ids(30, 3)
    calls = []

    def reference(q, k, v, index, **kw):
        calls.append(q.shape[2])
        return pruned_attention_reference(q, k, v, index, **kw)

    def run():
        cache = model.make_cache()
        out = [model(x[:, :20], cache=cache), model(x[:, 20:25], cache=cache)]
        trim_cache(cache, 3)
        out.append(model(x[:, 22:30], cache=cache))
        return out

    expected = run()
    monkeypatch.setattr(attention, "kernel_available", lambda head_dim: True)
    monkeypatch.setattr(attention, "gpu_backend", lambda: "metal")
    run()
    assert not calls  # Metal keeps MLX's attention
    monkeypatch.setattr(attention, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(attention, "pruned_attention_kernel", reference)
    routed = run()
    assert calls and set(calls) == {5, 8}  # the 20-row prompt stays on SDPA (more than FEW_ROWS)
    for a, b in zip(expected, routed):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=2e-5)
    monkeypatch.setattr(attention, "FEW_ROWS", 0)
    calls.clear()
    run()
    assert not calls


def test_slot_position_array_follows_an_ordered_cache():
    cache = PositionedKVCache()
    kv = mx.zeros((1, 2, 3, 8))
    cache.update_and_fetch(kv, kv)
    assert np.array(cache.slot_position_array())[:3].tolist() == [0, 1, 2]
    cache.update_and_fetch(kv, kv)
    assert np.array(cache.slot_position_array())[:6].tolist() == [0, 1, 2, 3, 4, 5]
    cache.trim(4)
    table = np.array(cache.slot_position_array())
    assert table[:2].tolist() == [0, 1] and (table[2:] == UNFILLED).all()
