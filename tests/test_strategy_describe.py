"""``Strategy.describe``: the strategy that actually applies on a mesh, for run summaries."""

import pytest

import meshpar as mp


@pytest.mark.parametrize("strategy, axes, text", [
    ("auto", {"fsdp": 4, "tensor": 2}, "auto -> ZeRO-3 over fsdp + TP over tensor"),
    ("auto", {"data": 8}, "auto -> DP over data"),
    ("auto", {"data": 2, "fsdp": 2, "tensor": 2},
     "auto -> ZeRO-3 over fsdp + TP over tensor + DP over data"),
    # auto settles on ZeRO-1 on a pipelined mesh (Strategy.for_mesh).
    ("auto", {"pipe": 2, "fsdp": 4}, "auto -> ZeRO-1 over fsdp (pipelined over pipe=2)"),
    ("auto", {"pipe": 4, "data": 2}, "auto -> DP over data (pipelined over pipe=4)"),
    ("zero3", {"pipe": 2, "fsdp": 4}, "zero3 -> ZeRO-3 over fsdp (pipelined over pipe=2)"),
    ("zero2", {"data": 2, "fsdp": 4}, "zero2 -> ZeRO-2 over fsdp + DP over data"),
    ("dp", {"data": 2, "fsdp": 4}, "dp -> DP over data x fsdp"),
    ("tp_sp", {"fsdp": 4, "tensor": 2}, "tp_sp -> TP+SP over tensor + DP over fsdp"),
    # A size-1 axis does nothing and is not named.
    ("auto", {"data": 8, "tensor": 1}, "auto -> DP over data"),
])
def test_describe_names_what_runs(strategy, axes, text):
    assert mp.get_strategy(strategy).describe(mp.make_mesh(**axes)) == text


def test_describe_with_overrides_and_user_rules():
    mesh = mp.make_mesh(fsdp=4, tensor=2)
    zero2 = mp.get_strategy("auto", zero_stage=2)
    assert zero2.describe(mesh) == "auto -> ZeRO-2 over fsdp + TP over tensor"
    mine = mp.Strategy("mine", zero_stage=0, extra_param_rules=mp.Rules.table([("embed", "foo")]))
    assert mine.describe(mp.make_mesh(data=2, foo=4)) == "mine -> DP over data + user rules over foo"


def test_describe_on_one_device():
    import jax

    mesh = mp.make_mesh(data=1, devices=jax.devices()[:1])
    assert mp.get_strategy("auto").describe(mesh) == "auto -> no parallelism"


def test_describe_checks_the_mesh():
    with pytest.raises(mp.StrategyError, match=r"needs a 'tensor' mesh axis"):
        mp.get_strategy("tp").describe(mp.make_mesh(data=8))


def test_the_pipelined_zero_stage_is_a_field_not_a_name():
    # `name` is a label: a custom strategy called "auto" keeps its ZeRO stage on a pipelined mesh,
    # and any strategy can ask for auto's lowering through the field.
    pipelined = mp.make_mesh(pipe=2, fsdp=4)
    assert mp.Strategy("auto", zero_stage=3).for_mesh(pipelined).zero_stage == 3
    assert mp.Strategy("mine", zero_stage=3, pipeline_zero_stage=1).for_mesh(pipelined).zero_stage == 1
    assert mp.Strategy("mine", zero_stage=3, pipeline_zero_stage=1).for_mesh(
        mp.make_mesh(fsdp=8)).zero_stage == 3
    # An explicit stage is the stage that runs (`meshpar train --strategy auto --zero 3`, the
    # planner's ZeRO-3 pipelines); auto alone lowers it.
    assert mp.get_strategy("auto").for_mesh(pipelined).zero_stage == 1
    assert mp.get_strategy("auto", zero_stage=3).for_mesh(pipelined).zero_stage == 3
    assert mp.get_strategy("auto", zero_stage=2).describe(pipelined) == (
        "auto -> ZeRO-2 over fsdp (pipelined over pipe=2)")
    with pytest.raises(mp.StrategyError, match=r"pipeline_zero_stage=4; ZeRO stages are 0, 1, 2 and 3"):
        mp.Strategy(pipeline_zero_stage=4)
