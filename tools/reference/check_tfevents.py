#!/usr/bin/env python3
"""Load a diffmoe run directory with TensorBoard's own loaders and check what it holds.

Our event writer (src/io/tfevents.cpp, docs/formats.md §1a) has no libprotobuf; this is the proof that
the real reader agrees. Both Python loaders are used:
  - event_processing.event_accumulator.EventAccumulator (legacy: scalars/histograms/tensors), and
  - event_processing.plugin_event_accumulator.EventAccumulator (what the TensorBoard backend uses
    without the Rust data server: everything migrated to plugin tensors).

Usage (TensorBoard 2.21 on the GPU machine):
  python3 tools/reference/check_tfevents.py RUN_DIR \
      --scalar train/loss=0,1,2,3,4,5 --histogram weights/w0=5 --text samples/generation
Each TAG may carry `=STEPS`, the exact steps expected after TensorBoard's purge of orphaned events
(comma-separated, ascending). Prints every tag and value; exits 1 if any expectation fails,
2 on bad arguments.
"""

import argparse
import math
import sys

from tensorboard.backend.event_processing import event_accumulator as legacy_ea
from tensorboard.backend.event_processing import plugin_event_accumulator as plugin_ea
from tensorboard.util import tensor_util

FAILURES = []


def fail(msg):
    FAILURES.append(msg)
    print(f"FAIL: {msg}")


def parse_expectation(spec):
    """'tag' -> (tag, None); 'tag=0,1,3' -> (tag, [0, 1, 3])."""
    tag, sep, steps = spec.partition("=")
    if not tag:
        raise argparse.ArgumentTypeError(f"empty tag in {spec!r}")
    if not sep:
        return tag, None
    try:
        return tag, [int(s) for s in steps.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad step list in {spec!r}")


def check_steps(kind, loader, tag, steps, expected):
    # A tag logged twice at one step, or with decreasing steps, loses points in the Rust data
    # server (docs/formats.md §1a), so retained steps must be strictly increasing.
    if any(b <= a for a, b in zip(steps, steps[1:])):
        fail(f"{loader} {kind} {tag!r}: steps not strictly increasing: {steps}")
    if expected is not None and steps != expected:
        fail(f"{loader} {kind} {tag!r}: steps {steps}, expected {expected}")


def load_legacy(run_dir):
    sizes = getattr(legacy_ea, "STORE_EVERYTHING_SIZE_GUIDANCE", None)
    if sizes is None:
        sizes = {legacy_ea.SCALARS: 0, legacy_ea.HISTOGRAMS: 0, legacy_ea.TENSORS: 0}
    return legacy_ea.EventAccumulator(run_dir, size_guidance=sizes).Reload()


def load_plugin(run_dir):
    return plugin_ea.EventAccumulator(run_dir, size_guidance={plugin_ea.TENSORS: 0}).Reload()


def text_of(tensor_proto):
    arr = tensor_util.make_ndarray(tensor_proto)
    item = arr.item() if arr.ndim == 0 else arr.flatten()[0]
    return item.decode("utf-8") if isinstance(item, bytes) else str(item)


def check_legacy(acc, args):
    tags = acc.Tags()
    print("legacy event_accumulator tags:")
    for kind in ("scalars", "histograms", "tensors"):
        print(f"  {kind}: {sorted(tags.get(kind, []))}")
    print(f"  file_version: {acc.file_version}")

    for tag, expected in args.scalar:
        if tag not in tags.get("scalars", []):
            fail(f"legacy: scalar {tag!r} missing")
            continue
        events = acc.Scalars(tag)
        print(f"  scalar {tag}: {[(e.step, e.value) for e in events]}")
        check_steps("scalar", "legacy", tag, [e.step for e in events], expected)
        for e in events:
            if not math.isfinite(e.value):
                fail(f"legacy: scalar {tag!r} step {e.step} is {e.value}")

    for tag, expected in args.histogram:
        if tag not in tags.get("histograms", []):
            fail(f"legacy: histogram {tag!r} missing")
            continue
        events = acc.Histograms(tag)
        for e in events:
            h = e.histogram_value
            print(f"  histogram {tag} step {e.step}: min={h.min} max={h.max} num={h.num} "
                  f"sum={h.sum} buckets={len(h.bucket)}")
            if len(h.bucket) != len(h.bucket_limit) or not h.bucket:
                fail(f"legacy: histogram {tag!r} step {e.step}: {len(h.bucket)} counts, "
                     f"{len(h.bucket_limit)} limits")
            if abs(sum(h.bucket) - h.num) > 0.5:
                fail(f"legacy: histogram {tag!r} step {e.step}: counts sum to {sum(h.bucket)}, num={h.num}")
            if h.min > h.max:
                fail(f"legacy: histogram {tag!r} step {e.step}: min {h.min} > max {h.max}")
        check_steps("histogram", "legacy", tag, [e.step for e in events], expected)

    for tag, expected in args.text:
        if tag not in tags.get("tensors", []):
            fail(f"legacy: text {tag!r} missing from tensors")
            continue
        events = acc.Tensors(tag)
        for e in events:
            print(f"  text {tag} step {e.step}: {text_of(e.tensor_proto)!r}")
        check_steps("text", "legacy", tag, [e.step for e in events], expected)


def check_plugin(acc, args):
    tags = acc.Tags().get("tensors", [])
    print("plugin_event_accumulator tensors:")
    for tag in sorted(tags):
        md = acc.SummaryMetadata(tag)
        print(f"  {tag}: plugin={md.plugin_data.plugin_name!r} data_class={md.data_class}")

    def expect(tag, plugin):
        if tag not in tags:
            fail(f"plugin: {tag!r} missing")
            return None
        name = acc.SummaryMetadata(tag).plugin_data.plugin_name
        if name != plugin:
            fail(f"plugin: {tag!r} has plugin {name!r}, expected {plugin!r}")
            return None
        return acc.Tensors(tag)

    for tag, expected in args.scalar:
        events = expect(tag, "scalars")
        if events is None:
            continue
        values = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events]
        print(f"  scalar {tag}: {values}")
        check_steps("scalar", "plugin", tag, [e.step for e in events], expected)

    for tag, expected in args.histogram:
        events = expect(tag, "histograms")
        if events is None:
            continue
        for e in events:
            arr = tensor_util.make_ndarray(e.tensor_proto)
            if arr.ndim != 2 or arr.shape[1] != 3:
                fail(f"plugin: histogram {tag!r} step {e.step}: shape {arr.shape}, expected [k,3]")
                continue
            # rows are [left, right, count] (docs/formats.md §1a)
            print(f"  histogram {tag} step {e.step}: {arr.shape[0]} buckets, count {arr[:, 2].sum()}, "
                  f"range [{arr[0, 0]}, {arr[-1, 1]}]")
            if (arr[:, 1] < arr[:, 0]).any():
                fail(f"plugin: histogram {tag!r} step {e.step}: a bucket with right < left")
        check_steps("histogram", "plugin", tag, [e.step for e in events], expected)

    for tag, expected in args.text:
        events = expect(tag, "text")
        if events is None:
            continue
        for e in events:
            s = text_of(e.tensor_proto)
            print(f"  text {tag} step {e.step}: {s!r}")
            if not s:
                fail(f"plugin: text {tag!r} step {e.step} is empty")
        check_steps("text", "plugin", tag, [e.step for e in events], expected)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--scalar", action="append", default=[], type=parse_expectation, metavar="TAG[=STEPS]")
    p.add_argument("--histogram", action="append", default=[], type=parse_expectation, metavar="TAG[=STEPS]")
    p.add_argument("--text", action="append", default=[], type=parse_expectation, metavar="TAG[=STEPS]")
    args = p.parse_args()
    if not (args.scalar or args.histogram or args.text):
        p.error("name at least one --scalar, --histogram or --text to expect")

    check_legacy(load_legacy(args.run_dir), args)
    check_plugin(load_plugin(args.run_dir), args)
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed")
        return 1
    print("OK: all expected tags present in both loaders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
