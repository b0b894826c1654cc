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
    p.add_argument("--markdown", metavar="FILE",
                   help="bench step: also write the threads scaling table into FILE, between its "
                        "'<!-- bench step scaling -->' and '<!-- end -->' lines (docs/cpu.md)")
    p.add_argument("--static", action="store_true",
                   help="bench kernels: registers, shared memory, spills and occupancy of every kernel, "
                        "compiled offline for sm_80 and sm_90 (no GPU needed)")


def cmd_bench(args, console):
    """Measure (the library returns numbers), then print them as JSON or draw them (the dashboard)."""
    from .. import dashboard

    code = 0
    if args.what == "step":
        from .. import bench_step

        result = bench_step.measure(args.backend, args.model, args.batch_size, args.repeats, args.gpu)
        show = dashboard.show_bench_step
        if args.markdown and result.get("scaling"):
            write_between_markers(args.markdown, bench_step.scaling_markdown(result))
    elif args.what == "ps":
        from ..ps import bench as ps_bench

        if args.hostile:
            result = ps_bench.measure_hostile(args.model, args.hostile_workers, args.idle, args.malformed,
                                              args.seconds, args.rounds)
            show = dashboard.show_bench_ps_hostile
        else:
            training = None if args.skip_training else dict(
                backend=args.backend, gpu=args.gpu, epochs=args.epochs, train_limit=args.train_limit,
                nsync=args.nsync, target=args.target, workers_list=args.workers_list)
            result = ps_bench.measure(args.model, args.seconds, args.transport, training)
            show = dashboard.show_bench_ps
    elif args.what == "kernels":
        from .. import bench_kernels

        if args.static:
            result = bench_kernels.static_result()
            show = dashboard.show_kernel_static
            code = 2 if "skipped" in result else 0
        else:
            result = bench_kernels.run(backend_device=args.gpu)
            show = dashboard.show_bench_kernels
    else:
        raise AssertionError(args.what)
    if args.json:
        print(json.dumps(result, indent=None if "skipped" in result else 2))
    else:
        show(result, console)
    return code


START, END = "<!-- bench step scaling -->", "<!-- end -->"


def write_between_markers(path, text):
    """Replace what lies between the START and END lines of the file at `path` with `text`."""
    from pathlib import Path

    doc = Path(path).read_text()
    if START not in doc or END not in doc.split(START, 1)[1]:
        raise ValueError(f"{path}: needs a line {START} and, after it, a line {END}")
    head, rest = doc.split(START, 1)
    tail = rest.split(END, 1)[1]
    Path(path).write_text(f"{head}{START}\n{text}{END}{tail}")
