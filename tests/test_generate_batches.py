"""Generation with the KV cache: chunked prefill routes on the whole prompt, padded batches of prompts of
different lengths generate what each prompt generates alone, cached segment decoding records its routing."""

import pytest
import torch
from conftest import tiny_model_config

from diffmoe import Decoder
from diffmoe.eval.generate import generate, generate_stream, pad_prompts

T = 8  # Lory segment length
DECODING = ["dense", "lory", "topk", "sparsemixer", ["lory", "topk"]]


def build(ffn, n_layers=2):
    cfg = tiny_model_config(ffn=ffn, n_layers=n_layers)
    cfg.moe.num_experts = 4
    if "lory" in cfg.moe.families:
        cfg.moe.families["lory"].segment_len = T
    model = Decoder(cfg).eval()
    for _, layer in model.moe_layers():  # decisive routing so that routing changes would show
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    return model


def decode(model, ids, prompt_len, **prefill):
    """Logits of a cached prefill of prompt_len positions (with the ``prefill`` options), then of
    one-token decoding calls for the rest of ids [B, L] -> [B, L, V]."""
    cache = model.new_cache(ids.shape[0])
    out = [model(ids[:, :prompt_len], cache=cache, **prefill)]
    out += [model(ids[:, t : t + 1], cache=cache) for t in range(prompt_len, ids.shape[1])]
    return torch.cat(out, 1)


@pytest.mark.parametrize("ffn", ["lory", ["lory", "dense", "lory"]], ids=["lory", "lory-dense-lory"])
def test_chunked_prefill_routes_every_layer_on_the_whole_prompt(ffn):
    model = build(ffn, n_layers=3 if isinstance(ffn, list) else 2)
    model.set_routing("prompt")
    ids = torch.randint(0, 97, (2, 30))
    P = 19
    with torch.no_grad():
        full = model(ids, prompt_len=P)  # every Lory layer routes on the prompt's 19 positions
        weights = [layer.stats["routing_weights"] for _, layer in model.moe_layers()]
        one_shot = decode(model, ids, P)
        torch.testing.assert_close(one_shot, full, rtol=1e-5, atol=1e-5)
        for chunk in (1, 4, 7, 18, 19, 64):
            chunked = decode(model, ids, P, chunk_size=chunk)
            torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
            cache = model.new_cache(2)
            model(ids[:, :P], cache=cache, chunk_size=chunk)
            for (_, layer), w in zip(model.moe_layers(), weights):
                torch.testing.assert_close(layer.stats["routing_weights"], w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        model(ids, chunk_size=4)  # no cache to chunk against


def test_generate_with_a_prefill_chunk_equals_one_shot_prefill():
    model = build("lory")
    prompt = torch.randint(0, 97, (2, 21))
    assert torch.equal(generate(model, prompt, 6, prefill_chunk=5), generate(model, prompt, 6))


@pytest.mark.parametrize("ffn", DECODING, ids=str)
def test_padded_batch_computes_what_each_row_computes_alone(ffn):
    model = build(ffn)
    model.set_routing("prompt")
    rows = [torch.randint(0, 97, (n,)).tolist() for n in (5, 13, 9)]
    new = 6
    out = generate(model, rows, new)
    assert [len(r) for r in out] == [len(r) + new for r in rows]
    alone = [generate(model, torch.tensor([r]), new)[0].tolist() for r in rows]
    assert out == alone
    # the logits behind those tokens: padded full forward, and padded prefill + decoding, row by row
    ids, mask = pad_prompts([r[:-1] for r in out])
    P = ids.shape[1]
    pads = [P - len(r) + 1 for r in out]
    prompt_len = P - new + 1  # the longest prompt; the others' padding is in front of it
    with torch.no_grad():
        full = model(ids, attention_mask=mask, prompt_len=prompt_len)
        cache = model.new_cache(3)
        inc = [model(ids[:, :prompt_len], cache=cache, attention_mask=mask[:, :prompt_len], chunk_size=4)]
        inc += [model(ids[:, t : t + 1], cache=cache) for t in range(prompt_len, P)]
        inc = torch.cat(inc, 1)
        for i, (r, pad) in enumerate(zip(out, pads)):
            own = model(torch.tensor([r[:-1]]), prompt_len=len(rows[i]))[0]
            torch.testing.assert_close(full[i, pad:], own, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(inc[i, pad:], own, rtol=1e-4, atol=1e-5)


def test_padding_tokens_take_no_part_in_attention_or_the_prompt_mean():
    model = build(["lory", "lory"])
    ids, mask = pad_prompts([[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]])
    other = ids.masked_fill(~mask, 42)  # other padding ids
    a = generate(model, ids, 5, attention_mask=mask)
    b = generate(model, other, 5, attention_mask=mask)
    assert torch.equal(a[:, -5:], b[:, -5:])
    with torch.no_grad():
        model.set_routing("prompt")
        cache = model.new_cache(2)
        model(ids, cache=cache, attention_mask=mask)
        merged = [layer.stats["routing_weights"][0] for _, layer in model.moe_layers()]
        model(torch.tensor([[5, 6, 7]]))
        alone = [layer.stats["routing_weights"][0] for _, layer in model.moe_layers()]
    torch.testing.assert_close(merged, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first", ["uniform", "own_mean"])
@pytest.mark.parametrize("routing", ["segment", "prefix"])
def test_segment_routing_of_a_padded_batch_computes_what_each_row_computes_alone(routing, first):
    """Each row's segments start at its first real token: prompts inside and across segments (T=8), and
    decoding that crosses segment boundaries at different steps in different rows."""
    model = build(["lory", "lory"])
    for _, layer in model.moe_layers():
        layer.first_segment = first
    rows = [torch.randint(0, 97, (n,)).tolist() for n in (5, 19, 11)]
    out = generate(model, rows, 12, routing=routing)
    assert out == [generate(model, torch.tensor([r]), 12, routing=routing)[0].tolist() for r in rows]
    ids, mask = pad_prompts([r[:-1] for r in out])
    with torch.no_grad():
        model.set_routing(routing)
        full = model(ids, attention_mask=mask)
        stats = [layer.stats["routing_weights"] for _, layer in model.moe_layers()]
        for i, r in enumerate(out):
            own = model(torch.tensor([r[:-1]]))[0]
            torch.testing.assert_close(full[i, -len(own) :], own, rtol=1e-4, atol=1e-5)
            for (_, layer), padded in zip(model.moe_layers(), stats):  # each row's weights, aligned at the end
                alone = layer.stats["routing_weights"][0]
                torch.testing.assert_close(padded[i, -alone.shape[0] :], alone, rtol=1e-5, atol=1e-6)


def test_generate_refuses_what_it_cannot_decode():
    ids, mask = pad_prompts([[1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="pad on the left"):
        next(generate_stream(build("dense"), ids, 2, attention_mask=mask.flip(1)))
    with pytest.raises(ValueError, match="list of prompts"):
        next(generate_stream(build("dense"), [[1, 2]], 2, attention_mask=mask))
    with pytest.raises(ValueError, match="at least one token"):
        generate(build("dense"), [[1, 2], []], 2)
    with pytest.raises(ValueError, match="cannot generate token by token"):
        generate(build("expert_choice"), [[1, 2], [3, 4, 5]], 2)


@pytest.mark.parametrize("first", ["uniform", "own_mean"])
def test_cached_segment_decoding_records_its_routing(first):
    model = build("lory")
    for _, layer in model.moe_layers():
        layer.first_segment = first
    ids = torch.randint(0, 97, (2, 3 * T + 3))
    with torch.no_grad():
        model(ids)
        full = [layer.stats["routing_weights"] for _, layer in model.moe_layers()]  # [B, N, E]
        cache = model.new_cache(2)
        model(ids[:, :T], cache=cache)  # the prompt covers segment 1, as own_mean needs
        for (_, layer), w in zip(model.moe_layers(), full):
            torch.testing.assert_close(layer.stats["routing_weights"], w[:, :1], rtol=1e-5, atol=1e-6)
        for t in range(T, ids.shape[1]):
            model(ids[:, t : t + 1], cache=cache)
            for (_, layer), w in zip(model.moe_layers(), full):
                seg = t // T
                torch.testing.assert_close(layer.stats["routing_weights"], w[:, seg : seg + 1], rtol=1e-5, atol=1e-6)
                routed = seg > 0 or first == "own_mean"
                assert ("mean_weight" in layer.stats) == routed
                if routed:
                    torch.testing.assert_close(layer.stats["routed_segment_weights"], w[:, seg], rtol=1e-5, atol=1e-6)
        chunk = ids[:, : 2 * T + 2]  # a multi-segment call records each segment it ran
        cache = model.new_cache(2)
        model(chunk, cache=cache)
        for (_, layer), w in zip(model.moe_layers(), full):
            torch.testing.assert_close(layer.stats["routing_weights"], w[:, :3], rtol=1e-5, atol=1e-6)


def test_padded_positions_count_from_each_rows_first_real_token():
    """RoPE is relative, so a shift would not show in the logits; the positions and keys are asserted."""
    from diffmoe.model.decoder import Span

    real = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    span = Span.of(3, 2, real, torch.device("cpu"))  # queries at cache positions 3 and 4
    assert span.positions.tolist() == [[1, 2], [3, 4]]
    keys = span.mask[:, 0]  # [B, L, 5]
    assert keys[0].tolist() == [[False, False, True, True, False], [False, False, True, True, True]]
    assert keys[1].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    pad_query = Span.of(0, 5, real, torch.device("cpu")).mask[0, 0, 0]
    assert pad_query.tolist() == [True, False, False, False, False]  # itself only: never an empty row
