"""Two fixes to what Pallas' Triton lowering emits for our kernels, found compiling them offline for sm_90a,
and one to how Pallas interprets them.

1. FP8 dots on wgmma. Pallas lowers `jnp.dot` to a `tt.dot` without `maxNumImpreciseAcc` (JAX 0.10
   to 0.12). For an fp8 x fp8 -> float32 dot Triton then refuses Hopper's wgmma, which it allows
   only where the tensor core may sum at least 32 products in its own reduced-precision
   accumulator before each float32 promotion, and falls back to mma.sync on operands upcast to
   f16: FP8 inputs halve the bytes read but never reach the FP8 tensor-core rate (the indexer
   scores kernel at 4:64:8:2 on fp8 q and k: f16 mma.sync at 154 registers as Pallas lowers it,
   fp8 wgmma at 112 with the attribute). `use_fp8_wgmma(name)` gives that kernel's fp8 dots
   maxNumImpreciseAcc = 128: up to 128 products per promotion, DeepGEMM's interval for its FP8
   GEMMs and the indexer's whole contraction (D = 128).
2. Relaxed atomic adds. Pallas lowers every atomic to `tt.atomic_rmw` with acquire-release
   semantics at GPU scope; in SASS each becomes MEMBAR.ALL.GPU + ATOMG + CCTL.IVALL: the thread
   waits for all of its outstanding memory operations, then the SM's L1 cache is invalidated, at
   every add (the fused sparse MLA backward issues 18 per block of gathered rows, and then
   gathers the next block through the emptied L1). Adding into a buffer that nothing reads before
   the kernel ends needs atomicity only: `relax_atomic_adds(name)` makes that kernel's atomic adds
   relaxed, which compile to fire-and-forget REDs without barriers.

3. Exact interpreted atomic adds. In interpret mode Pallas discharges an atomic add at gathered
   (array) indices as `ref.at[idx].set(ref[idx] + val)` (JAX 0.10.2 to 0.12.0.1), so of several lanes adding
   into the same element within one call only one lands; on a GPU each lane's add is its own atomic
   and all land. The sparse MLA backward adds a block of row gradients at the rows' indices, so a
   row selected twice by one query lost a gradient when interpreted (and only then).
   `exact_interpreted_atomic_adds()` makes that discharge `ref.at[idx].add(val)`, the hardware's
   result (each lane gets the element's value before the call, one of the values a GPU may return).

Fixes 1 and 2 are scoped to the pallas_calls named (a kernel whose atomics order other memory
operations, a flag or a lock, keeps its semantics) and work by wrapping JAX's lowering rules for
`lax.dot_general` and Pallas' atomic primitive in an internal table
(`jax._src.pallas.triton.lowering.triton_lowering_rules`), once per process. Lowering happens
when the enclosing jit compiles, after the kernel wrappers have run, so the names are registered
for the life of the process. Fix 3 wraps the atomic primitive's discharge rule (the internal
`jax._src.state.discharge._discharge_rules`) for the process: interpreted, an atomic add at
gathered indices is a scatter-add whatever the kernel. tests/pallas_kernels/test_triton_lowering.py
checks that the three take effect; `experiments/triton_static.py` shows the SASS effect of 1 and 2.

`export_for_cuda` runs the lowering on a machine with no GPU (tests, `triton_static`): Pallas asks the
device for its compute capability, and from JAX 0.11 finds none unless an abstract mesh names one
(0.10 assumed 9.0), so it names an H200.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.triton import dialect as tt_dialect
from jax._src.pallas.triton import lowering
from jax._src.pallas.triton import primitives as triton_primitives
from jax._src.state import discharge as state_discharge
from jax._src.state import indexing

TRITON_CALL = "__gpu$xla.gpu.triton"  # the custom call target a Pallas Triton kernel lowers to
PROMOTION_INTERVAL = 128  # fp8 products summed in the tensor core before each float32 add

_FP8 = (jnp.float8_e4m3fn, jnp.float8_e5m2)
_FP8_WGMMA: set[str] = set()     # kernel names whose fp8 dots go to wgmma
_RELAXED_ADDS: set[str] = set()  # kernel names whose atomic adds are relaxed


def _owner(value, op_name, fix):
    """The op that produced `value`, checked to be `op_name` (else the lowering changed under us: fail loudly)."""
    op = value.owner
    if op.name != op_name:
        raise NotImplementedError(f"pallas_kernels.triton_lowering ({fix}): expected a {op_name} result, got {op.name}")
    return op


def _fp8_dot_rule(rule):
    def dot_general(ctx, a, b, **params):
        out = rule(ctx, a, b, **params)
        (a_aval, b_aval), (out_aval,) = ctx.avals_in, ctx.avals_out
        if (ctx.context.name in _FP8_WGMMA and a_aval.dtype in _FP8 and b_aval.dtype in _FP8
                and out_aval.dtype == jnp.float32):  # float32 out: the dot's own result, no cast after it
            dot = _owner(out, "tt.dot", "fp8 wgmma")
            dot.attributes["maxNumImpreciseAcc"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32),
                                                                      PROMOTION_INTERVAL)
        return out

    return dot_general


def _relaxed_add_rule(rule):
    def atomic_rmw(ctx, *args, atomic_type, **params):
        out = rule(ctx, *args, atomic_type=atomic_type, **params)
        if ctx.context.name in _RELAXED_ADDS and atomic_type == triton_primitives.AtomicOpType.ADD:
            op = _owner(out, "tt.atomic_rmw", "relaxed adds")
            i32 = ir.IntegerType.get_signless(32)
            if op.attributes["sem"] != ir.IntegerAttr.get(i32, int(tt_dialect.MemSemantic.ACQUIRE_RELEASE)):
                raise NotImplementedError(f"pallas_kernels.triton_lowering (relaxed adds): expected acq_rel "
                                          f"semantics, got {op.attributes['sem']}")
            op.attributes["sem"] = ir.IntegerAttr.get(i32, int(tt_dialect.MemSemantic.RELAXED))
        return out

    return atomic_rmw


def _exact_add_discharge(rule):
    # The rule's leading arguments changed across JAX releases ((in_avals, out_avals) in 0.10, a ctx in
    # 0.11): the operands are the last num_leaves positional arguments, and one output per operand is due.
    def discharge(*args, args_tree, atomic_type):
        args_flat = args[len(args) - args_tree.num_leaves:]
        ref, transforms, val, mask = args_tree.unflatten(args_flat)
        gathered = (atomic_type == triton_primitives.AtomicOpType.ADD and mask is None and len(transforms) == 1
                    and isinstance(transforms[0], indexing.NDIndexer)
                    and not any(isinstance(i, indexing.Slice) for i in transforms[0].indices))
        if not gathered:  # slices cannot repeat an element: the rule as JAX has it
            return rule(*args, args_tree=args_tree, atomic_type=atomic_type)
        idx = transforms[0].indices
        return (ref.at[idx].add(val),) + (None,) * (len(args_flat) - 1), ref[idx]

    return discharge


def _wrap_once(rules, primitive, wrap):
    """rules[primitive] = wrap(rules[primitive]), unless already wrapped (idempotent)."""
    if not getattr(rules[primitive], "deepseek_jax_fix", False):
        rules[primitive] = wrap(rules[primitive])
        rules[primitive].deepseek_jax_fix = True


def _install():
    """Wraps the two lowering rules once."""
    for primitive, wrap in ((lax.dot_general_p, _fp8_dot_rule), (triton_primitives.atomic_rmw_p, _relaxed_add_rule)):
        _wrap_once(lowering.triton_lowering_rules, primitive, wrap)


def use_fp8_wgmma(kernel_name: str):
    """The pallas_call named kernel_name lowers its fp8 x fp8 -> float32 dots for Hopper's fp8 wgmma."""
    _install()
    _FP8_WGMMA.add(kernel_name)


def relax_atomic_adds(kernel_name: str):
    """The pallas_call named kernel_name lowers its atomic adds with relaxed semantics (atomic, unordered)."""
    _install()
    _RELAXED_ADDS.add(kernel_name)


def exact_interpreted_atomic_adds():
    """Interpreted atomic adds at gathered indices accumulate every lane's value, repeated indices included."""
    rules = state_discharge._discharge_rules
    if triton_primitives.atomic_rmw_p not in rules:
        raise NotImplementedError("pallas_kernels.triton_lowering (exact interpreted adds): JAX has no discharge "
                                  "rule for Pallas' atomic_rmw where one was expected")
    _wrap_once(rules, triton_primitives.atomic_rmw_p, _exact_add_discharge)


def export_for_cuda(fn, args, device_kind="NVIDIA H200"):
    """jax.export of jit(fn)(*args) for CUDA, here with or without a GPU: each pallas_call lowered to Triton IR
    for device_kind (tracing only: nothing runs)."""
    gpu = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("_",), abstract_device=gpu)):
        return jax.export.export(jax.jit(fn), platforms=("cuda",),
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
