"""Embedding in long-running, multi-threaded hosts: thread safety, flat memory, no handle leaks.

Counts are reduced for CI; full counts: MSLD_THREAD_RUNS=64 MSLD_LONG_RUNS=1000 pytest tests/test_reliability.py
"""
import gc
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from msld_sdk import Segmenter

THREAD_RUNS = int(os.environ.get("MSLD_THREAD_RUNS", "16"))
LONG_RUNS = int(os.environ.get("MSLD_LONG_RUNS", "150"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_eight_threads_equal_serial(tiny_plan):
    seg = Segmenter(tiny_plan)
    rng = np.random.default_rng(0)
    jobs = [(rng.random((24 + i % 3 * 8, 32), dtype=np.float32), 1 + i % 4, 100 + i) for i in range(THREAD_RUNS)]
    serial = [seg.run(img, k=k, steps=6, seed=s, eta=1.0) for img, k, s in jobs]
    start = threading.Barrier(8)

    def work(job):
        img, k, s = job
        try:
            start.wait(timeout=5)
        except threading.BrokenBarrierError:
            pass
        return seg.run(img, k=k, steps=6, seed=s, eta=1.0)

    with ThreadPoolExecutor(max_workers=8) as ex:
        parallel = list(ex.map(work, jobs))
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a.probs, b.probs)
        np.testing.assert_array_equal(a.masks, b.masks)


def test_native_calls_release_the_gil():
    """A long native call lets other Python threads run. Ticks are counted strictly inside the call
    (a switch interval's margin at each end): a call that held the GIL would leave none there. The
    noise generator stands for all of them; the loop's own updates release the GIL the same way
    (``py::gil_scoped_release`` in csrc/bindings.cpp), between the denoiser callbacks."""
    from msld_sdk import _native
    ticks = []
    done, started = threading.Event(), threading.Event()

    def ticker():
        started.set()
        while not done.is_set():
            ticks.append(time.perf_counter())
            done.wait(0.0005)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    t = threading.Thread(target=ticker)
    t.start()
    try:
        started.wait()
        elems = 1 << 20
        while True:  # long enough that the window inside the call is far wider than the margins
            t0 = time.perf_counter()
            _native.gaussian(0, 0, 4, elems, 0)
            t1 = time.perf_counter()
            if t1 - t0 > 0.1 or elems >= 1 << 26:
                break
            elems *= 2
    finally:
        done.set()
        t.join()
        sys.setswitchinterval(interval)
    margin = 0.01
    inside = [x for x in ticks if t0 + margin < x < t1 - margin]
    assert t1 - t0 > 4 * margin, f"the call took only {t1 - t0:.3f} s"
    assert inside, f"no other Python thread ran during a {t1 - t0:.3f} s native call"


def test_long_run_memory_and_handles_flat(tiny_plan):
    seg = Segmenter(tiny_plan)
    img = np.random.default_rng(1).random((40, 40), dtype=np.float32)
    for _ in range(20):  # warm up allocator pools and ORT arenas
        seg.run(img, k=4, steps=3, seed=1)
    gc.collect()
    rss0, fds0 = rss_bytes(), open_fds()
    for i in range(LONG_RUNS):
        seg.run(img, k=4, steps=3, seed=i)
    gc.collect()
    growth = (rss_bytes() - rss0) / rss0
    assert growth < 0.05, f"RSS grew {100 * growth:.1f}% over {LONG_RUNS} runs"
    assert open_fds() <= fds0, "file handles leaked"


def test_reopening_plans_does_not_leak_handles(tiny_plan):
    Segmenter(tiny_plan)
    gc.collect()
    fds0 = open_fds()
    for _ in range(10):
        Segmenter(tiny_plan)
    gc.collect()
    assert open_fds() <= fds0
