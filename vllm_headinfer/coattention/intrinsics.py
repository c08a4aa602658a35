"""The LLVM operations numba does not offer that CPU co-attention's kernel
(kernel.py) and serving loop (service.py) use: atomic reads and writes of an
array's item through its pointer, a prefetch hint, the cycle counter, and a
word's bits read as a float32. Each is a numba intrinsic, usable only from
compiled code."""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic


def _item_pointer(context, builder, signature, args):
    """The pointer to ``args[0][args[1]]`` (an array and an index), and the
    array's numba type."""
    array_type = signature.args[0]
    array_value = context.make_array(array_type)(context, builder, args[0])
    pointer = cgutils.get_item_pointer(context, builder, array_type, array_value, [args[1]],
                                       wraparound=False)
    return pointer, array_type


@intrinsic
def fetch_add(typingctx, array, index, value):
    """``array[index] += value`` atomically (sequentially consistent);
    returns the value before. The thread that takes a request's count to 0
    sees every other thread's writes made before they counted down."""

    def codegen(context, builder, signature, args):
        pointer, _ = _item_pointer(context, builder, signature, args)
        return builder.atomic_rmw("add", pointer, args[2], "seq_cst")

    return types.int64(array, index, types.int64), codegen


@intrinsic
def prefetch(typingctx, array, index):
    """A hint to fetch ``array[index]``'s cache line: the next block of
    context is a random page of the pool, so the hardware prefetcher cannot
    guess it, while the current block's arithmetic leaves the memory idle."""

    def codegen(context, builder, signature, args):
        pointer, _ = _item_pointer(context, builder, signature, args)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        # read, high locality, data cache
        builder.call(function, [builder.bitcast(pointer, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@intrinsic
def load_acquire(typingctx, array, index):
    """``array[index]``, read again on every call (the loop waits on words
    other threads, or the GPU, write)."""

    def codegen(context, builder, signature, args):
        pointer, array_type = _item_pointer(context, builder, signature, args)
        return builder.load_atomic(pointer, "acquire", array_type.dtype.bitwidth // 8)

    return array.dtype(array, index), codegen


@intrinsic
def store_release(typingctx, array, index, value):
    """``array[index] = value``, visible after every write before it."""

    def codegen(context, builder, signature, args):
        pointer, array_type = _item_pointer(context, builder, signature, args)
        item = context.cast(builder, args[2], signature.args[2], array_type.dtype)
        builder.store_atomic(item, pointer, "release", array_type.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.void(array, index, value), codegen


@intrinsic
def cycles(typingctx):
    """The processor's cycle counter (a clock for the idle timeout)."""

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, []),
                                                  "llvm.readcyclecounter")
        return builder.call(function, [])

    return types.int64(), codegen


@intrinsic
def bits_to_float(typingctx, word):
    """The float32 whose bits are the low 32 of the unsigned ``word``."""
    if not isinstance(word, types.Integer) or word.signed:
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if word.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(word), codegen
