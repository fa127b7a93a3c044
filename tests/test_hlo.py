"""Reading compiled HLO: replica-group formats, mesh axes, loop trip counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshpar as mp
from meshpar.inspect.hlo import (COLLECTIVES, Instruction, collectives, collectives_in_loops, dot_flops,
                         dots, instructions, mesh_axes_of, parse_groups)


@pytest.fixture(scope="module")
def mesh():
    return mp.make_mesh(data=2, fsdp=2, tensor=2)


def test_explicit_iota_and_mesh_replica_groups(mesh):
    assert parse_groups("replica_groups={{0,1},{2,3}}, to_apply=%add") == [[0, 1], [2, 3]]
    # [4,2]<=[4,2]T(1,0): ids 0..7 as 4x2, transposed, then 4 groups of 2.
    groups = parse_groups("replica_groups=[4,2]<=[4,2]T(1,0), dimensions={1}")
    assert groups == np.arange(8).reshape(4, 2).T.reshape(4, 2).tolist()
    groups = parse_groups(
        "replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([2,2,2]T(1,0,2)) {'axis_0'}, dimensions={0}")
    ids = np.arange(8).reshape(2, 2, 2).transpose(1, 0, 2).reshape(2, 4)
    assert groups == ids.T.reshape(4, 2).tolist()
    assert parse_groups("source_target_pairs={{0,1},{1,0}}") == [[0, 1], [1, 0]]


def test_empty_replica_groups_mean_all_devices(mesh):
    # replica_groups={}: one group of every device, which takes the device count to spell out.
    attrs = "replica_groups={}, use_global_device_ids=true, to_apply=%add"
    assert parse_groups(attrs, num_devices=8) == [list(range(8))]
    assert parse_groups(attrs) == []  # all devices, count unknown
    assert parse_groups("replica_groups={ }, dimensions={0}", num_devices=2) == [[0, 1]]
    assert parse_groups("to_apply=%add") is None
    # The count is only for {}: explicit groups stay as written.
    assert parse_groups("replica_groups={{0,1},{2,3}}", num_devices=8) == [[0, 1], [2, 3]]
    # collectives() knows the count from the mesh: the op spans every axis of size > 1.
    text = HLO.replace("%ar0 = f32[4]{0} all-reduce(%x), replica_groups={{0,1}}",
                       "%ar0 = f32[4]{0} all-reduce(%x), replica_groups={}")
    assert "replica_groups={}" in text
    ops = {op.name: op for op in collectives(text, mesh=mesh)}
    assert ops["ar0"].group_size == 8
    assert ops["ar0"].mesh_axes == ("data", "fsdp", "tensor")
    assert ops["ar0"].traffic_bytes == pytest.approx(2 * 7 / 8 * 16)
    assert ops["ar"].group_size == 2 and ops["ar"].mesh_axes == ("tensor",)


def test_groups_map_to_mesh_axes(mesh):
    # Device ids are flat indices into the mesh: data is the slowest axis, tensor the fastest.
    assert mesh_axes_of([[0, 1], [2, 3], [4, 5], [6, 7]], mesh) == ("tensor",)
    assert mesh_axes_of([[0, 4], [1, 5]], mesh) == ("data",)
    assert mesh_axes_of([[0, 2, 4, 6]], mesh) == ("data", "fsdp")


HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  ROOT %s = f32[] add(%a, %a)
}

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4] parameter(0)
  ROOT %ag = f32[4]{0} all-gather(%p), replica_groups={{0,1}}, dimensions={0}
}

%inner_body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]) parameter(0)
  %x = f32[4] get-tuple-element(%t), index=1
  %ar = f32[4]{0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%add
  ROOT %r = (s32[], f32[4]) tuple(%x, %ar)
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]) parameter(0)
  %x = f32[4] get-tuple-element(%t), index=1
  %cp = f32[4]{0} collective-permute-start(%x), source_target_pairs={{0,1},{1,0}}
  %f = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused
  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = (s32[], f32[4]) tuple(%x, %cp)
}

%cond (t: (s32[], f32[4])) -> pred[] {
  %t = (s32[], f32[4]) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4] parameter(0)
  %ar0 = f32[4]{0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%add
  %w = (s32[], f32[4]) while(%x), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}, metadata={op_name="a=b"}
  ROOT %o = f32[4] get-tuple-element(%w), index=1
}
"""


def test_collectives_in_loops_walks_called_computations():
    assert collectives_in_loops(HLO) == {"collective-permute": 1, "all-gather": 1, "all-reduce": 1}


def test_trip_counts_multiply_through_nested_loops():
    ops = {op.name: op for op in collectives(HLO)}
    assert ops["ar0"].trip_count == 1 and not ops["ar0"].in_loop
    assert ops["cp"].trip_count == 5 and ops["ag"].trip_count == 5
    assert ops["ar"].trip_count == 15
    assert ops["ar"].result_bytes == 16
    assert ops["ar"].traffic_bytes == pytest.approx(16.0)  # 2(n-1)/n x 16 with n = 2


def test_instructions_split_every_computation():
    got = list(instructions(HLO))
    assert all(isinstance(i, Instruction) for i in got)
    assert [i.computation for i in got if i.op.removesuffix("-start") in COLLECTIVES] == [
        "fused", "inner_body", "body", "main"]
    assert {i.computation for i in got} == {"add", "fused", "inner_body", "body", "cond", "main"}
    (ar,) = [i for i in got if i.name == "ar"]
    assert ar == ("inner_body", "ar", "f32[4]{0}", "all-reduce",
                  "%x), replica_groups={{0,1}}, to_apply=%add")
    (cp,) = [i for i in got if i.name == "cp"]
    assert cp.op == "collective-permute-start" and parse_groups(cp.rest) == [[0, 1], [1, 0]]
    (w,) = [i for i in got if i.computation == "main" and i.op == "while"]
    assert w.result == "(s32[], f32[4])" and 'op_name="a=b"' in w.rest


def test_dots_read_shapes_dimension_numbers_and_trip_counts():
    def f(x, ws, a, b):
        y = jax.lax.scan(lambda c, w: (c @ w, None), x, ws)[0]           # 7 x [16,32]@[32,32]
        z = jnp.einsum("bij,bjk->bik", a, b)                              # once, batched
        return y, z

    args = (jnp.ones((16, 32)), jnp.ones((7, 32, 32)), jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6)))
    text = jax.jit(f).lower(*args).compile().as_text()
    got = sorted(dots(text), key=lambda d: d.executions)
    assert len(got) == 2
    batched, looped = got
    assert (looped.lhs, looped.rhs, looped.result) == ((16, 32), (32, 32), (16, 32))
    assert looped.executions == 7 and looped.in_loop and looped.dtype == "f32"
    assert (looped.lhs_contracting, looped.lhs_batch) == ((1,), ())
    assert looped.flops == 2 * 16 * 32 * 32
    assert (batched.lhs, batched.rhs, batched.result) == ((3, 4, 5), (3, 5, 6), (3, 4, 6))
    assert (batched.lhs_batch, batched.rhs_batch) == ((0,), (0,))
    assert (batched.lhs_contracting, batched.rhs_contracting) == ((2,), (1,))
    assert batched.executions == 1 and not batched.in_loop
    # dot_flops is the sum over dots(), weighted by executions.
    assert dot_flops(text)["total"] == 7 * looped.flops + batched.flops == 7 * 32768 + 720
