"""The ``msld`` command: segment images, inspect plans, export checkpoints."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import BatchError, InputError, MissingExtraError, MsldError, UsageError
from ..plan import PRECISIONS, SOLVERS
from .clinical import add_clinical_args, check_segment_options, clinical_route
from .options import Formatter, add_overwrite_arg, positive_int, run_command, seed_int, timestep_list, unit_float
from .pacs import add_listen_parser, add_pacs_args, cmd_listen, pacs_route

BACKEND_CHOICES = ["auto", "onnxruntime", "tensorrt"]


def _add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="denoiser precision (int8: the plan's quantized denoiser, ONNX Runtime only)")


def _add_views_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--views", type=positive_int, default=None, metavar="V",
                   help="hypothesis j sees the image turned by view j %% V (quarter turns, then mirrored; "
                        "1 = off; default: the plan's)")


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="inference backend (auto: TensorRT when the plan has engines for this GPU, else ONNX Runtime)")
    _add_precision_arg(p)
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all available)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """The labelled data of ``msld eval`` and ``msld tune``."""
    p.add_argument("--plan", default=None, help="plan file or shipped model name (default: lidc)")
    p.add_argument("--data", default=None,
                   help="data root holding lidc/, kvasir-seg/, cvc-clinicdb/ (default: $MSLD_DATA, else "
                        "../shared/data beside a clone), or a folder with images/ and masks/ (matched by file name)")
    p.add_argument("--kind", choices=["lidc", "polyp", "kvasir", "cvc", "folder"], default=None,
                   help="data set (default: folder when DATA has images/ and masks/, else from the plan's "
                        "model name); folder: every image of DATA/images with its mask in DATA/masks")
    p.add_argument("--split", default="val", choices=["train", "val"], help="which part of the data set")
    p.add_argument("--limit", type=positive_int, default=None, help="first N items of the split only "
                   "(default: all)")
    p.add_argument("--cvc-fold", default=None, metavar="F/N",
                   help="CVC-ClinicDB (kinds cvc, polyp): validate on the F-th of N sequence-safe blocks "
                        "(cross-validation; default: the shipped models' split, the last 15 %%)")
    p.add_argument("--per-nodule", action="store_true",
                   help="LIDC: one slice per nodule, its middle one (a nodule's slices are near-duplicates)")


def _add_threshold_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", type=unit_float, default=None,
                   help="probability above which a pixel is in a mask (default: the plan's, 0.5 for the shipped ones)")


def _add_timesteps_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timesteps", type=timestep_list, default=None, metavar="T0,T1,...",
                   help="dpmpp2m's timestep grid, noisiest first (its length is the step count), e.g. one "
                        "`msld tune --grids` found (default: the plan's grid if it has one, else its spacing rule)")


def _add_run_args(p: argparse.ArgumentParser, threshold: bool = True, solver: bool = True) -> None:
    p.add_argument("--plan", default=None, help="plan file or shipped model name (default: the embedded lidc model)")
    p.add_argument("-k", "--k", type=positive_int, default=None, help="number of hypotheses (default: the plan's)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the plan's)")
    p.add_argument("--seed", type=seed_int, default=None,
                   help="seed for reproducible hypotheses, 0 to 2**64-1 (default: random, printed)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta: 0 deterministic given the seed, 1 = DDPM-like "
                   "(default: the plan's, 0 for the shipped ones; dpmpp2m: 0 only)")
    if solver:
        p.add_argument("--solver", choices=SOLVERS, default=None,
                       help="sampler: ddim, or dpmpp2m (DPM-Solver++(2M), a multistep solver for fewer steps; "
                            "eta 0 only; default: the plan's, dpmpp2m for the shipped ones)")
        _add_timesteps_arg(p)
    if threshold:
        _add_threshold_arg(p)
    _add_views_arg(p)
    _add_backend_args(p)


def cmd_segment(a) -> int:
    from ..evaluation.evaluate import image_seed
    from ..outputs import expand_inputs, output_names, segment_and_write
    from ..segmenter import Segmenter
    from ..writing import OutputFolder, check_output_file, check_output_folder, write_text

    route = pacs_route(a) or clinical_route(a)  # PACS: cli/pacs.py; Ray: cli/clinical.py
    if route is None and not a.images:
        raise UsageError("msld segment: give image files, folders of images, series folders or volumes "
                         "(or --dicomweb URL --study UID)")
    if route is not None:
        return route(a)
    items = expand_inputs(a.images)   # each input's kind by itself; a folder of images -> its images
    check_segment_options(a, items)
    # the output rule (docs/outputs.md), before any work: -o is replaced whole, never an input
    out = check_output_folder(a.out, a.images, a.overwrite)
    if a.dicom_seg:
        from ..clinical.dicom_seg import mean_path
        if Path(a.dicom_seg).resolve().is_relative_to(out.resolve()):   # -o is replaced whole at the end
            raise UsageError(f"--dicom-seg {a.dicom_seg} lies inside -o {a.out}, which is replaced whole when the run "
                             "ends, so the SEG would be lost: give a path outside it (e.g. beside it)")
        for f in (a.dicom_seg, mean_path(a.dicom_seg)):
            check_output_file(f, a.images, a.overwrite, what="--dicom-seg")
    seg = Segmenter(a.plan, backend=a.backend, threads=a.threads, progress=not a.quiet, precision=a.precision)
    try:   # the run options against the plan, once: a bad one is a usage error, not one failure per input
        seg.options(k=a.k, steps=a.steps, seed=a.seed, eta=a.eta, views=a.views, solver=a.solver,
                    threshold=a.threshold, timesteps=a.timesteps)
    except InputError as e:
        raise UsageError(f"msld segment: {e}") from e
    many = len(items) > 1
    # one folder per input, named by its file; by as many parent folders as needed when names repeat
    names = output_names([p for p, _ in items], whole_suffix=[kind != "image" for _, kind in items])
    failed = {}
    with OutputFolder(out) as folder:   # built beside -o, swapped in whole at the end
        for i, ((path, kind), name) in enumerate(zip(items, names)):
            # several inputs with one --seed: input i gets image_seed(seed, i), as `--ray` and `msld eval`
            # do, so that inputs do not share noise; one input gets the seed itself, as Segmenter.run
            seed = image_seed(a.seed, i) if a.seed is not None and many else a.seed
            d, final = (folder.path / name, out / name) if many else (folder.path, out)
            image = kind == "image"
            try:
                w = segment_and_write(seg, path, d, k=a.k, steps=a.steps, seed=seed, eta=a.eta, views=a.views,
                                      solver=a.solver, timesteps=a.timesteps,
                                      threshold=a.threshold, roi=a.roi if a.roi is not None else a.center,
                                      slices=None if image else a.slices, volume=not image,
                                      npz=None if image else "geometry", nifti="if_installed",
                                      dicom_seg=None if image else a.dicom_seg,
                                      allow_modality=a.allow_modality,
                                      accept_irregular=not image and a.accept_irregular_slices)
            except Exception as e:      # one input: the error itself; a batch: recorded, the others go on
                if not many:
                    raise
                failed[path] = f"{type(e).__name__}: {e}"
                print(f"msld: {path}: failed: {failed[path]}", file=sys.stderr)
                d.mkdir(parents=True, exist_ok=True)
                write_text(d / "error.json", json.dumps({"index": i, "path": path, "error": failed[path]}, indent=1))
                continue
            r = w.result
            if image:
                fg = float(r.consensus.mean())
                print(f"{path}: k={r.k} steps={r.steps} views={r.views} seed={r.seed} -> {final}/ "
                      f"(consensus foreground {100 * fg:.2f}% of pixels, mean confidence "
                      f"{float(r.confidence.mean()):.3f}, {r.timings['total_ms']:.0f} ms)")
            else:
                vol = w.volume
                z0, z1 = r.slices
                print(f"{path}: {vol.shape[0]} slices {vol.shape[1]}x{vol.shape[2]}, segmented {z0}..{z1 - 1} "
                      f"k={r.k} steps={r.steps} seed={r.seed} roi={r.roi} -> {final}/ ({', '.join(w.files)}; "
                      f"{r.timings['total_ms']:.0f} ms)")
        if failed and len(failed) == len(items):   # nothing to show: the earlier output stays as it was
            raise BatchError(f"all {len(items)} inputs failed (first: {next(iter(failed))}: "
                             f"{next(iter(failed.values()))}); {out} left as it was")
    if failed:
        print(f"msld: {len(items) - len(failed)} of {len(items)} inputs written to {out}/, {len(failed)} failed "
              "(each recorded in its folder's error.json):", file=sys.stderr)
        for path, err in failed.items():
            print(f"  {path}: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_info(a) -> int:
    from ..plan import Plan
    from ..segmenter import resolve_plan_path

    plan = Plan.open(resolve_plan_path(a.plan))
    if a.json:
        m = dict(plan.manifest)
        m["schedule"] = {k: v for k, v in m["schedule"].items() if k != "alphas_cumprod"}
        print(json.dumps(m, indent=1, sort_keys=True))
    else:
        print(plan.summary())
    return 0


def cmd_build(a) -> int:
    from ..tools.engine_build import build_engines
    from ..segmenter import resolve_plan_path
    from ..writing import check_output_file

    plan = resolve_plan_path(a.plan)
    if a.out is not None:   # without --out the engines are added to the plan itself (rewritten whole)
        check_output_file(a.out, [plan], a.overwrite)
    build_engines(plan, a.out, fp32=a.fp32, k_max=a.k_max, opt_k=a.opt_k,
                  compute_capabilities=a.compute_capability, timing_cache=a.timing_cache,
                  progress=not a.quiet)
    return 0


# What the torch-side commands import: the package msld_export (the repository's export/ folder)
# and the [export] extra's modules. The runtime itself never needs them.
EXPORT_EXTRA_MODULES = ("torch", "onnxscript", "safetensors", "diffusers", "yaml", "msld_export")


def require_export_extra(what: str) -> None:
    """Raise ``MissingExtraError`` (one line naming the extra) unless the torch side is installed.
    Every torch-side command calls this first: msld export, msld bench --baselines, msld import."""
    missing = [m for m in EXPORT_EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{what} needs the [export] extra: pip install 'msld_sdk[export]' "
                                f"(missing: {', '.join(missing)})")


def _torch_side_main(what: str, module: str, rest: list) -> int:
    """Run ``module``'s ``main(argv)`` from msld_export, after checking that the extra is installed."""
    require_export_extra(what)
    return importlib.import_module(module).main(rest)


def cmd_export(a, rest) -> int:
    return _torch_side_main("msld export", "msld_export.plan_writing.export_plan", rest)


def cmd_import(a, rest) -> int:
    return _torch_side_main("msld import", "msld_export.reference.importer", rest)


def cmd_bench(a) -> int:
    import platform

    from ..tools import bench
    from ..image_input import load_image
    from ..segmenter import Segmenter

    if a.baselines:
        require_export_extra("msld bench --baselines")   # before anything is timed
    if a.json:
        from ..writing import check_output_file
        check_output_file(a.json, [a.plan, a.image], a.overwrite, what="--json")
    seg = Segmenter(a.plan, backend=a.backend, threads=a.threads, precision=a.precision)
    threads = getattr(seg.backend, "threads", a.threads or 0)
    image_path = a.image or str(Path(__file__).resolve().parents[1] / "samples" / "lidc_0974_n0_s2" / "image.png")
    img = load_image(image_path)
    image_note = None
    if a.image is None and img.shape[2] != seg.plan.channels:
        # the only shipped sample is a CT slice; a colour plan is timed on its grey repeated over three
        # channels (the same shapes and work as a real image), converted once here, not warned on every run
        from ..image_input import convert_channels
        img = convert_channels(img, seg.plan.channels)
        image_note = (f"no --image: the shipped LIDC sample, converted to the plan's {seg.plan.channels} channels; "
                      "it times the same work as a real image, but its masks mean nothing")
        if not a.quiet:
            print(f"note: {image_note}", file=sys.stderr)
    rows = []
    for k in a.k or [seg.defaults["k"]]:   # without -k / --steps: what run() does by default
        for steps in a.steps or [seg.defaults["steps"]]:
            row = bench.bench_sdk(seg, img, k, steps, a.repeats, seed=a.seed, solver=a.solver)
            row["denoiser_gflops_per_s"] = bench.denoiser_gflops(seg.plan, k) / (row["denoise_ms_per_step"] * 1e-3)
            rows.append(row)
            if not a.quiet:
                print(f"  k={k:>2} steps={steps:>3}: median {row['median_ms']:.1f} ms", file=sys.stderr)
    report = {"plan": seg.plan.path, "backend": seg.backend.name, "image": image_path, "image_note": image_note,
              "machine": bench.machine_info(threads, seg.plan), "python": platform.python_version(),
              "gemm_fp32_gflops_per_s": bench.gemm_gflops(threads), "rows": rows,
              "peak_rss_mb": bench.peak_rss_mb()}
    for r in rows:
        r["denoiser_fraction_of_gemm"] = r["denoiser_gflops_per_s"] / report["gemm_fp32_gflops_per_s"]
    main_row = rows[0]
    report.update(k=main_row["k"], steps=main_row["steps"], sdk_ms=main_row["median_ms"],
                  overhead_fraction=main_row["overhead_fraction"], precision=a.precision, solver=main_row["solver"])
    seg_fp32 = seg if a.precision == "fp32" else None   # what the baselines are checked against
    if seg.plan.manifest.get("int8") and seg.backend.name == "onnxruntime":
        # the plan offers an int8 denoiser: time one call of each precision, interleaved, at the main k
        cond = seg.backend.encode(seg.preprocess(img))
        report["int8_denoiser"] = bench.compare_denoiser_precisions(seg.plan, main_row["k"], cond, a.threads,
                                                                    repeats=a.int8_repeats)
        if not a.no_int8_run:
            # whole runs of the other precision on the same image, k, steps and seed (hence the same
            # noise): its timings, and how far its consensus mask is from this precision's
            other = "int8" if a.precision == "fp32" else "fp32"
            seg_o = Segmenter(a.plan, backend="onnxruntime", threads=a.threads, precision=other)
            row_o = bench.bench_sdk(seg_o, img, main_row["k"], main_row["steps"], a.repeats, seed=a.seed,
                                    solver=a.solver)
            rws, segs = {a.precision: main_row, other: row_o}, {a.precision: seg, other: seg_o}
            seg_fp32 = segs["fp32"]
            report["int8_run"] = {
                "fp32": rws["fp32"], "int8": rws["int8"], "speedup": rws["fp32"]["median_ms"] / rws["int8"]["median_ms"],
                "denoise_speedup": rws["fp32"]["stages_ms"]["denoise_ms"] / rws["int8"]["stages_ms"]["denoise_ms"],
                "int8_vs_fp32": bench.consensus_agreement(segs["fp32"], segs["int8"], img, main_row["k"],
                                                          main_row["steps"], a.seed, solver=a.solver)}
    if a.rss_k:
        # peak RSS of one run at each k, each in a fresh process
        report["peak_rss_by_k"] = [bench.peak_rss_of_run(seg.plan.path, image_path, k, a.rss_steps or rows[0]["steps"],
                                                         a.precision, a.threads, seg.backend.name, a.seed,
                                                         solver=a.solver)
                                   for k in a.rss_k]
    if a.baselines:
        _bench_baselines(a, report, seg, seg_fp32 or Segmenter(a.plan, backend=a.backend, threads=a.threads),
                         img, main_row)
    report["load_average_at_end"] = bench.load_average()
    load = [x[0] for x in (report["machine"]["load_average"], report["load_average_at_end"]) if x]
    print(f"CPU: {report['machine']['cpu_summary']}; int8 kernels: {report['machine']['int8_kernel']}"
          + (f"; 1-minute load average {load[0]:.1f} at the start, {load[-1]:.1f} at the end" if load else ""))
    print(bench.format_table(rows))
    print(f"fp32 GEMM (ONNX Runtime MatMul, {threads} threads): {report['gemm_fp32_gflops_per_s']:.0f} GFLOP/s; "
          f"denoiser at k={main_row['k']}: {main_row['denoiser_gflops_per_s']:.0f} GFLOP/s "
          f"({100 * main_row['denoiser_fraction_of_gemm']:.0f}% of it); peak RSS {report['peak_rss_mb']:.0f} MB")
    if "int8_denoiser" in report:
        q = report["int8_denoiser"]
        print(f"denoiser call at batch {q['batch']}: fp32 {q['fp32_ms']:.2f} ms, int8 {q['int8_ms']:.2f} ms "
              f"= {q['speedup']:.2f}x (max |eps diff| {q['eps_max_abs_diff']:.3f})")
        print(f"  int8 kernel path: {q['int8_kernel']} ({q['int8_kernel_reason']})")
        if "int8_u8u8_ms" in q:
            print(f"  int8 on the exact u8u8 kernels (a CPU without VNNI, plan without 7-bit weights): {q['int8_u8u8_ms']:.2f} ms "
                  f"= {q['speedup_u8u8']:.2f}x; same eps as this CPU's path: {q['u8u8_equals_own_path']}")
    if "int8_run" in report:
        r = report["int8_run"]
        ag = r["int8_vs_fp32"]
        print(f"whole run, int8 vs fp32 (k={ag['k']}, {ag['steps']} steps, same seed): {r['speedup']:.2f}x "
              f"(denoising {r['denoise_speedup']:.2f}x); consensus masks agree on "
              f"{100 * ag['consensus_pixel_agreement']:.2f}% of pixels, the k masks on "
              f"{100 * ag['masks_pixel_agreement']:.2f}%")
    for r in report.get("peak_rss_by_k", []):
        print(f"peak RSS, one run in a fresh process, k={r['k']} steps={r['steps']} {r['precision']}: "
              f"{r['peak_rss_mb']:.0f} MB ({r['peak_rss_mb_after_load']:.0f} MB after loading the plan)")
    if a.baselines:
        print(f"k={report['k']} steps={report['steps']} (SDK: {report['solver']}, {report['precision']}; "
              f"baselines: DDIM): SDK {report['sdk_ms']:.1f} ms | "
              f"(a) PyTorch eager per hypothesis {report['torch_eager_per_hypothesis_ms']:.1f} ms "
              f"= {report['speedup_vs_torch_eager_per_hypothesis']:.2f}x | "
              f"(b) ONNX Runtime per hypothesis {report['ort_per_hypothesis_ms']:.1f} ms "
              f"= {report['speedup_vs_ort_per_hypothesis']:.2f}x (with the SDK's session settings "
              f"{report['ort_per_hypothesis_sdk_settings_ms']:.1f} ms "
              f"= {report['speedup_vs_ort_per_hypothesis_sdk_settings']:.2f}x) | "
              f"overhead {100 * report['overhead_fraction']:.2f}%")
        print(_reference_default_line(report))
    if a.json:
        from ..writing import write_text
        write_text(a.json, json.dumps(report, indent=1))
        print(f"wrote {a.json}")
    return 0


def _bench_baselines(a, report: dict, seg, seg_fp32, img, main_row: dict) -> None:
    """``msld bench --baselines``: the baselines at the main row's k and steps and, for a
    reference-family plan, the reference's default loop; every baseline is checked first against
    the SDK in fp32 with DDIM (what the baselines compute) on the same seed."""
    import statistics

    from ..tools import bench
    bl = importlib.import_module("msld_export.sampling.baselines")
    k, steps = main_row["k"], main_row["steps"]
    img_b = bench.plan_sized_image(seg.plan, img)   # the baselines take the plan's size and channels
    img_b = img_b[:, :, 0] if img_b.shape[2] == 1 else img_b

    def sdk_call():   # the SDK at the user's settings
        seg.run(img, k=k, steps=steps, seed=a.seed, solver=a.solver)

    def checked_against(n: int) -> np.ndarray:
        return seg_fp32.run(img_b, k=k, steps=n, seed=a.seed, solver="ddim").probs

    ref_default = None
    if bl.is_reference_plan(seg.plan):
        n = a.reference_default_steps or bl.REFERENCE_DEFAULT["steps"]
        ref_default = (n, checked_against(n), sdk_call)
    base = bl.measure_baselines(seg.plan, img_b, checked_against(steps), k, steps, a.seed, a.baseline_repeats,
                                report["machine"]["threads"], reference_default=ref_default)
    # the SDK measured again right after the baselines, so that the ratios come from one run
    sdk_again = statistics.median(bench.time_calls(sdk_call, a.repeats))
    report.update(base)
    report["baselines_checked_against"] = {"precision": "fp32", "solver": "ddim", "steps": steps, "seed": a.seed,
                                           "backend": seg_fp32.backend.name}
    report["sdk_ms"] = min(main_row["median_ms"], sdk_again)
    report["speedup_vs_torch_eager_per_hypothesis"] = report["torch_eager_per_hypothesis_ms"] / report["sdk_ms"]
    report["speedup_vs_ort_per_hypothesis"] = report["ort_per_hypothesis_ms"] / report["sdk_ms"]
    report["speedup_vs_ort_per_hypothesis_sdk_settings"] = (report["ort_per_hypothesis_sdk_settings_ms"]
                                                            / report["sdk_ms"])
    if ref_default is None:
        report["reference_default"] = {"measured": False, "reason": "applies only to reference-family plans "
                                       f"(model {seg.plan.manifest['model'].get('name')!r})"}
    else:
        rd = report["reference_default"]
        rd.update(measured=True, checked_against={**report["baselines_checked_against"], "steps": rd["steps"]},
                  sdk_settings={"k": k, "steps": steps, "solver": main_row["solver"], "precision": a.precision})
        report["speedup_vs_reference_default"] = rd["speedup"]


def _reference_default_line(report: dict) -> str:
    rd = report["reference_default"]
    if not rd["measured"]:
        return f"reference default (DDIM 50 steps, one hypothesis at a time): {rd['reason']}"
    s = rd["sdk_settings"]
    n = f"{rd['steps']} steps" + (" (overridden; the reference's default is 50)" if rd["steps_overridden"] else "")
    return (f"reference default (DDIM {n}, eta 0, one hypothesis at a time, k={rd['k']}; same masks as the SDK's "
            f"fp32 DDIM run): {rd['median_ms']:.1f} ms | SDK ({s['solver']}, {s['steps']} steps, {s['precision']}), "
            f"timed between its runs: {rd['sdk_interleaved_ms']:.1f} ms = {rd['speedup']:.2f}x")


def _eval_data(a, seg):
    """The labelled split of ``msld eval`` / ``msld tune``: (kind, split as recorded, SegData);
    ``a.data`` is filled with the data root used."""
    from ..evaluation import metrics
    from ..evaluation.datasets import FOLDER, data_kind_for, default_data_root, is_folder_pair, load_split, middle_slice_per_nodule

    a.data = a.data or str(default_data_root())
    try:
        kind = a.kind or (FOLDER if is_folder_pair(a.data) else data_kind_for(seg.plan.manifest["model"]["name"]))
        data = load_split(kind, a.data, a.split, seg.plan.image_size[0], limit=a.limit, channels=seg.plan.channels,
                          cvc_fold=a.cvc_fold)
        if a.per_nodule:
            data = middle_slice_per_nodule(data)
    except (FileNotFoundError, ValueError) as e:
        raise MsldError(str(e)) from e
    if len(data) == 0:
        raise MsldError(f"no images in {kind}/{a.split} under {a.data}")
    if data.num_annotators > 1:
        metrics.linear_sum_assignment()   # HM-IoU needs scipy: say so before any image is run
    return kind, "all" if kind == FOLDER else a.split, data   # a folder is evaluated whole


def cmd_eval(a) -> int:
    from tqdm import tqdm

    from ..tools.cpu_features import describe
    from ..evaluation.evaluate import evaluate, format_report, samples_of, to_json
    from ..segmenter import Segmenter

    if a.json:
        from ..writing import check_output_file
        check_output_file(a.json, [a.plan, a.data], a.overwrite, what="--json")
    seg = Segmenter(a.plan, backend=a.backend, threads=a.threads, precision=a.precision)
    kind, split, data = _eval_data(a, seg)
    bar = tqdm(total=len(data), desc=f"eval {kind}/{split}", unit="img", disable=a.quiet)
    rep = evaluate(seg, samples_of(data), k=a.k if a.k is not None else seg.defaults["k"], steps=a.steps, seed=a.seed,
                   views=a.views, solver=a.solver, threshold=a.threshold, timesteps=a.timesteps,
                   progress=lambda n: bar.update(n - bar.n))
    bar.close()
    rep.update(plan=seg.plan.path, plan_graphs_sha256=seg.plan.graphs_sha256, data=str(a.data), kind=kind, split=split, precision=a.precision,
               per_nodule=bool(a.per_nodule), cvc_fold=a.cvc_fold,
               trained=seg.plan.manifest.get("provenance", {}).get("trained"), cpu=describe(),
               int8_kernel=getattr(seg.backend, "int8_kernel", None) and seg.backend.int8_kernel.name)
    print(format_report(rep))
    if a.json:
        from ..writing import write_text
        write_text(a.json, to_json(rep))
        print(f"wrote {a.json}")
    return 0


def cmd_tune(a) -> int:
    from tqdm import tqdm

    from ..evaluation import tune
    from ..evaluation.datasets import default_data_root
    from ..evaluation.evaluate import samples_of
    from ..segmenter import Segmenter, resolve_plan_path
    from ..tools.bench import machine_info
    from ..writing import OutputFolder, check_output_folder

    settings = tune.parse_settings(a.settings)   # every argument checked before any work
    reference = tune.parse_reference(a.reference, settings)
    seeds = tune.parse_seeds(a.seeds)
    plan = resolve_plan_path(a.plan)
    a.data = a.data or str(default_data_root())
    out = check_output_folder(a.out, [plan, a.data], a.overwrite, what="--out")
    seg = Segmenter(plan, backend=a.backend, threads=a.threads, precision=a.precision)
    T = seg.schedule.num_train_timesteps
    settings = tune.parse_grids(a.grids, settings, T)
    k = a.k if a.k is not None else seg.defaults["k"]
    for s in settings:
        try:
            seg.options(k=k, steps=s.steps, solver=s.solver, seed=0, timesteps=s.timesteps(T))
        except InputError as e:
            raise UsageError(f"--settings {s}: {e}") from e
    kind, split, data = _eval_data(a, seg)
    metrics = tune.watched_metrics(a.metrics, data.num_annotators)
    image_runs = len(settings) * len(seeds) * len(data)
    if not a.quiet:   # a long job: say what it will run before the bar starts
        calls = sum(s.denoiser_calls for s in settings) * len(seeds) * len(data)
        print(f"msld tune: {len(settings)} settings ({' '.join(map(str, settings))}) x {len(seeds)} seeds on "
              f"{kind}/{split} ({len(data)} images, k={k}): {image_runs} image runs, "
              f"{calls} batched denoiser calls; reference {reference}", file=sys.stderr)
    bar = tqdm(total=image_runs, desc=f"tune {kind}/{split}", unit="img", disable=a.quiet)
    runs = tune.run_grid(seg, lambda: samples_of(data), settings, seeds, k, progress=lambda n: bar.update(n - bar.n))
    bar.close()
    rows = tune.table_rows(runs, reference, metrics)
    choice = tune.cheapest(rows)
    threads = getattr(seg.backend, "threads", a.threads or 0)
    report = {"plan": seg.plan.path, "plan_graphs_sha256": seg.plan.graphs_sha256, "data": str(a.data), "kind": kind,
              "split": split, "per_nodule": bool(a.per_nodule), "cvc_fold": a.cvc_fold, "n_images": len(data), "k": k,
              "views": runs[0]["views"], "seeds": seeds, "settings": [str(s) for s in settings],
              "reference": str(reference), "metrics": metrics, "rule": tune.RULE, "denoiser_calls": tune.CALLS,
              "backend": seg.backend.name, "precision": a.precision, "machine": machine_info(threads, seg.plan),
              "rows": rows,
              "choice": choice and {k_: choice[k_] for k_ in ("setting", "solver", "steps", "rho", "timesteps")},
              "runs": runs}
    head = (f"msld tune: {seg.plan.path} (graphs sha256 {seg.plan.graphs_sha256[:12]}) on {kind}/{split}, "
            f"{len(data)} images, k={k}, seeds {' '.join(map(str, seeds))}, {seg.backend.name} {a.precision}, "
            f"{report['machine']['cpu_summary']}")
    table = tune.format_table(rows, metrics, head)
    print(table)
    refused = None
    if a.write:
        try:
            report["written"] = {"plan": seg.plan.path, "defaults": tune.write_choice(seg.plan.path, report)["defaults"]}
        except MsldError as e:   # nothing holds: the table, JSON and plot are still written, then the refusal
            refused = e
    with OutputFolder(out) as folder:
        written = tune.write_outputs(folder.path, report, table)
    print(f"wrote {', '.join(str(out / n) for n in written)}")
    if refused is not None:
        raise refused
    if a.write:
        print(f"{seg.plan.path}: defaults now {report['written']['defaults']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``msld`` parser (``export`` and ``import`` only named here: their own parsers live with
    the torch side, msld_export)."""
    ap = argparse.ArgumentParser(prog="msld", formatter_class=Formatter,
                                 description="MedSegLatDiff: k plausible segmentations, their mean and a confidence "
                                 "map. Exit status: 0 done, 1 failed (one line says why), 2 usage error.")
    ap.add_argument("--version", action="version", version=f"msld {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="log which backend runs and why, and print the traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name, **kw):
        return sub.add_parser(name, parents=[common], formatter_class=Formatter, **kw)

    p = command("segment", help="segment images; write k masks, mean, confidence heat map and overlay as PNG")
    p.add_argument("images", nargs="*", help="inputs, each told apart by itself: image files (PNG, JPEG, TIFF, NPY, "
                   "DICOM), folders of images, DICOM series folders or NIfTI volumes")
    p.add_argument("-o", "--out", default="msld_out", help="output folder, replaced whole (docs/outputs.md); one "
                   "sub-folder per input when there are several")
    add_overwrite_arg(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_run_args(p)
    add_clinical_args(p)
    add_pacs_args(p)
    add_listen_parser(sub, common, lambda q: _add_run_args(q, threshold=False, solver=False))   # the node has no threshold
    sub.choices["listen"].formatter_class = Formatter

    p = command("info", help="print a plan's manifest")
    p.add_argument("plan", nargs="?", default=None, help="plan file or shipped model name (default: lidc)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")

    p = command("build", help="build TensorRT engines for a plan and store them in it "
                "(needs tensorrt-rtx-cu13 or tensorrt; TensorRT-RTX builds without a GPU)")
    p.add_argument("plan", help="plan file (or shipped model name); engines are added to it unless --out is given")
    p.add_argument("-o", "--out", default=None, help="write the plan with engines here instead of in place "
                   "(default: in place)")
    add_overwrite_arg(p)
    p.add_argument("--fp32", action="store_true", help="fp32 engines (fp16 convolutions/matmuls otherwise)")
    p.add_argument("--k-max", type=positive_int, default=32, help="largest denoiser/decoder batch, images x k")
    p.add_argument("--opt-k", type=positive_int, default=8, help="batch the engines are tuned for")
    p.add_argument("--compute-capability", nargs="+", action="extend", default=None, metavar="CC",
                   help="GPU compute capabilities to target, e.g. 8.6 8.9 (TensorRT-RTX; default: all it "
                        "supports from 8.0; full TensorRT: the local GPU)")
    p.add_argument("--timing-cache", default=None, metavar="PATH",
                   help="timing cache file (default: OUT.timing.cache; used where the TensorRT flavour has one)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = command("bench", help="latency benchmark (median, p90, stage shares, GFLOP/s); --baselines adds "
                "PyTorch-eager and ONNX-Runtime per-hypothesis runs, and the reference's default loop for "
                "reference-family plans (needs the [export] extra)")
    p.add_argument("--plan", default=None, help="plan file or shipped model name (default: lidc)")
    p.add_argument("-k", "--k", type=positive_int, nargs="+", default=None,
                   help="hypotheses, one or more (default: the plan's, 8 for the shipped ones)")
    p.add_argument("--steps", type=positive_int, nargs="+", default=None,
                   help="sampling steps, one or more (default: the plan's, what run() uses)")
    p.add_argument("--solver", choices=SOLVERS, default=None,
                   help="sampler of the timed runs: ddim, or dpmpp2m (DPM-Solver++(2M), a multistep solver for fewer steps; eta 0 only; "
                        "default: the plan's, dpmpp2m for the shipped ones)")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed runs per setting")
    p.add_argument("--baselines", action="store_true", help="also time the research-code and per-hypothesis "
                   "ONNX Runtime ways on the same weights, k, steps and seed (first --k/--steps; DDIM, checked "
                   "against the SDK in fp32); for reference-family plans also the reference's default (DDIM 50 "
                   "steps, one hypothesis at a time, k hypotheses), timed between SDK runs at your settings")
    p.add_argument("--baseline-repeats", type=positive_int, default=3, help="timed runs per baseline")
    p.add_argument("--reference-default-steps", type=positive_int, default=None, metavar="N",
                   help="steps of the reference-default baseline of reference-family plans (default: 50, the "
                        "reference's own; another value is recorded in the report as an override, for tests)")
    p.add_argument("--int8-repeats", type=positive_int, default=30, help="interleaved denoiser calls per precision "
                   "when the plan has an int8 denoiser")
    p.add_argument("--no-int8-run", action="store_true", help="with an int8 plan, skip the whole runs of the other "
                   "precision (timings and consensus-mask agreement on the same noise)")
    p.add_argument("--rss-k", type=positive_int, nargs="+", default=None, metavar="K",
                   help="also measure peak RSS of one run at each K, each in a fresh process (default: not measured)")
    p.add_argument("--rss-steps", type=positive_int, default=None,
                   help="steps of the --rss-k runs (default: first --steps)")
    p.add_argument("--image", default=None,
                   help="image to segment (default: a shipped LIDC sample; for a colour plan its grey is repeated "
                        "over three channels, which times the same work)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of every timed run (the same noise in each)")
    _add_backend_args(p)
    p.add_argument("--json", "-o", "--out", dest="json", default=None, metavar="FILE",
                   help="write the full report as JSON to FILE (default: none)")
    add_overwrite_arg(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no per-setting progress lines")

    p = command("eval", help="Dice/IoU (and GED, HM-IoU, ECE for multi-annotator data) of a plan on a labelled "
                "split or on a folder with images/ and masks/")
    _add_data_args(p)
    p.add_argument("-k", "--k", type=positive_int, default=None, help="hypotheses per image (default: the plan's)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the plan's)")
    p.add_argument("--solver", choices=SOLVERS, default=None,
                   help="sampler: ddim, or dpmpp2m (DPM-Solver++(2M), a multistep solver for fewer steps; "
                        "eta 0 only; default: the plan's, dpmpp2m for the shipped ones)")
    _add_timesteps_arg(p)
    p.add_argument("--seed", type=seed_int, default=0,
                   help="image i is sampled with a seed derived from (seed, i), so images do not share noise")
    _add_threshold_arg(p)
    _add_views_arg(p)
    _add_backend_args(p)
    p.add_argument("--json", "-o", "--out", dest="json", default=None, metavar="FILE",
                   help="write the report as JSON to FILE (default: none)")
    add_overwrite_arg(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    from ..evaluation.tune import DEFAULT_SEEDS, DEFAULT_SETTINGS
    p = command("tune", help="run a plan over solvers x steps at several seeds on labelled data and name the "
                "cheapest setting whose figures stay within the reference's seed spread; --write makes it the "
                "plan's default")
    _add_data_args(p)
    p.add_argument("--settings", default=DEFAULT_SETTINGS, metavar="'SOLVER:STEPS,... ...'",
                   help="solvers x step counts to run, e.g. 'ddim:20,10 dpmpp2m:6,4'")
    p.add_argument("--grids", default=None, metavar="RHO[,RHO...]",
                   help="also run every dpmpp2m step count on the power timestep grids of these rho "
                        "(t_i = round(T ((steps - i) / steps) ** rho) - 1; 1 is the trailing rule; >1 puts the "
                        "steps at lower noise, <1 at higher), e.g. --grids 0.6,0.75,1.5; --write records a chosen grid in the plan (default: "
                        "no grids, the plan's spacing rule only)")
    p.add_argument("--reference", default=None, metavar="SOLVER:STEPS",
                   help="the setting the others must stay within the seed spread of (one of --settings; "
                        "default: ddim at its largest step count)")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=list(DEFAULT_SEEDS), metavar="SEED",
                   help="seeds, at least two (the rule needs the reference's spread over seeds; default: 0 1 2)")
    p.add_argument("-k", "--k", type=positive_int, default=None, help="hypotheses per image (default: the plan's)")
    p.add_argument("--metrics", default=None, metavar="M[,M...]",
                   help="metrics that must stay within the spread (default: ged,hm_iou for data with several "
                        "annotators, else dice_consensus,ece)")
    _add_backend_args(p)
    p.add_argument("-o", "--out", default="msld_tune", help="folder for tune.txt (the table), tune.json (every "
                   "figure, the machine, the plan checksum) and tune.png (the plot, needs matplotlib); replaced whole")
    add_overwrite_arg(p)
    p.add_argument("--write", action="store_true", help="record the chosen solver and steps in the plan's defaults, "
                   "with the evidence in its provenance (refused when no setting holds; default: off)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    sub.add_parser("export", help="checkpoint -> plan (needs the [export] extra); `msld export --help` for options",
                   add_help=False)
    sub.add_parser("import", help="checkpoint trained with the MedSegLatDiff reference code (last.ckpt + its "
                   ".hydra/config.yaml) -> plan (needs the [export] extra); `msld import --help` for options",
                   add_help=False)
    return ap


def _main(argv: list) -> int:
    if argv[:1] in (["export"], ["import"]):
        rest = [x for x in argv[1:] if x not in ("-v", "--verbose")]
        return (cmd_export if argv[0] == "export" else cmd_import)(None, rest)
    ap = build_parser()
    if argv[:1] == ["segment"]:   # inputs and options in any order: msld segment a.png -k 4 b.png
        sub = next(x for x in ap._actions if isinstance(x, argparse._SubParsersAction))
        a = sub.choices["segment"].parse_intermixed_args(argv[1:])
        a.cmd = "segment"
    else:
        a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(message)s")
    return {"segment": cmd_segment, "info": cmd_info, "build": cmd_build, "bench": cmd_bench,
            "eval": cmd_eval, "tune": cmd_tune, "listen": cmd_listen}[a.cmd](a)


def main(argv=None) -> int:
    """``msld ARGS``: the exit status. Whatever goes wrong ends in one line on stderr naming the
    problem and the fix (exit 2 for usage errors, 1 for failures); ``-v`` adds the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("msld", lambda: _main(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
