#!/usr/bin/env python
"""attmask command line: the one entry point for data, training, evaluation and benchmarks.

Every subcommand follows one error rule: bad input prints a single ``error: ...`` line to stderr
and exits with status 2 (``--debug`` shows the traceback instead). Heavy dependencies (ray,
mlflow, webdataset) are imported inside the subcommands that need them.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from attmask import __version__


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def count(low: int):
    """An argparse type: an integer >= ``low`` (a bad value is an argparse error: one line)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not allowed (must be >= {low})")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def seed_list(text: str) -> list[int]:
    """An argparse type: ``--seeds 0-12`` or ``--seeds 0,1,5`` (each seed once)."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            low, dash, high = part.partition("-")
            if dash and not high:  # "0-": a range without its end is a typo, not seed 0
                raise ValueError(part)
            seeds += range(int(low), int(high or low) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seeds as 0-12 or 0,1,5") from None
    if not seeds or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least one seed, each once")
    return seeds


def fault(text: str):
    """An argparse type: ``--inject-fault STEP[:KIND[:RANK]]`` (reliability tests)."""
    from attmask.errors import UserError
    from pipelines.faults import FaultInjection

    try:
        return FaultInjection.parse(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None


def add_fault_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inject-fault", type=fault, metavar="STEP[:KIND[:RANK]]",
                   help="reliability testing: at STEP, rank RANK (0) exits (KIND exit, once per "
                        "run) or its weights turn NaN (KIND nan)")


def add_config_args(p: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None,
                     help=f"configs/NAME.yaml (default: {default_preset or 'built-in defaults'})")
    src.add_argument("--config", help="path to a config YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. masking.ratio=[0.2,0.4] train.epochs=3")
    p.set_defaults(default_preset=default_preset)


def load_cfg(args):
    from attmask.config import load_config

    preset = args.preset or (None if args.config else args.default_preset)
    return load_config(preset=preset, path=args.config, overrides=args.overrides)


# ----------------------------------------------------------------------------------------------


def cmd_pretrain_local(args) -> int:
    from attmask.runtime import resolve_device
    from attmask.train import pretrain_local

    cfg = load_cfg(args)
    fault = args.inject_fault
    summary = pretrain_local(cfg, device=resolve_device(args.device), max_steps=args.max_steps,
                             before_step=lambda e: fault and fault.before_step(e, 0),
                             after_step=lambda e: fault and fault.after_step(e, 0))
    last = summary.final_metrics
    loss = (f"last logged loss {last['loss']:.4f} (step {last['step']})" if "loss" in last
            else "no step logged")
    print(f"done: {summary.steps} steps, {summary.images_per_s:.1f} img/s, {loss}; outputs in "
          f"{summary.run_dir}")
    return 0


def cmd_pretrain(args) -> int:
    from pipelines.pretrain import run_pretrain

    cfg = load_cfg(args)
    result = run_pretrain(cfg, address=args.address, fault=args.inject_fault)
    metrics = {k: round(v, 4) for k, v in result.metrics.items()
               if k in ("loss", "knn_top1", "images_per_s")}
    print(f"done: {result.run_name}, {result.steps} steps in {result.wall_s:.0f}s, {metrics}; "
          f"MLflow run {result.mlflow_run_id} ({result.tracking_uri}); checkpoints under "
          f"{result.storage_path}/{result.run_name}")
    return 0


def cmd_evaluate(args) -> int:
    from attmask.eval.suite import EvalOptions
    from pipelines.evaluate import run_evaluate

    cfg = load_cfg(args)
    options = EvalOptions(probe_epochs=args.probe_epochs, max_train_samples=args.max_train,
                          max_test_samples=args.max_test,
                          max_attention_samples=args.max_attention,
                          finetune_epochs=args.finetune_epochs,
                          linear_protocol=args.linear_protocol)
    if args.suite is not None:
        options.suite = [s.strip() for s in args.suite.split(",") if s.strip()]
    baselines = tuple(b.strip() for b in args.baselines.split(",")
                      if b.strip() and args.baselines != "none")
    results = run_evaluate(cfg, data=args.data, checkpoint=args.checkpoint,
                           mlflow_run=args.mlflow_run,
                           robustness_set=args.robustness_set, out_dir=args.out,
                           options=options, address=args.address, baselines=baselines,
                           architecture=cfg if args.preset or args.config else None)
    print(f"done: results in {Path(args.out) / 'results.json'}; MLflow run "
          f"{results['mlflow_run_id']}")
    return 0


def cmd_embed(args) -> int:
    from attmask.eval.features import embed_dataset

    out = embed_dataset(args.checkpoint, args.data, args.out, split=args.split,
                        n_last_blocks=args.blocks, limit=args.max_images,
                        tracking_uri=args.tracking_uri)
    print(f"done: features of {args.data} ({args.split}) in {out}")
    return 0


def cmd_tune(args) -> int:
    from pipelines.tune import format_table, load_spec, plan, run_tune

    spec, base = load_spec(args.search, args.overrides)
    print(plan(spec, base))
    if args.dry_run:
        print("dry run: the search file is valid; nothing was trained")
        return 0
    result = run_tune(spec, base, address=args.address)
    print(format_table(result.rows, spec))
    print(f"best: {result.best}; best config {result.best_config_path} (run it with "
          f"`python run_pipeline.py pretrain --config {result.best_config_path}`); MLflow parent "
          f"run {result.parent_run_id}")
    return 0


def cmd_benchmark(args) -> int:
    from attmask.errors import ConfigError
    from pipelines.benchmark import (
        REPORT_ROOT,
        claim_report_folder,
        load_benchmark,
        plan,
        rebuild_report,
        run_benchmark,
    )

    report_root = args.reports or REPORT_ROOT
    strategies = args.strategies.split(",") if args.strategies is not None else None
    if strategies is not None and not all(s.strip() for s in strategies):
        raise ConfigError(f"--strategies {args.strategies!r}: a comma list of strategies, e.g. "
                          "random,attmask_high")
    spec = load_benchmark(args.preset, args.overrides, seeds=args.seeds, strategies=strategies,
                          resolve=args.resolve, max_seeds=args.max_seeds)
    claim_report_folder(spec, Path(report_root) / spec.name, write=False)  # dry run or not
    if spec.data.get("path") and "://" not in spec.data["path"]:
        from attmask.data.shards import load_dataset

        load_dataset(spec.data["path"])  # shards the runs will read: there, with a manifest
    print(plan(spec, report_root))
    if args.dry_run:
        print("dry run: every run's config is valid; nothing was trained")
        return 0
    if args.report_only:
        rebuild_report(spec, report_root)
        return 0
    result = run_benchmark(spec, address=args.address, report_root=report_root,
                           fault=args.inject_fault, allow_mixed_code=args.allow_mixed_code)
    for r in result.failed:
        print(f"error: run {r.run_name} failed: {r.error}", file=sys.stderr)
    print(f"done in {result.wall_s:.0f}s: {result.report_md}, {result.report_html}; MLflow "
          f"parent run {result.parent_run_id}")
    return 1 if result.failed else 0


def cmd_bench_step(args) -> int:
    import torch

    from attmask import masking
    from attmask.errors import ConfigError, check_output_file
    from attmask.runtime import resolve_device
    from attmask.speed import bench_step

    cfg = load_cfg(args)
    if args.precision:
        cfg.train.precision = args.precision
    if args.batch_size:
        cfg.train.batch_size_per_worker = args.batch_size
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in masking.available()]
    if unknown or not strategies:
        raise ConfigError(f"--strategies {args.strategies}: allowed: "
                          f"{', '.join(masking.available())}")
    if args.json:
        check_output_file(args.json, "--json")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench_step(cfg, strategies, steps=args.steps, warmup=args.warmup, device=device,
                        compare_compile=args.compare_compile, only_steps=args.only_steps,
                        profile=args.profile)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)
    return 0


def cmd_check_cluster(args) -> int:
    from pipelines.cluster_check import check_cluster_file

    check_cluster_file(args.path)
    print(f"{args.path}: passed (no service on every interface, MLflow behind basic auth, Ray "
          "token auth left on, no credential written in the file)")
    return 0


def cmd_device_check(args) -> int:
    import platform

    import torch

    from attmask.config import load_config
    from attmask.errors import check_output_file
    from attmask.runtime import resolve_device
    from attmask.speed import device_check

    check_output_file(args.json, "--json")
    device = resolve_device(args.device)
    if args.quick:  # the reduced mode the tests run on a CPU: the same code, seconds
        tiny = load_config("tiny-cpu", overrides=["model.depth=2", "train.batch_size_per_worker=8"])
        plan = dict(full_configs={"tiny-cpu": tiny}, pretrain_cfg=tiny, steps=1, warmup=1,
                    pretrain_steps=3, ddp_workers=2)  # DDP over gloo on two CPU processes
    else:
        paper = load_config("paper-20pct-in1k")
        plan = dict(full_configs={"vit-tiny-224": load_config("vit-tiny-224"),
                                  "vit-small-224": paper}, pretrain_cfg=paper)
    result = device_check(**plan, device=device)
    result.update(quick=args.quick, torch=torch.__version__, python=platform.python_version(),
                  command=" ".join(["python run_pipeline.py device-check", *sys.argv[2:]]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"done: {args.json}")
    return 0


def cmd_prepare_data(args) -> int:
    from attmask.data.prepare import PrepareArgs, prepare_data

    a = PrepareArgs(source=args.source, out=args.out, from_path=args.from_path,
                    num_samples=args.num_samples, num_test_samples=args.num_test_samples,
                    per_class=args.per_class, shard_size=args.shard_size,
                    image_size=args.image_size, seed=args.seed, num_classes=args.num_classes,
                    bg_correlation=args.bg_correlation, colours=args.colours,
                    num_variant_samples=args.num_variant_samples,
                    val_fraction=args.val_fraction, val_per_class=args.val_per_class)
    manifest, written = prepare_data(a)
    state = "wrote" if written else "up to date (same arguments), nothing to do:"
    splits = ", ".join(f"{k} {v['num_samples']} in {len(v['shards'])} shards"
                       for k, v in manifest["splits"].items())
    print(f"{state} {args.out}: {len(manifest['classes'])} classes, "
          f"{manifest['image_size']} px; {splits}")
    if skipped := manifest.get("skipped_inputs"):
        print(f"skipped {len(skipped)} unreadable input(s), listed in {args.out}/dataset.json "
              f"(first: {skipped[0]})")
    return 0


def cmd_bench_data(args) -> int:
    from attmask.config import load_config
    from attmask.errors import check_output_file
    from attmask.speed import bench_data

    tiny = load_config("tiny-cpu")
    crops = {"tiny-cpu": {"global_size": tiny.model.image_size,
                          "local_size": tiny.model.local_image_size,
                          "local_number": tiny.data.local_crops_number},
             "224px-10local": {"global_size": 224, "local_size": 96, "local_number": 10}}
    # each crop setting with its colour per crop (in the workers) and per batch (data.colour_on)
    settings = {f"{name}/colour_on={on}": {**s, "colour_on": on}
                for name, s in crops.items() for on in ("image", "batch")}
    if args.json:
        check_output_file(args.json, "--json")
    result = bench_data(args.data, settings, args.workers, batches=args.batches,
                        batch_size=args.batch_size)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="run_pipeline.py", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"attmask {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")

    p = sub.add_parser("pretrain-local", help="pretrain in this process (no Ray)")
    add_config_args(p, "tiny-cpu")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--max-steps", type=count(1), help="stop after this many steps (smoke runs)")
    add_fault_arg(p)
    p.set_defaults(func=cmd_pretrain_local)

    p = sub.add_parser("pretrain", help="distributed pretraining on Ray Train, tracked in MLflow")
    add_config_args(p, "tiny-cpu")
    p.add_argument("--address", help="attach to a running cluster (auto, ray://...); default: "
                                     "start a local Ray instance")
    add_fault_arg(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("evaluate", help="k-NN, linear, few-shot, robustness, attention as Ray tasks")
    add_config_args(p, None)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="state.pt, a Ray checkpoint dir, an exported "
                                          ".safetensors, models:/NAME/VERSION or runs:/ID/model")
    src.add_argument("--mlflow-run", help="pretraining run id (its logged checkpoint is used)")
    p.add_argument("--data", required=True, help="shard directory with dataset.json")
    p.add_argument("--suite", help="comma list of knn,linear,fewshot,robustness,attention "
                                   "(the default) and finetune")
    p.add_argument("--robustness-set", help="folder with train_original.npz, test_<variant>.npz")
    p.add_argument("--baselines", default="init,pixels",
                   help="reference points scored with the same protocols: init (the untrained "
                        "network of the checkpoint's seed), pixels; 'none' to skip")
    p.add_argument("--out", default="eval", help="output directory (results.json, plots)")
    p.add_argument("--probe-epochs", type=count(1), default=100)
    p.add_argument("--linear-protocol", default="cached", metavar="cached|official",
                   help="cached: SGD on cached centre views (fast); official: DINO's augmented "
                        "crops and LR sweep, LR and epoch chosen on the val split")
    p.add_argument("--finetune-epochs", type=count(1), default=3,
                   help="epochs of the short fine-tuning schedule (--suite ...,finetune)")
    p.add_argument("--max-train", type=count(1), help="cap on train images (features)")
    p.add_argument("--max-test", type=count(1), help="cap on images per test split")
    p.add_argument("--max-attention", type=count(1),
                   help="cap on test images for attention on the object (default: --max-test)")
    p.add_argument("--address", help="attach to a running cluster")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("tune", help="hyperparameter search with Ray Tune (tune_configs/*.yaml)")
    p.add_argument("search", help="search file, e.g. tune_configs/mask_ratio.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the base config")
    p.add_argument("--dry-run", action="store_true", help="validate and print the trial plan")
    p.add_argument("--address", help="attach to a running cluster")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("benchmark", help="end-to-end benchmark of the masking strategies + report")
    p.add_argument("--preset", default="default", help="configs/benchmark/NAME.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of every run")
    p.add_argument("--address", help="attach to a running cluster")
    p.add_argument("--reports", help="report root (default: reports/, one folder per benchmark)")
    p.add_argument("--seeds", type=seed_list, metavar="0-12|0,1,5",
                   help="seeds instead of the preset's (finished runs are kept)")
    p.add_argument("--strategies", metavar="random,attmask_high",
                   help="strategies instead of the preset's (finished runs are kept)")
    p.add_argument("--resolve", type=float, metavar="MARGIN",
                   help="add seeds until each strategy's k-NN difference from the first "
                        "strategy is decided: better, worse or equivalent within +-MARGIN "
                        "points (sequential rule with a 5 %% error rate, docs/usage.md)")
    p.add_argument("--max-seeds", type=count(2), metavar="N",
                   help="with --resolve: at most N seeds per strategy (default 10)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the report from the report folder's finished-run records")
    p.add_argument("--allow-mixed-code", action="store_true",
                   help="pair new runs with finished runs that other code trained")
    add_fault_arg(p)
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("bench-step", help="time training steps per masking strategy")
    add_config_args(p, "vit-tiny-224")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"])
    p.add_argument("--strategies", default="random,attmask_high,attmask_hint")
    p.add_argument("--steps", type=count(1), default=5, help="timed steps per strategy")
    p.add_argument("--warmup", type=count(0), default=2, help="untimed steps per strategy")
    p.add_argument("--batch-size", type=count(1))
    p.add_argument("--threads", type=count(1), help="torch intra-op threads")
    p.add_argument("--device")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--compare-compile", action="store_true",
                   help="also time a train.compile engine (compile time, payback, recompiles)")
    p.add_argument("--only-steps", action="store_true",
                   help="no bound, FLOP count or matmul peak: peak_rss_mb is the steps' own")
    p.add_argument("--profile", action="store_true",
                   help="add the top ten ops by self time (torch.profiler) of the first strategy")
    p.set_defaults(func=cmd_bench_step)

    p = sub.add_parser("device-check", help="figures to record on a new machine (a GPU): "
                                            "bench-step fp32/bf16 and a short library-level "
                                            "pretraining run, as one JSON (needs torch and timm)")
    p.add_argument("--quick", action="store_true", help="reduced CPU run, seconds (the tests)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--json", default="device_check.json", help="where to write the figures")
    p.set_defaults(func=cmd_device_check)

    p = sub.add_parser("check-cluster", help="check a Ray cluster launcher config's security "
                                             "before `ray up` (MLflow auth, open hosts, secrets)")
    p.add_argument("path", nargs="?", default="cluster.yaml")
    p.set_defaults(func=cmd_check_cluster)

    p = sub.add_parser("prepare-data", help="write WebDataset shards and a manifest")
    p.add_argument("--source", required=True, help="synthetic, cifar10, npz or imagefolder")
    p.add_argument("--from", dest="from_path", help="input folder (npz, imagefolder, cifar10)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-samples", type=count(1), help="train size (synthetic: 10000) or cap")
    p.add_argument("--num-test-samples", type=count(0), help="size of each test split or cap")
    p.add_argument("--num-variant-samples", type=count(1),
                   help="synthetic only: images per robustness variant (default: as many as "
                        "the test split)")
    p.add_argument("--per-class", type=count(1), help="keep the first K images per class")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, metavar="F",
                     help="share of each class held out of train as the val split (default "
                          "0.1; 0: none)")
    val.add_argument("--val-per-class", type=count(1), metavar="N",
                     help="hold out N images per class as the val split instead")
    p.add_argument("--shard-size", type=count(1), help="samples per shard (default: >= 8 shards)")
    p.add_argument("--image-size", type=count(1), help="synthetic size (32) / imagefolder resize")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-classes", type=int, default=10, help="synthetic only")
    p.add_argument("--bg-correlation", type=float, default=0.8, help="synthetic only")
    p.add_argument("--colours", default="random",
                   help="synthetic only: random (per image) or fixed (one object colour, two "
                        "greys: the data on which a few hundred steps show learning)")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("embed", help="write a trained backbone's features of a dataset (.npz)")
    p.add_argument("--checkpoint", required=True,
                   help="an exported .safetensors, state.pt, a run or checkpoint folder, "
                        "models:/NAME/VERSION or runs:/ID/model")
    p.add_argument("--data", required=True, help="shard directory with dataset.json")
    p.add_argument("--out", required=True, help="the .npz to write (features, labels, keys)")
    p.add_argument("--split", default="test", help="which split (default: test)")
    p.add_argument("--blocks", type=count(1), default=1,
                   help="concatenate the [CLS] of the last N blocks (default 1)")
    p.add_argument("--max-images", type=count(1), help="a class-stratified subset of N images")
    p.add_argument("--tracking-uri", help="for models:/ and runs:/ references (default: "
                                          "$MLFLOW_TRACKING_URI, else sqlite:///runs/ray/mlflow.db)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("bench-data", help="decode + multi-crop throughput of a shard directory")
    p.add_argument("--data", required=True)
    p.add_argument("--workers", type=count(0), default=2)
    p.add_argument("--batches", type=count(1), default=20)
    p.add_argument("--batch-size", type=count(1), default=64)
    p.add_argument("--json")
    p.set_defaults(func=cmd_bench_data)
    return parser


def parse(parser: Parser, argv: list[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, but ``key=value`` overrides may come anywhere among the flags
    (argparse alone takes them only as one run of positionals)."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:  # the main job: the default benchmark
        args = parse(parser, ["benchmark", *(["--debug"] if args.debug else [])])
    from attmask.errors import Interrupted, UserError

    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as exc:
        if args.debug:
            raise
        print(f"{exc}" if isinstance(exc, Interrupted) else "interrupted", file=sys.stderr)
        return 130


def one_line(exc: BaseException) -> str:
    """The message of a user error, also when a Ray task or a DataLoader worker re-raised it
    with a traceback (Ray keeps the original exception as ``cause``)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
