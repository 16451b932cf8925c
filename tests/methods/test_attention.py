"""attn-dims: rotary pairs of q / k kept, v / o refitted jointly, served as a smaller
attention."""

from __future__ import annotations

import pytest
import torch
import transformers

import aecompress
from aecompress.calibration import TargetStatistics
from aecompress.errors import AecompressError
from aecompress.methods import FitContext, GroupSpec, make_method
from aecompress.methods.attention import split_attention
from aecompress.methods.linalg import whitening
from aecompress.methods.pruning import unpack_bits, words
from aecompress.targets import ATTN_PARTS, resolve_targets
from tests.methods.helpers import compress_structured, correlated_inputs, tiny_llama

HEADS, KV, SIZE, HIDDEN = 4, 2, 8, 32  # tiny_llama's attention
ROWS = (2 * HEADS + 2 * KV) * SIZE


def attn_spec(count: int = 1) -> GroupSpec:
    return GroupSpec("attn.0", "attn", "attn", count, ROWS, HIDDEN, SIZE, kv_heads=KV)


def attn_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An attn member [q; k; v; o^T] and hidden states X with correlated channels."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, HIDDEN, generator=generator), correlated_inputs(HIDDEN, seed=seed)


def fit_attn(matrix: torch.Tensor, x: torch.Tensor, width: int, **options: object):
    method = make_method("attn-dims", dict(options))
    spec = attn_spec()
    method.check(spec)
    statistics = [TargetStatistics(x.shape[0], x.T @ x, x.abs().mean(0), None, None, None)]
    context = FitContext(spec, float("inf"), 0, statistics, progress=False)
    return method, method.fit([matrix], width, context)


def kept_pairs(stored) -> list[int]:
    mask = unpack_bits(stored.members[0]["kept"], SIZE // 2)
    return torch.nonzero(mask).flatten().tolist()


def head_products(matrix: torch.Tensor) -> list[torch.Tensor]:
    """O_h V_g [hidden, hidden] of each query head h (its KV head g)."""
    _, _, v, o = split_attention(matrix.double(), HEADS, KV, SIZE)
    per_group = HEADS // KV
    return [
        o[:, h * SIZE : (h + 1) * SIZE] @ v[h // per_group * SIZE : (h // per_group + 1) * SIZE]
        for h in range(HEADS)
    ]


def test_cost_counts_every_stored_number_and_the_bitmap():
    matrix, x = attn_problem()
    method, stored = fit_attn(matrix, x, 4)
    member = stored.members[0]
    numbers = 4 * HIDDEN * (2 * HEADS + 2 * KV)  # q, k, v, o at head dim 4
    assert sum(t.numel() for t in member.values()) == numbers + words(SIZE // 2)
    assert method.cost(4, attn_spec()) == 32 * numbers + 32 * words(SIZE // 2)
    assert member["q"].shape == (HEADS * 4, HIDDEN) and member["o"].shape == (HIDDEN, HEADS * 4)
    assert member["k"].shape == member["v"].shape == (KV * 4, HIDDEN)


def test_the_solved_width_is_the_largest_even_one_within_budget():
    method, spec = make_method("attn-dims"), attn_spec()
    budget = spec.dense_bits / 1.5
    context = FitContext(spec, budget, 0, None, progress=False)
    width = method.solve_width([], context)
    assert width == 4  # 6 would exceed the budget: 6 / 8 of the dims > 1 / 1.5
    assert method.cost(width, spec) <= budget < method.cost(width + 2, spec)
    assert method.larger(width, spec) == [6] and method.larger(SIZE, spec) == []


def test_low_and_high_keep_the_lowest_and_highest_frequencies():
    matrix, x = attn_problem()
    assert kept_pairs(fit_attn(matrix, x, 4, pairs="low")[1]) == [2, 3]
    assert kept_pairs(fit_attn(matrix, x, 4, pairs="high")[1]) == [0, 1]
    assert kept_pairs(fit_attn(matrix, x, 2, pairs="low")[1]) == [3]


def test_score_keeps_the_pairs_that_carry_the_attention_logits():
    matrix, x = attn_problem()
    q, k, _, _ = split_attention(matrix, HEADS, KV, SIZE)
    for rows, heads in ((q, HEADS), (k, KV)):
        view = rows.view(heads, SIZE, HIDDEN)
        view[:, [1, 1 + SIZE // 2]] *= 10  # pair 1 in every head of q and k
        view[:, 3] *= 5  # one dim of pair 3
    _, stored = fit_attn(matrix, x, 4)
    assert kept_pairs(stored) == [1, 3]


def test_kept_q_and_k_rows_are_ordered_for_rotate_half():
    matrix, x = attn_problem()
    _, stored = fit_attn(matrix, x, 4, pairs="low")
    q, k, _, _ = split_attention(matrix, HEADS, KV, SIZE)
    dims = [2, 3, 6, 7]  # pairs 2, 3 then their partners + D/2
    member = stored.members[0]
    kept_q = q.view(HEADS, SIZE, HIDDEN)[:, dims].reshape(-1, HIDDEN)
    torch.testing.assert_close(member["q"], kept_q)
    torch.testing.assert_close(member["k"], k.view(KV, SIZE, HIDDEN)[:, dims].reshape(-1, HIDDEN))


def test_the_full_head_dim_reproduces_the_layer():
    matrix, x = attn_problem()
    method, stored = fit_attn(matrix, x, SIZE)
    rebuilt = method.reconstruct(stored, 0)
    q, k, _, _ = split_attention(matrix, HEADS, KV, SIZE)
    rq, rk, _, _ = split_attention(rebuilt, HEADS, KV, SIZE)
    torch.testing.assert_close(rq, q)
    torch.testing.assert_close(rk, k)
    for product, expected in zip(head_products(rebuilt), head_products(matrix), strict=True):
        torch.testing.assert_close(product, expected, rtol=1e-4, atol=1e-4)


def test_v_and_o_are_exact_when_each_kv_group_has_rank_d():
    matrix, x = attn_problem()
    _, _, v, _ = split_attention(matrix, HEADS, KV, SIZE)
    generator = torch.Generator().manual_seed(5)
    for group in range(KV):  # V_g of rank 4: a head dim of 4 loses nothing
        rows = slice(group * SIZE, (group + 1) * SIZE)
        left = torch.randn(SIZE, 4, generator=generator)
        v[rows] = left @ torch.randn(4, HIDDEN, generator=generator)
    method, stored = fit_attn(matrix, x, 4)
    rebuilt = method.reconstruct(stored, 0)
    for product, expected in zip(head_products(rebuilt), head_products(matrix), strict=True):
        torch.testing.assert_close(product, expected, rtol=1e-4, atol=1e-4)


def test_v_and_o_minimise_the_whitened_output_error():
    matrix, x = attn_problem()
    method, stored = fit_attn(matrix, x, 4, ridge=0.0)
    factor = whitening(x.T @ x, 0.0)
    products = head_products(matrix)

    def error(rebuilt: torch.Tensor) -> float:
        pairs = zip(head_products(rebuilt), products, strict=True)
        return sum(float(((p - e) @ factor).square().sum()) for p, e in pairs)

    fitted = error(method.reconstruct(stored, 0))
    # the plain (unwhitened) truncation of each group's stacked product, the same rank
    plain = matrix.clone().double()
    _, _, v, o = split_attention(plain, HEADS, KV, SIZE)
    for group in range(KV):
        heads = range(group * 2, group * 2 + 2)
        stacked = torch.cat([o[:, h * SIZE : (h + 1) * SIZE] for h in heads])
        value = v[group * SIZE : (group + 1) * SIZE]
        u = torch.linalg.svd(stacked @ value)[0][:, :4]
        truncated = u @ u.T @ stacked
        for i, h in enumerate(heads):
            o[:, h * SIZE : (h + 1) * SIZE] = truncated[i * HIDDEN : (i + 1) * HIDDEN]
    assert fitted < 0.95 * error(plain)


def test_other_targets_and_stacks_are_refused():
    method = make_method("attn-dims")
    with pytest.raises(AecompressError, match="--targets attn"):
        method.check(GroupSpec("q", "q", "linear", 1, HEADS * SIZE, HIDDEN, SIZE, kv_heads=KV))
    with pytest.raises(AecompressError, match="--group none"):
        method.check(attn_spec(count=2))


def compress_attn(tokenizer, ratio: float = 1.5, **fields: object):
    return compress_structured(tokenizer, "attn-dims", "attn", ratio, **fields)


def test_a_compressed_attention_is_a_smaller_one_at_the_tightest_width(tokenizer):
    cm = compress_attn(tokenizer)
    assert len(cm.groups) == cm.model.config.num_hidden_layers
    for fitted in cm.groups:
        width, spec = fitted.stored.width, attn_spec()
        cost = fitted.method.cost
        assert fitted.stored_bits == cost(width, spec) <= spec.dense_bits / 1.5
        assert cost(width + 2, spec) > spec.dense_bits / 1.5  # tight
        attention = cm.model.model.layers[fitted.group.members[0].layer].self_attn
        assert isinstance(attention, transformers.models.llama.modeling_llama.LlamaAttention)
        assert attention.head_dim == width < SIZE
        assert attention.scaling == SIZE**-0.5  # the original softmax scaling
        assert attention.q_proj.weight.shape == (HEADS * width, HIDDEN)
        assert attention.o_proj.weight.shape == (HIDDEN, HEADS * width)


@pytest.mark.parametrize("pairs", ["score", "high"])
def test_the_served_attention_computes_the_reconstructed_one(tokenizer, pairs):
    cm = compress_attn(tokenizer, options={"pairs": pairs})
    dense = tiny_llama()
    with torch.no_grad():
        for fitted in cm.groups:
            rebuilt = fitted.method.reconstruct(fitted.stored, 0)
            attention = dense.model.layers[fitted.group.members[0].layer].self_attn
            q, k, v, o = split_attention(rebuilt, HEADS, KV, SIZE)
            for name, weight in zip(ATTN_PARTS, (q, k, v, o), strict=True):
                getattr(attention, name).weight.copy_(weight)
        ids = torch.randint(0, 90, (1, 12), generator=torch.Generator().manual_seed(3))
        served, decoded = cm.model(input_ids=ids).logits, dense(input_ids=ids).logits
        original = tiny_llama()(input_ids=ids).logits
    torch.testing.assert_close(served, decoded, rtol=1e-4, atol=1e-5)
    assert (served - original).abs().max() > 1e-3  # something was removed


def test_round_trip(tokenizer, tmp_path):
    cm = compress_attn(tokenizer)
    cm.save_pretrained(tmp_path / "art")
    loaded = aecompress.load(tmp_path / "art")
    assert loaded.model.layers[0].self_attn.head_dim == cm.groups[0].stored.width
    ids = torch.randint(0, 90, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, cm.model(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("cache", "allocate"), [(None, "uniform"), ("static", "uniform"), ("static", "sensitivity")]
)
def test_generation_with_a_cache_follows_the_full_forward(tokenizer, cache, allocate):
    """The dynamic cache and the static one (its layers sized by their first keys: head
    dims may differ by layer under --allocate)."""
    cm = compress_structured(tokenizer, "attn-dims", "attn", allocate=allocate)
    ids = torch.randint(0, 90, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = cm.model.generate(
            ids,
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            cache_implementation=cache,
        )
        logits = cm.model(input_ids=out.sequences[:, :-1]).logits
    # the cached steps' logits are the full forward's (two code paths: a tolerance)
    torch.testing.assert_close(torch.cat(out.logits), logits[0, 5:], rtol=1e-4, atol=1e-5)


def test_attn_and_its_matrices_cannot_both_be_targets(tokenizer):
    with pytest.raises(AecompressError, match="q_proj is a target of both"):
        aecompress.compress(
            tiny_llama(),
            tokenizer=tokenizer,
            method="attn=attn-dims;q=svd",
            ratio=1.5,
            progress=False,
        )


def small_config(**fields: object) -> dict[str, object]:
    return dict(
        vocab_size=96,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        **fields,
    )


@pytest.mark.parametrize(
    ("arch", "fields", "problem"),
    [("Qwen3", {}, "q_norm"), ("Llama", {"attention_bias": True}, "biases")],
)
def test_other_attention_layouts_are_refused(arch, fields, problem):
    config = getattr(transformers, f"{arch}Config")(**small_config(**fields))
    model = getattr(transformers, f"{arch}ForCausalLM")(config)
    with pytest.raises(AecompressError, match=f"Llama-style attention.*{problem}"):
        resolve_targets(model, ["attn"])
