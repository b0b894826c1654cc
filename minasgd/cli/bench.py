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
        from ..ps import bench as ps_bench

        return ps_bench.run(args, console)
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
