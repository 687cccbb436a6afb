"""The FLOPs calculator reproduces the paper's prompt-processing FLOPs reductions."""

import pytest

from mlxeff.models import openelm_config
from mlxeff.techniques import kv_prediction as kvp
from mlxeff.techniques.kv_prediction_flops import PAPER_TABLE, causal_attention_macs, prompt_flops

PAPER = [  # base, auxiliary, reduction (arXiv 2410.08391, Table 1)
    ("1_1B", "450M", 2.36), ("1_1B", "270M", 3.98),
    ("1_1B", 0.75, 1.34), ("1_1B", 0.5, 1.93), ("1_1B", 0.25, 3.60),
    ("3B", "1_1B", 2.81), ("3B", 0.75, 1.34), ("3B", 0.5, 1.97), ("3B", 0.25, 3.84),
]


def aux_and_map(base, aux):
    if isinstance(aux, float):
        layers = kvp.select_layers(base.num_transformer_layers, aux)
        return kvp.subset_args(base, layers), kvp.pruned_layer_map(layers, base.num_transformer_layers)
    a = openelm_config(aux)
    return a, kvp.contiguous_layer_map(a.num_transformer_layers, base.num_transformer_layers)


@pytest.mark.parametrize("base_name,aux_name,want", PAPER)
@pytest.mark.parametrize("tokens", [256, 2048])
def test_paper_reductions(base_name, aux_name, want, tokens):
    base = openelm_config(base_name)
    aux, lmap = aux_and_map(base, aux_name)
    got = prompt_flops(base, aux, lmap, tokens, "paper").reduction
    assert round(got, 2) == want, (base_name, aux_name, got)


def test_the_printed_table_is_the_papers():
    assert PAPER_TABLE == PAPER


def test_exact_convention_counts_more_and_depends_on_length():
    base = openelm_config("1_1B")
    aux, lmap = aux_and_map(base, 0.5)
    short = prompt_flops(base, aux, lmap, 256, "exact")
    long = prompt_flops(base, aux, lmap, 4096, "exact")
    paper = prompt_flops(base, aux, lmap, 256, "paper")
    # no auxiliary head and the base's head on one token: the executed work shrinks more
    assert short.reduction > paper.reduction
    assert long.reduction != short.reduction
    assert causal_attention_macs(base, 3) == causal_attention_macs(base, 1, 0) + \
        causal_attention_macs(base, 1, 1) + causal_attention_macs(base, 1, 2)


def test_bad_arguments():
    base = openelm_config("270M")
    with pytest.raises(ValueError):
        prompt_flops(base, base, list(range(16)), 1)
    with pytest.raises(ValueError):
        prompt_flops(base, base, list(range(15)), 64)
    with pytest.raises(ValueError):
        prompt_flops(base, base, list(range(16)), 64, "other")
