"""`minasgd bench step | kernels | ps`: the flags and the handler; the benches return numbers."""

import json


def add_arguments(p):
    p.add_argument("what", choices=["step", "kernels", "ps"])
    p.add_argument("--backend", default="numpy", choices=["numpy", "cuda", "auto"])
    p.add_argument("--model", default="alexnet-mini")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--gpu", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--static", action="store_true",
                   help="bench kernels: registers, shared memory, spills and occupancy of every kernel, "
                        "compiled offline for sm_80 and sm_90 (no GPU needed)")


def cmd_bench(args, console):
    if args.what == "step":
        from .. import bench_step

        result = bench_step.measure(args.backend, args.model, args.batch_size, args.repeats, args.gpu)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            from ..dashboard import show_bench_step

            show_bench_step(result, console)
        return 0
    if args.what == "ps":
        from ..dashboard import show_bench_ps, show_bench_ps_hostile
        from ..ps import bench as ps_bench

        if args.hostile:
            result = ps_bench.measure_hostile(args.model, args.hostile_workers, args.idle, args.malformed,
                                              args.seconds, args.rounds)
            show = show_bench_ps_hostile
        else:
            training = None if args.skip_training else dict(
                backend=args.backend, gpu=args.gpu, epochs=args.epochs, train_limit=args.train_limit,
                nsync=args.nsync, target=args.target, workers_list=args.workers_list)
            result = ps_bench.measure(args.model, args.seconds, args.transport, training)
            show = show_bench_ps
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            show(result, console)
        return 0
    if args.what == "kernels":
        from .. import bench_kernels

        if args.static:
            result = bench_kernels.static_result()
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                from ..dashboard import show_kernel_static

                show_kernel_static(result, console)
            return 2 if "skipped" in result else 0
        result = bench_kernels.run(backend_device=args.gpu)
        if args.json:
            print(json.dumps(result, indent=2) if "skipped" not in result else json.dumps(result))
        else:
            from ..dashboard import show_bench_kernels

            show_bench_kernels(result, console)
        return 0
    raise AssertionError(args.what)
