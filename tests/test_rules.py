"""Rule resolution: first-free-axis semantics, tuples, regex rules, conflicts and errors."""

import pytest
from jax.sharding import PartitionSpec as P

import meshpar as mp
from meshpar.sharding.rules import Rule, Rules


@pytest.fixture(scope="module")
def mesh():
    return mp.make_mesh(data=2, fsdp=2, tensor=2)


def test_first_rule_whose_axes_are_free_wins(mesh):
    rules = Rules.table([("embed", "fsdp"), ("mlp", "fsdp"), ("mlp", "tensor")])
    # embed takes fsdp first, so mlp falls through to its second rule, whatever the dim order.
    assert rules.resolve(("embed", "mlp"), (8, 8), mesh).spec == P("fsdp", "tensor")
    assert rules.resolve(("mlp", "embed"), (8, 8), mesh).spec == P("tensor", "fsdp")
    # Without an embed dimension, mlp gets its first choice.
    assert rules.resolve(("mlp",), (8,), mesh).spec == P("fsdp")


def test_table_order_is_priority_and_none_is_an_explicit_fallback(mesh):
    rules = Rules.table([("embed", "fsdp"), ("mlp", "fsdp"), ("mlp", None)])
    res = rules.resolve(("mlp", "embed"), (8, 8), mesh)
    assert res.spec == P(None, "fsdp")
    assert res.dims[0].rule == "mlp->replicated"
    assert res.rules_text == "mlp->replicated, embed->fsdp"


def test_major_first_rules_are_tried_in_the_tensors_dimension_order(mesh):
    group = [Rule("embed", ("fsdp",), major_first=True), Rule("mlp", ("fsdp",), major_first=True)]
    rules = Rules.table([*group, ("embed", None), ("mlp", None)])
    # The major-most dimension the group names claims fsdp, whatever the table order.
    assert rules.resolve(("embed", "mlp"), (8, 8), mesh).spec == P("fsdp")
    assert rules.resolve(("mlp", "embed"), (8, 8), mesh).spec == P("fsdp")
    assert rules.resolve(("layers", "mlp", "embed"), (3, 8, 8), mesh).spec == P(None, "fsdp")
    assert str(group[0]) == "embed->fsdp major-most first"
    # A dimension an earlier rule took is passed by: with mlp->tensor first, (mlp, embed)
    # keeps fsdp on embed.
    with_tp = Rules.table([("mlp", "tensor"), *group, ("embed", None), ("mlp", None)])
    assert with_tp.resolve(("mlp", "embed"), (8, 8), mesh).spec == P("tensor", "fsdp")
    # Only consecutive major_first rules form a group: a plain rule between them is a barrier.
    split = Rules.table([group[0], ("heads", "tensor"), group[1], ("embed", None), ("mlp", None)])
    assert split.resolve(("mlp", "embed"), (8, 8), mesh).spec == P(None, "fsdp")
    # The built-in ZeRO-3 table: the MLP's output weight [mlp, embed] splits its major dimension.
    zero3 = mp.get_strategy("zero3").param_rules(mp.make_mesh(fsdp=8))
    fsdp8 = mp.make_mesh(fsdp=8)
    assert zero3.resolve(("mlp", "embed"), (64, 16), fsdp8).spec == P("fsdp")
    assert zero3.resolve(("embed", "mlp"), (16, 64), fsdp8).spec == P("fsdp")
    assert zero3.resolve(("heads", "head_dim", "embed"), (4, 8, 16), fsdp8).spec == P(None, None, "fsdp")


def test_tuple_rules_split_over_the_product(mesh):
    rules = Rules.table([("batch", ("data", "fsdp")), ("embed", "tensor")])
    res = rules.resolve(("batch", None, "embed"), (8, 3, 4), mesh)
    assert res.spec == P(("data", "fsdp"), None, "tensor")


def test_names_without_rules_are_replicated(mesh):
    res = Rules.table([("embed", "tensor")]).resolve(("head_dim", "embed"), (3, 4), mesh)
    assert res.spec == P(None, "tensor")
    assert res.rules_text == "embed->tensor"


def test_two_dims_needing_the_same_axis_raise(mesh):
    rules = Rules.table([("embed", "fsdp"), ("mlp", "fsdp")])
    with pytest.raises(mp.RuleConflictError,
                       match=r"w \(shape \(8, 8\)\): dimension 1 \('mlp'\) .* 'fsdp' is already used by 'embed'"):
        rules.resolve(("embed", "mlp"), (8, 8), mesh, name="w")


def test_indivisible_names_path_shape_dim_axis_and_size(mesh):
    rules = Rules.table([("mlp", ("fsdp", "tensor"))])
    with pytest.raises(
        mp.IndivisibleError,
        match=r"blocks/w_in \(shape \(4, 6\)\): dimension 1 \('mlp', size 6\) is not divisible "
              r"by mesh axes \('fsdp', 'tensor'\) of size 4 \(fsdp=2 x tensor=2\)\. Fix:",
    ):
        rules.resolve((None, "mlp"), (4, 6), mesh, name="blocks/w_in")


def test_indivisible_replicate_is_opt_in_and_recorded(mesh):
    rules = Rules.table([("mlp", "tensor")], on_indivisible="replicate")
    res = rules.resolve(("mlp",), (3,), mesh, name="b")
    assert res.spec == P()
    assert len(res.fallbacks) == 1 and "not divisible" in res.fallbacks[0]


def test_an_if_divisible_rule_is_a_preference_passed_over_where_it_does_not_divide(mesh):
    # The fsdp preset's table for a [vocab, embed] embedding: vocab takes fsdp where it
    # divides, and otherwise embed does, as without the preference -- said, never raised.
    rules = Rules.table([Rule("vocab", ("fsdp",), if_divisible=True), ("embed", "fsdp"),
                         ("vocab", None), ("embed", None)])
    assert rules.resolve(("vocab", "embed"), (32, 8), mesh).spec == P("fsdp")
    res = rules.resolve(("vocab", "embed"), (33, 8), mesh, name="tok_embed")
    assert res.spec == P(None, "fsdp")
    assert res.dims[0].rule == ("vocab->fsdp if divisible: not taken, size 33 does not divide "
                                "over 2; vocab->replicated")
    assert "not taken" in res.rules_text and not res.fallbacks
    assert res.dims[0].passed_over == (Rule("vocab", ("fsdp",), if_divisible=True),)
    # With nothing after it for the name, the dimension is replicated and says why.
    alone = Rules.table([Rule("vocab", ("fsdp",), if_divisible=True)])
    res = alone.resolve(("vocab",), (33,), mesh)
    assert res.spec == P() and "not taken" in res.rules_text
    assert str(Rule("vocab", ("fsdp",), if_divisible=True)) == "vocab->fsdp if divisible"


def test_rule_naming_unknown_mesh_axis(mesh):
    rules = Rules.table([("embed", "expert")])
    with pytest.raises(mp.RuleError, match=r"names mesh axis 'expert', but the mesh has axes"):
        rules.validate(mesh)
    with pytest.raises(mp.RuleError, match=r"names mesh axis 'expert'"):
        rules.resolve(("embed",), (8,), mesh)


def test_wrong_rank(mesh):
    with pytest.raises(mp.RuleError, match=r"2 logical axes .* rank 1"):
        Rules.table().resolve(("a", "b"), (4,), mesh, name="x")


def test_malformed_rules():
    with pytest.raises(mp.RuleError, match=r"not a \(logical_name, mesh_axes\) pair"):
        Rules.table([("embed",)])
    with pytest.raises(mp.RuleError, match=r"repeat an axis"):
        Rules.table([("embed", ("fsdp", "fsdp"))])
    with pytest.raises(mp.RuleError, match=r"not a valid regex"):
        Rules.table(paths=[("(", ("embed",))])
    with pytest.raises(mp.RuleError, match=r"on_indivisible='x'"):
        Rules(on_indivisible="x")


def test_merge_keeps_order_and_detects_conflicts():
    a = Rules.table([("embed", "fsdp"), ("embed", None)])
    b = Rules.table([("embed", "fsdp"), ("embed", None), ("mlp", "tensor")])
    merged = a.merge(b)
    assert [str(r) for r in merged.logical] == ["embed->fsdp", "embed->replicated", "mlp->tensor"]
    with pytest.raises(mp.RuleConflictError, match=r"disagree on logical axis 'embed'"):
        a.merge(Rules.table([("embed", "tensor")]))
    with pytest.raises(mp.RuleConflictError, match=r"disagree on path rule 'k'"):
        Rules.table(paths=[("k", ("embed",))]).merge(Rules.table(paths=[("k", ("mlp",))]))
    with pytest.raises(mp.RuleConflictError, match=r"disagree on options"):
        a.merge(Rules.table(strict=True))


def test_path_rules_first_match_wins():
    rules = Rules.table(paths=[(r"attn/.*kernel$", ("embed", "heads")), (r"kernel$", ("embed", "mlp"))])
    assert rules.path_axes("layer0/attn/q/kernel")[1] == ("embed", "heads")
    assert rules.path_axes("layer0/mlp/kernel")[1] == ("embed", "mlp")
    assert rules.path_axes("layer0/mlp/bias") is None


def test_skip_axes_drops_manual_axes_from_rules():
    mesh = mp.make_mesh(data=2, fsdp=2, tensor=2)
    rules = Rules.table([("batch", ("data", "fsdp")), ("embed", "tensor")])
    # Inside a shard_map manual over data: the batch dim is already local along data.
    spec = rules.resolve(("batch", "embed"), (4, 8), mesh, skip_axes=("data",)).spec
    assert spec == P("fsdp", "tensor")
    spec = rules.resolve(("batch", "embed"), (4, 8), mesh, skip_axes=("data", "fsdp")).spec
    assert spec == P(None, "tensor")


def test_tuple_entries_resolve_each_name_and_split_over_the_product(mesh):
    rules = Rules.table([("fsdp", "fsdp"), ("tensor", "tensor"), ("data", None)])
    res = rules.resolve((("fsdp", "tensor"), ("data",), None), (8, 2, 3), mesh)
    assert res.spec == P(("fsdp", "tensor"))
    assert res.dims[0].logical == ("fsdp", "tensor")
    assert res.rules_text == "fsdp->fsdp, tensor->tensor, data->replicated"
    with pytest.raises(mp.RuleError,
                       match=r"logical axis 3 is not a name, a tuple of names or None"):
        rules.resolve((3,), (8,), mesh, name="w")


def test_unmatched_names_are_recorded_and_strict_rejects_them(mesh):
    res = Rules.table([("embed", "tensor")]).resolve(("kv", ("embed", "heads")), (3, 4), mesh)
    assert res.spec == P(None, "tensor") and res.unmatched == ("kv", "heads")
    with pytest.raises(mp.UnannotatedParameterError,
                       match=r"w \(shape \(3, 4\)\): dimension 0 has logical axis 'kv', which no "
                             r"rule maps .* Fix: add a rule \('kv', <mesh axis>\) to shard it or "
                             r"\('kv', None\) to replicate it"):
        Rules.table([("embed", "tensor")], strict=True).resolve(("kv", "embed"), (3, 4), mesh,
                                                                 name="w")


def test_the_presets_prefer_vocab_for_fsdp_without_tensor_and_pipe_for_the_outer_batch():
    """Two if-divisible preferences of the built-in tables (issue 13, benchmarks/README.md)."""
    strategy = mp.get_strategy("auto")
    fsdp8 = mp.make_mesh(fsdp=8)
    table = lambda mesh, v: strategy.param_rules(mesh).resolve(("vocab", "embed"), (v, 64), mesh)
    assert table(fsdp8, 256).spec == P("fsdp")
    assert table(fsdp8, 257).spec == P(None, "fsdp")  # passed over: embed, as before
    ft = mp.make_mesh(fsdp=4, tensor=2)
    assert table(ft, 256).spec == P("tensor", "fsdp")  # vocab is tensor's
    piped = mp.make_mesh(pipe=2, fsdp=4)
    logits = lambda b: strategy.compute_rules(piped).resolve(("batch", "seq", "vocab"),
                                                             (b, 8, 256), piped)
    assert logits(8).spec == P(("fsdp", "pipe"))
    assert logits(4).spec == P("fsdp")  # 4 rows do not divide over fsdp x pipe
    # Inside the stages pipe is manual and drops out of the rule.
    inside = strategy.compute_rules(piped).resolve(("batch", None), (8, 8), piped,
                                                   skip_axes=("pipe",))
    assert inside.spec == P("fsdp")
