"""Memory and step throughput against contrastive batch size, with and without GradCache, and per mesh shape.

    python tools/bench_scale.py memory [--size small] [--batches 64,128,256,512,1024] [--chunk_size 32] [--seq_len 64]
    python tools/bench_scale.py max_batch --size xl --dtype bfloat16 --seq_len 256 [--chunk_size 32]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/bench_scale.py meshes [--size tiny]
    python tools/bench_scale.py memory --quick      # what CI runs

`memory`: for each batch size, the train step's memory as XLA plans it (temporaries + arguments +
outputs, from the compiled program: exact and machine-independent) and, with `--time`, its steps/s.
`max_batch`: the largest batch whose planned memory fits the device (doubling, then checked by running
one step), without GradCache and with it. `meshes`: step time per (data, fsdp, model) mesh on the
devices present. MFU is printed where a step is timed, against a matmul peak measured in the same run.
"""

import argparse
import pathlib
import sys
import time

import flax.linen as nn
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from benchlib import SIZES, add_training_layout_arguments, matmul_peaks  # noqa: E402


def build(size, dtype, batch_size, chunk_size, remat=False, scan_layers=True, prng_impl="rbg"):
    import jax
    import jax.numpy as jnp

    from instructor_jax.model.config import EncoderConfig, HeadConfig
    from instructor_jax.model.encoder import InstructorModel
    from instructor_jax.train.config import TrainConfig
    from instructor_jax.train.step import make_optimizer, make_train_step

    encoder = EncoderConfig(vocab_size=32128, dtype=dtype, remat=remat, scan_layers=scan_layers, **SIZES[size])
    head = HeadConfig(dense_features=768)
    model = InstructorModel(encoder, head)
    cfg = TrainConfig(batch_size=batch_size, grad_cache_chunk_size=chunk_size, warmup_steps=0, dtype=dtype,
                      prng_impl=prng_impl)
    tx, schedule = make_optimizer(cfg)
    return model, tx, make_train_step(model, tx, schedule, cfg), encoder, jax, jnp


def model_options(args):
    return args.remat, not args.unrolled, args.prng_impl


def abstract_inputs(model, tx, jax, jnp, batch_size, seq_len):
    from instructor_jax.model.encoder import init_boxed_params

    params = jax.eval_shape(lambda: nn.unbox(init_boxed_params(model, jax.random.PRNGKey(0))))
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt_state": jax.eval_shape(tx.init, params)}
    batch = {f"{p}_{k}": jax.ShapeDtypeStruct(s, jnp.int32)
             for p, lead in (("query", (batch_size,)), ("pos", (batch_size,)), ("neg", (batch_size, 1)))
             for k, s in (("ids", lead + (seq_len,)), ("mask", lead + (seq_len,)), ("instruction_lengths", lead))}
    return state, batch


def planned_bytes(compiled):
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def concrete(tree, jax, jnp):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype) if s.dtype != jnp.int32 else jnp.ones(s.shape, s.dtype), tree)


def time_steps(step, state, batch, jax, steps=3):
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


def memory(args):
    peak = max(matmul_peaks(args.dtype).values()) if args.time else None
    from instructor_jax.model.flops import encoder_flops

    print(f"{'batch':>6}{'GradCache':>11}{'planned MB':>12}{'steps/s':>9}{'MFU':>7}")
    for batch_size in args.batches:
        for chunk in (None, args.chunk_size) if args.chunk_size else (None,):
            model, tx, step_fn, encoder, jax, jnp = build(args.size, args.dtype, batch_size, chunk,
                                                          *model_options(args))
            state, batch = abstract_inputs(model, tx, jax, jnp, batch_size, args.seq_len)
            step = jax.jit(step_fn, donate_argnums=(0,))
            compiled = step.lower(state, batch).compile()
            row = f"{batch_size:>6}{str(chunk or '-'):>11}{planned_bytes(compiled) / 2**20:>12.1f}"
            if args.time:
                seconds = time_steps(compiled, concrete(state, jax, jnp), concrete(batch, jax, jnp), jax)
                flops = 3 * encoder_flops(np.full(3 * batch_size, args.seq_len), encoder, 768)
                row += f"{1 / seconds:>9.2f}{flops / seconds / peak:>7.1%}"
            print(row, flush=True)


def max_batch(args):
    import jax

    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit") or args.memory_gb * 2**30
    print(f"device {device.device_kind}: {limit / 2**30:.1f} GiB usable; size {args.size}, {args.dtype}, "
          f"seq_len {args.seq_len}")
    modes = {"both": ((None, args.start), (args.chunk_size, args.gc_start)),
             "gradcache": ((args.chunk_size, args.gc_start),), "direct": ((None, args.start),)}[args.which]
    for chunk, batch_size in modes:
        best = None
        while batch_size <= args.limit:
            model, tx, step_fn, encoder, jax, jnp = build(args.size, args.dtype, batch_size, chunk,
                                                          *model_options(args))
            state, batch = abstract_inputs(model, tx, jax, jnp, batch_size, args.seq_len)
            try:
                compiled = jax.jit(step_fn, donate_argnums=(0,)).lower(state, batch).compile()
                planned = planned_bytes(compiled)
            except Exception as e:  # XLA refuses programs that cannot fit
                print(f"  batch {batch_size:>5} GradCache {chunk or '-'}: does not compile ({type(e).__name__})")
                break
            fits = planned <= 0.95 * limit
            print(f"  batch {batch_size:>5} GradCache {str(chunk or '-'):>4}: planned {planned / 2**30:6.1f} GiB "
                  f"{'fits' if fits else 'too large'}", flush=True)
            if not fits:
                break
            best, batch_size = (batch_size, compiled), batch_size * 2
        if best is not None and args.run:
            size, compiled = best
            model, tx, step_fn, encoder, jax, jnp = build(args.size, args.dtype, size, chunk, *model_options(args))
            state, batch = abstract_inputs(model, tx, jax, jnp, size, args.seq_len)
            try:
                seconds = time_steps(compiled, concrete(state, jax, jnp), concrete(batch, jax, jnp), jax, steps=1)
            except Exception as e:  # planned to fit, yet the allocator ran out (fragmentation, other buffers)
                print(f"  -> batch {size} with GradCache {chunk or '-'} was planned to fit but failed to run: "
                      f"{str(e).splitlines()[0][:200]}")
                continue
            print(f"  -> largest batch {size} with GradCache {chunk or '-'} trains: {seconds:.2f} s/step")
        elif best is not None:
            print(f"  -> largest batch {best[0]} with GradCache {chunk or '-'} (planned; not run)")


def meshes(args):
    import jax

    from instructor_jax.model import encoder as model_encoder
    from instructor_jax.runtime import sharding

    n = len(jax.devices())
    shapes = [(n, 1, 1), (1, n, 1), (n // 2, 1, 2), (max(n // 4, 1), 2, 2)]
    print(f"{n} devices; size {args.size}, batch {args.batches[0]}, seq_len {args.seq_len}")
    print(f"{'mesh (data, fsdp, model)':<26}{'s/step':>8}{'tokens/s/device':>17}")
    batch_size = args.batches[0]
    for shape in shapes:
        mesh = sharding.make_mesh(shape)
        chunk = args.chunk_size if args.gradcache else None
        model, tx, step_fn, encoder, jax, jnp = build(args.size, args.dtype, batch_size, chunk, *model_options(args))
        state, batch = abstract_inputs(model, tx, jax, jnp, batch_size, args.seq_len)
        with sharding.activate(mesh):
            param_shardings = model_encoder.param_shardings(model, mesh)
            state_c = concrete(state, jax, jnp)
            state_c["params"] = jax.device_put(nn.unbox(state_c["params"]), param_shardings)
            state_c["opt_state"] = jax.jit(tx.init)(state_c["params"])
            batch_c = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in concrete(batch, jax, jnp).items()}
            seconds = time_steps(jax.jit(step_fn, donate_argnums=(0,)), state_c, batch_c, jax)
        tokens = 3 * batch_size * args.seq_len
        print(f"{str(shape):<26}{seconds:>8.3f}{tokens / seconds / n:>17.0f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("memory", "max_batch", "meshes"))
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batches", default="64,128,256,512,1024")
    parser.add_argument("--chunk_size", type=int, default=32, help="GradCache chunk; memory mode: 0 skips GradCache")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--remat", action="store_true")
    add_training_layout_arguments(parser)
    parser.add_argument("--time", action="store_true", help="memory mode: also time the steps")
    parser.add_argument("--gradcache", action="store_true", help="meshes mode: with GradCache")
    parser.add_argument("--start", type=int, default=8, help="max_batch: first batch size tried without GradCache")
    parser.add_argument("--gc_start", type=int, default=64, help="max_batch: first batch size tried with GradCache")
    parser.add_argument("--limit", type=int, default=4096, help="max_batch: largest batch size tried")
    parser.add_argument("--run", action="store_true", help="max_batch: run one step at the largest batch")
    parser.add_argument("--which", choices=("both", "gradcache", "direct"), default="both",
                        help="max_batch: with GradCache, without it, or both")
    parser.add_argument("--memory_gb", type=float, default=16.0, help="max_batch: memory when the device reports none")
    parser.add_argument("--quick", action="store_true", help="tiny model, two batch sizes")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batches, args.seq_len, args.chunk_size = "tiny", "64,256", 32, 16
    args.batches = [int(b) for b in str(args.batches).split(",")]
    {"memory": memory, "max_batch": max_batch, "meshes": meshes}[args.mode](args)


if __name__ == "__main__":
    main()
