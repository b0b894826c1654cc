"""The memory profiler (kernels/memprofile.py): sectors and bank conflicts from real simulated launches.

Every expected number here is worked out in the test from the addresses the kernel's threads
touch (NumPy on index formulas written out below), never read back from the profiler, so a
profiler that groups threads into warps wrongly, forgets broadcasts, merges loop iterations
into one request or ignores where a view starts gives a different number and fails.
"""

import numpy as np
import pytest
from numba import cuda, float32

from minasgd.kernels import gemm, memprofile

WARP, BANKS = 32, 32


def only(prof, kernel, space, op, array=None):
    """The InstructionStats of the single `op` on `space` memory in `kernel` (of `array`)."""
    found = [s for s in prof.instructions(kernel) if s.instruction.space == space and s.instruction.op == op
             and (array is None or s.instruction.array == array)]
    assert len(found) == 1, found
    return found[0]


def expected_ways(words):
    """Conflict ways of one warp's shared access, worked out here: distinct words per bank, worst bank."""
    return int(np.bincount(np.unique(words) % BANKS, minlength=BANKS).max())


# ---------------------------------------------------------------- global memory: sectors

@cuda.jit
def copy_strided(x, y, stride):
    i = cuda.grid(1)
    if i < y.size:
        y[i] = x[i * stride]


def copy_profile(stride, threads=64, offset=0):
    x = cuda.to_device(np.arange(threads * stride + offset, dtype=np.float32))
    y = cuda.device_array(threads, np.float32)
    src = x[offset:] if offset else x
    with memprofile.profiling() as prof:
        copy_strided[1, threads](src, y, stride)
    np.testing.assert_array_equal(y.copy_to_host(), np.arange(threads) * stride + offset)
    return prof


def test_a_coalesced_copy_reads_4_sectors_per_request_and_a_32_float_stride_reads_32():
    unit = only(copy_profile(1), "copy_strided", "global", "load")
    assert (unit.requests, unit.sectors_per_request, unit.efficiency) == (2, 4.0, 1.0)
    strided = only(copy_profile(32), "copy_strided", "global", "load")
    assert (strided.requests, strided.sectors_per_request, strided.efficiency) == (2, 32.0, 1 / 8)
    two = only(copy_profile(2), "copy_strided", "global", "load")  # every other float: 8 sectors, half used
    assert (two.sectors_per_request, two.efficiency) == (8.0, 0.5)
    store = only(copy_profile(32), "copy_strided", "global", "store")  # y[i] stays coalesced
    assert (store.sectors_per_request, store.efficiency) == (4.0, 1.0)


def test_a_view_one_float_in_is_misaligned_by_the_allocation_not_the_view():
    """x[1:] starts 4 bytes into its allocation: 32 floats from there straddle 5 sectors, not 4."""
    load = only(copy_profile(1, offset=1), "copy_strided", "global", "load")
    assert (load.sectors_per_request, load.efficiency) == (5.0, 128 / 160)


def test_a_partial_warp_is_one_request_of_its_own_threads():
    load = only(copy_profile(1, threads=40), "copy_strided", "global", "load")  # warps of 32 and 8 threads
    assert (load.requests, load.sectors) == (2, 4 + 1)


@cuda.jit
def read_rows(x, y):
    """Thread (tx, ty) of a (16, 4) block copies x[ty, tx]: a warp is rows ty, ty + 1 (by linear id)."""
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    y[ty, tx] = x[ty, 2 * tx]


def test_warps_are_32_consecutive_linear_thread_ids():
    x = cuda.to_device(np.arange(4 * 32, dtype=np.float32).reshape(4, 32))
    y = cuda.device_array((4, 16), np.float32)
    with memprofile.profiling() as prof:
        read_rows[1, (16, 4)](x, y)
    # warp w = threads ty in {2w, 2w + 1}: rows 2w and 2w + 1 of x (128 bytes each), every other float
    t = np.arange(64)
    tx, ty = t % 16, t // 16
    addresses = 4 * (ty * 32 + 2 * tx)
    expect = [len(np.unique(addresses[w * WARP:(w + 1) * WARP] // 32)) for w in range(2)]
    load = only(prof, "read_rows", "global", "load")
    assert load.requests == 2 and load.sectors == sum(expect) == 16


@cuda.jit
def copy_3d(x, y):
    tx, ty, tz = cuda.threadIdx.x, cuda.threadIdx.y, cuda.threadIdx.z
    y[tz, ty, tx] = x[tz, ty, tx]


def test_a_3d_block_is_cut_into_warps_by_x_then_y_then_z():
    """A (4, 4, 4) block: linear id x + 4 y + 16 z, so warp 0 is z = 0, 1 and reads 32 consecutive floats."""
    x, y = cuda.to_device(np.arange(64, dtype=np.float32).reshape(4, 4, 4)), cuda.device_array((4, 4, 4), np.float32)
    with memprofile.profiling() as prof:
        copy_3d[1, (4, 4, 4)](x, y)
    load = only(prof, "copy_3d", "global", "load")
    assert (load.requests, load.sectors_per_request, load.efficiency) == (2, 4.0, 1.0)


def test_eight_byte_elements_take_twice_the_sectors():
    """32 consecutive float64 are 256 bytes: 8 sectors, all used; every other one: 16 sectors, half used."""
    x = cuda.to_device(np.arange(128, dtype=np.float64))
    for stride, expect in ((1, (8.0, 1.0)), (2, (16.0, 0.5))):
        y = cuda.device_array(32, np.float64)
        with memprofile.profiling() as prof:
            copy_strided[1, 32](x, y, stride)
        load = only(prof, "copy_strided", "global", "load")
        assert (load.sectors_per_request, load.efficiency) == expect


@cuda.jit
def loop_reads(x, y):
    """Each thread reads x[k * 64 + i] for k = 0..3: four coalesced requests per warp, not one of 16 sectors."""
    i = cuda.threadIdx.x
    acc = float32(0)
    for k in range(4):
        acc += x[k * 64 + i]
    y[i] = acc


def test_each_loop_iteration_is_its_own_request():
    x = cuda.to_device(np.ones(256, np.float32))
    y = cuda.device_array(64, np.float32)
    with memprofile.profiling() as prof:
        loop_reads[1, 64](x, y)
    load = only(prof, "loop_reads", "global", "load")
    assert (load.requests, load.sectors_per_request) == (2 * 4, 4.0)


@cuda.jit
def masked_loop(a, b, out):
    """Iteration k: out[j] = a[j] if b[j] > 0 else 0, j = 32k + i; b makes even threads load a in
    iteration 0 and odd threads in iteration 1 (relu backward's pattern, in a loop)."""
    i = cuda.threadIdx.x
    for k in range(2):
        j = k * 32 + i
        out[j] = a[j] if b[j] > float32(0) else float32(0)


def profile_masked(kernel):
    """Run `kernel(a, b, out)` on one warp over 64 elements where b keeps even threads' element in
    iteration 0 and odd threads' in iteration 1; check out = where(b > 0, a, 0); its profile."""
    a = np.arange(64, dtype=np.float32)
    b = np.where((np.arange(64) + np.arange(64) // 32) % 2 == 0, 1, -1).astype(np.float32)
    out = cuda.device_array(64, np.float32)
    with memprofile.profiling() as prof:
        kernel[1, 32](cuda.to_device(a), cuda.to_device(b), out)
    np.testing.assert_array_equal(out.copy_to_host(), np.where(b > 0, a, 0))
    return prof


def test_a_load_some_threads_skip_is_grouped_by_loop_iteration_not_by_count():
    prof = profile_masked(masked_loop)
    load = only(prof, "masked_loop", "global", "load", "a")
    # one request per iteration, 16 threads each: 4 sectors (all of a[32k : 32k + 32]), half the bytes used
    assert (load.requests, load.sectors_per_request, load.efficiency) == (2, 4.0, 0.5)


@cuda.jit
def branchy_loop(a, b, out):
    """Dropout's pattern: a grid-stride loop whose two branches each do their own store."""
    for j in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        if b[j] > float32(0):
            out[j] = a[j]
        else:
            out[j] = float32(0)


def test_branches_some_threads_take_in_some_iterations_are_grouped_by_iteration():
    """Thread i keeps element i in iteration 0 only when i is even, in iteration 1 only when i is
    odd: counting each thread's executions of the line (not the loop's iterations) would put
    iteration 1 of the odd threads with iteration 0 of the even ones, in one 8-sector request."""
    prof = profile_masked(branchy_loop)
    load = only(prof, "branchy_loop", "global", "load", "a")
    assert (load.requests, load.sectors_per_request, load.efficiency) == (2, 4.0, 0.5)
    stores = [s for s in prof.instructions("branchy_loop") if s.instruction.op == "store"]
    assert [(s.requests, s.sectors_per_request) for s in stores] == [(2, 4.0), (2, 4.0)]


@cuda.jit
def late_first_access(a, out):
    """Odd threads touch memory for the first time in iteration 1 (the even ones in iteration 0)."""
    i = cuda.threadIdx.x
    for k in range(2):
        if (i + k) % 2 == 0:
            out[k * 32 + i] = a[k * 32 + i]


def test_a_thread_whose_first_access_is_in_a_later_iteration_is_counted_from_the_start():
    a, out = cuda.to_device(np.arange(64, dtype=np.float32)), cuda.to_device(np.zeros(64, np.float32))
    with memprofile.profiling() as prof:
        late_first_access[1, 32](a, out)
    load = only(prof, "late_first_access", "global", "load")
    assert (load.requests, load.sectors_per_request, load.efficiency) == (2, 4.0, 0.5)


@cuda.jit(device=True)
def fetch(x, j):
    return x[j]


@cuda.jit
def loop_through_a_device_function(x, y):
    i = cuda.threadIdx.x
    acc = float32(0)
    for k in range(3):
        acc += fetch(x, k * 32 + i)
    y[i] = acc


def test_an_access_in_a_device_function_is_one_request_per_call():
    x, y = cuda.to_device(np.ones(96, np.float32)), cuda.device_array(32, np.float32)
    with memprofile.profiling() as prof:
        loop_through_a_device_function[1, 32](x, y)
    load = only(prof, "loop_through_a_device_function", "global", "load")
    assert (load.requests, load.sectors_per_request, load.instruction.line) == (3, 4.0, fetch.py_func.__code__.co_firstlineno + 2)


def test_a_global_broadcast_moves_one_sector():
    @cuda.jit
    def broadcast(x, y):
        i = cuda.threadIdx.x
        y[i] = x[0]

    x, y = cuda.to_device(np.ones(8, np.float32)), cuda.device_array(32, np.float32)
    with memprofile.profiling() as prof:
        broadcast[1, 32](x, y)
    load = only(prof, "broadcast", "global", "load")
    assert (load.sectors_per_request, load.efficiency) == (1.0, 4 / 32)


# ---------------------------------------------------------------- shared memory: bank conflicts

def transpose_kernel(tile, width):
    """A tile x tile block stores x[ty, tx] into s[tx, ty] (a column: the GEMM's transposed staging)
    of a tile x width shared array, then reads it back by rows."""

    @cuda.jit
    def stage_transposed(x, y):
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        s = cuda.shared.array((tile, width), float32)
        s[tx, ty] = x[ty, tx]
        cuda.syncthreads()
        y[ty, tx] = s[ty, tx]

    return stage_transposed


def transposed_store_ways(tile, width):
    x = cuda.to_device(np.arange(tile * tile, dtype=np.float32).reshape(tile, tile))
    y = cuda.device_array((tile, tile), np.float32)
    with memprofile.profiling() as prof:
        transpose_kernel(tile, width)[1, (tile, tile)](x, y)
    np.testing.assert_array_equal(y.copy_to_host(), x.copy_to_host().T)
    return only(prof, "stage_transposed", "shared", "store"), only(prof, "stage_transposed", "shared", "load")


def per_warp_ways(tile, width, row, col):
    """Ways of each warp of a tile x tile block accessing s[row(tx, ty), col(tx, ty)], worked out here."""
    t = np.arange(tile * tile)
    tx, ty = t % tile, t // tile
    words = row(tx, ty) * width + col(tx, ty)
    return [expected_ways(words[w:w + WARP]) for w in range(0, tile * tile, WARP)]


@pytest.mark.parametrize("tile, worst", [(8, (2, 2)), (16, (8, 2))])
def test_a_padded_tile_has_fewer_conflict_ways_exactly_as_the_addresses_imply(tile, worst):
    """Worst ways of the transposed store, unpadded and padded. At T = 8 a warp spans 4 rows and
    padding does not help (2-way either way); at T = 16 it spans 2 rows (8-way -> 2-way, the
    numbers tutorial 10 explains). (At T = 32, 1,024 simulated threads: too slow for the suite.)"""
    store, load = transposed_store_ways(tile, tile)
    padded_store, padded_load = transposed_store_ways(tile, tile + 1)
    assert store.ways == per_warp_ways(tile, tile, lambda tx, ty: tx, lambda tx, ty: ty)
    assert padded_store.ways == per_warp_ways(tile, tile + 1, lambda tx, ty: tx, lambda tx, ty: ty)
    assert load.ways == per_warp_ways(tile, tile, lambda tx, ty: ty, lambda tx, ty: tx)
    assert padded_load.ways == per_warp_ways(tile, tile + 1, lambda tx, ty: ty, lambda tx, ty: tx)
    assert (store.max_ways, padded_store.max_ways) == worst


def test_the_padded_gemm_at_tile_16_still_has_the_2_way_conflicts_its_addresses_imply():
    rng = np.random.default_rng(0)
    a = cuda.to_device(rng.standard_normal((16, 16)).astype(np.float32))  # (K, M): op(A) = A^T
    b = cuda.to_device(rng.standard_normal((16, 16)).astype(np.float32))  # (K, N): op(B) = B
    ways = {}
    for version in ("tiled", "tiled_padded"):
        with memprofile.profiling() as prof:
            c = gemm.gemm(a, b, trans_a=True, version=version, tile=16)
        np.testing.assert_allclose(c.copy_to_host(), a.copy_to_host().T @ b.copy_to_host(), rtol=1e-5, atol=1e-5)
        kernel = prof.kernels()[0]
        ways[version] = {arr: only(prof, kernel, "shared", "store", arr).ways for arr in ("sa", "sb")}
    for version, width in (("tiled", 16), ("tiled_padded", 17)):
        # sa[tx, ty] (A staged transposed) and sb[ty, tx] (B staged as is), one warp of 32 per request
        assert ways[version]["sa"] == per_warp_ways(16, width, lambda tx, ty: tx, lambda tx, ty: ty)
        assert ways[version]["sb"] == per_warp_ways(16, width, lambda tx, ty: ty, lambda tx, ty: tx)
    assert set(ways["tiled"]["sa"]) == {8} and set(ways["tiled_padded"]["sa"]) == {2}
    assert set(ways["tiled"]["sb"]) == {1} and set(ways["tiled_padded"]["sb"]) == {2}


@cuda.jit
def shared_reads(x, y, stride):
    """Every thread reads s[0] (a broadcast), then s[(i % 2) * stride] (two words)."""
    i = cuda.threadIdx.x
    s = cuda.shared.array(64, float32)
    s[i] = x[i]
    cuda.syncthreads()
    y[i] = s[0] + s[(i % 2) * stride]


@pytest.mark.parametrize("stride, ways", [(32, 2), (1, 1)])
def test_a_broadcast_costs_no_conflict_and_two_words_of_one_bank_cost_two(stride, ways):
    x, y = cuda.to_device(np.arange(64, dtype=np.float32)), cuda.device_array(64, np.float32)
    with memprofile.profiling() as prof:
        shared_reads[1, 64](x, y, stride)
    loads = [s for s in prof.instructions("shared_reads") if s.instruction.space == "shared" and s.instruction.op == "load"]
    assert len(loads) == 1  # both reads are on one line: request n of each thread is its n-th read there
    assert loads[0].ways == [1, ways, 1, ways]  # per warp: s[0] for all 32 (1 way), then words 0 and stride
    assert only(prof, "shared_reads", "shared", "store").ways == [1, 1]


# ---------------------------------------------------------------- atomics, summaries, roofline, the table

def test_atomics_count_as_stores_and_the_summary_adds_up():
    @cuda.jit
    def histogram(x, h):
        i = cuda.grid(1)
        if i < x.size:
            cuda.atomic.add(h, x[i] % 4, float32(1))

    x, h = cuda.to_device(np.arange(64, dtype=np.int32)), cuda.to_device(np.zeros(4, np.float32))
    with memprofile.profiling() as prof:
        histogram[1, 64](x, h)
    assert only(prof, "histogram", "global", "atomic").sectors == 2  # each warp: 4 floats, one sector
    s = prof.summary("histogram")
    assert s.requests[("global", "store")] == 2 and s.sectors_per_request("store") == 1.0
    assert s.sectors_per_request("load") == 4.0 and s.bytes_moved == 32 * (2 * 4 + 2)


def test_roofline_uses_the_datasheet_peaks():
    r = memprofile.roofline(2e9, 1e6, "H200")  # 2,000 FLOP/B: far right of the ridge
    assert r["limit"] == "compute" and r["seconds"] == pytest.approx(2e9 / 67e12)
    r = memprofile.roofline(1e6, 1e6, "A100")
    assert r["limit"] == "memory" and r["seconds"] == pytest.approx(1e6 / 2.039e12) and r["intensity"] == 1.0
    assert memprofile.roofline(None, 4096)["intensity"] is None


def test_the_table_says_modelled_and_has_a_row_per_case():
    x = cuda.to_device(np.arange(32, dtype=np.float32))
    y = cuda.device_array(32, np.float32)
    rows = memprofile.profile_cases([("copy", "unit", lambda: copy_strided[1, 32](x, y, 1), None),
                                     ("copy", "strided", lambda: copy_strided[1, 1](x, y, 32), 0.0)])
    assert [r["global_load_sectors_per_request"] for r in rows] == [4.0, 1.0]
    text = memprofile.format_table(rows)
    assert text.startswith("modelled") and "H200" in text and "67 TFLOPS" in text
    assert len(text.splitlines()) == 1 + 1 + 2 + 1
    assert "modelled" in memprofile.markdown_table(rows)


def test_bench_kernels_simulated_gives_the_table_as_json_and_writes_it_into_the_docs(monkeypatch, tmp_path, capsys):
    """`minasgd bench kernels --simulated --docs FILE` (only the relu cases: the full table takes a minute)."""
    import json

    from minasgd import bench_kernels
    from minasgd.cli import main

    every_case = bench_kernels.build_cases
    monkeypatch.setattr(bench_kernels, "build_cases",
                        lambda *a, **k: [c for c in every_case(*a, **k) if c.name.startswith("relu")])
    doc = tmp_path / "gpu.md"
    doc.write_text("# GPU\n\n<!-- memprofile begin -->\nstale\n<!-- memprofile end -->\n\nafter\n")
    assert main(["bench", "kernels", "--simulated", "--json", "--docs", str(doc)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["model"], result["batch"], result["gpu"]) == ("micro", 2, "H200")
    rows = {r["case"]: r for r in result["kernels"]}
    relu = rows["relu forward (512)"]
    assert relu["kernels"] == ["relu_forward_kernel"] and relu["global_load_sectors_per_request"] == 4.0
    assert relu["roofline"]["limit"] == "memory" and relu["flops"] is None
    text = doc.read_text()
    assert "stale" not in text and text.endswith("after\n") and "generated by `minasgd bench kernels --simulated" in text
    assert "| relu forward (512) | ours | relu_forward_kernel | 4.00 | 100% | 4.00 | 100% |" in text
    assert "modelled" in text
