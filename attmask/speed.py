"""Speed measurements: ``bench-step`` (training step per masking strategy), ``bench-data``
(decode + multi-crop throughput), ``ddp_step`` (the step through DDP on several processes) and
``device-check`` (the figures to record on a new machine).

``bench-step`` interleaves the strategies (and a plain timm forward+backward of the same
backbone, the bound) step by step in one process, drops warm-up steps and reports medians with
their spread, so the ratios hold up on a noisy machine. Only torch and timm are needed.
"""
from __future__ import annotations

import copy
import json
import math
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from attmask.config import Config
from attmask.engine import Engine, build_net
from attmask.masking import make_masker
from attmask.runtime import describe_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a square matmul: the machine's own ceiling, measured in the same run."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    times = [_timed(lambda: a @ b, device) for _ in range(reps)]
    return 2 * size ** 3 / statistics.median(times) / 1e9


def _stats(times: list[float], images: int) -> dict:
    rates = sorted(images / t for t in times)
    return {"images_per_s": statistics.median(rates), "images_per_s_min": rates[0],
            "images_per_s_max": rates[-1], "step_s_median": statistics.median(times),
            "timed_steps": len(times)}


def bench_step(cfg: Config, strategies: list[str], steps: int = 5, warmup: int = 2,
               device: Optional[torch.device] = None, *, compare_compile: bool = False,
               only_steps: bool = False, profile: bool = False,
               log: Callable[[str], None] = print) -> dict:
    """Time training steps of each strategy, interleaved, on random inputs of the config's shape.

    ``compare_compile`` adds a ``train.compile`` engine next to the eager one (rows
    ``STRATEGY+compiled``) with its compile time, payback and recompile count; ``only_steps``
    skips the bound, FLOP counts and matmul peaks, so ``peak_rss_mb`` is the steps' own;
    ``profile`` adds the top ten ops by self time of the first strategy's step."""
    from torch._dynamo.utils import counters

    B, m = cfg.train.batch_size_per_worker, cfg.model
    variants = {"": copy.deepcopy(cfg)}
    if compare_compile:
        variants[""].train.compile = False
        variants["+compiled"] = copy.deepcopy(cfg)
        variants["+compiled"].train.compile = True
    engines = {suffix: Engine(c, steps_per_epoch=10_000, device=device)  # schedules never end
               for suffix, c in variants.items()}
    engine = engines[""]
    dev = engine.device
    maskers = {name: make_masker(name, **cfg.masking.masker_kwargs(name)) for name in strategies}
    images = torch.randn(2, B, 3, m.image_size, m.image_size, device=dev)
    n_local = cfg.data.local_crops_number
    local = (torch.randn(n_local, B, 3, m.local_image_size, m.local_image_size, device=dev)
             if n_local else None)

    def run(eng: Engine, name: str) -> Callable[[], object]:
        def step():
            eng.masker = maskers[name]
            eng.train_step(images, local)
        return step

    jobs = {name + suffix: run(eng, name) for suffix, eng in engines.items() for name in strategies}
    if not only_steps:
        # The bound: plain timm forward+backward of the same backbone on one global view.
        plain = build_net(cfg.model).backbone.to(dev)

        def plain_step():
            with engine.autocast():
                loss = plain.forward_features(images[0]).float().mean()
            loss.backward()
            plain.zero_grad(set_to_none=True)
        jobs["plain_backbone"] = plain_step
    times: dict[str, list[float]] = {name: [] for name in jobs}
    first: dict[str, float] = {}
    graphs_after_warmup = None
    for round_ in range(warmup + steps):
        if round_ == max(warmup, 1):  # every shape has been seen once by now
            graphs_after_warmup = counters["stats"]["unique_graphs"]
        for name, job in jobs.items():
            elapsed = _timed(job, dev)
            first.setdefault(name, elapsed)
            if round_ >= warmup:
                times[name].append(elapsed)
        log(f"round {round_ + 1}/{warmup + steps}: "
            + ", ".join(f"{k} {B / t[-1] if t else 0:.2f} img/s" for k, t in times.items()))

    result: dict = {"config": {"arch": m.arch, "depth": m.dims[1], "image_size": m.image_size,
                               "local_crops": f"{n_local} x {m.local_image_size}px",
                               "batch": B, "out_dim": m.out_dim,
                               "patch_center_sample": cfg.loss.patch_center_sample,
                               "framework": cfg.loss.framework,
                               "compile": cfg.train.compile and not compare_compile,
                               "checkpoint_blocks": cfg.train.checkpoint_blocks},
                    "device": describe_device(dev), "precision": engine.precision,
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "strategies": {}}
    bound = None
    if not only_steps:
        # FLOPs: one iBOT image = 2 teacher forwards + student fwd+bwd on 2 global and L local.
        backbone = engine.student.backbone
        with torch.no_grad():
            f_global = _count_flops(lambda: backbone.forward_tokens(images[0, :1]))
            f_local = (_count_flops(lambda: backbone.forward_tokens(local[0, :1]))
                       if local is not None else 0)
        cost = (2 * f_global + 3 * (2 * f_global + n_local * f_local)) / (3 * f_global)
        plain_stats = _stats(times.pop("plain_backbone"), B)
        bound = plain_stats["images_per_s"] / cost
        result.update({"plain_backbone": plain_stats, "ibot_image_cost_in_plain_images": cost,
                       "bound_images_per_s": bound})
        step_flops = {name: _count_flops(run(engine, name)) for name in strategies}
    for name, timed in times.items():  # the strategies, eager then compiled
        s = _stats(timed, B)
        if bound is not None:
            flops = step_flops[name.removesuffix("+compiled")]
            s["fraction_of_bound"] = s["images_per_s"] / bound
            s["gflop_per_step"] = flops / 1e9
            s["achieved_gflop_s"] = flops / 1e9 / s["step_s_median"]
        result["strategies"][name] = s
    ref = result["strategies"].get("random", {}).get("images_per_s")
    for s in result["strategies"].values():
        s["ratio_to_random"] = s["images_per_s"] / ref if ref else None
    if compare_compile or cfg.train.compile:
        result["compile"] = _compile_figures(result["strategies"], first, strategies,
                                             compare_compile, counters, graphs_after_warmup)
    if profile:
        result["profile_top10"] = profile_step(jobs[strategies[0]], dev)
    if not only_steps:
        result["matmul_peak_gflop_s"] = {"fp32": matmul_peak(dev, torch.float32),
                                         "bf16": matmul_peak(dev, torch.bfloat16)}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dev.type == "cuda":
        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return result


def _compile_figures(rows: dict, first: dict[str, float], strategies: list[str],
                     compared: bool, counters, graphs_after_warmup: Optional[int]) -> dict:
    """Compile time (the first compiled step minus a steady one; later strategies reuse its
    graphs), steps to pay it back against eager, and graphs compiled after every shape was
    seen once (recompiles: should be 0)."""
    keys = [name + "+compiled" if compared else name for name in strategies]
    graphs = counters["stats"]["unique_graphs"]
    out: dict = {"graphs": graphs,
                 "recompiles_after_first_round": (graphs - graphs_after_warmup
                                                  if graphs_after_warmup is not None else None),
                 "compile_s": first[keys[0]] - rows[keys[0]]["step_s_median"]}
    if compared:
        for name, key in zip(strategies, keys):
            eager_s, compiled_s = rows[name]["step_s_median"], rows[key]["step_s_median"]
            out[name] = {"speedup": eager_s / compiled_s,
                         "payback_steps": (out["compile_s"] / (eager_s - compiled_s)
                                           if eager_s > compiled_s else None)}
    return out


def profile_step(step: Callable[[], object], device: torch.device, reps: int = 3) -> list[dict]:
    """The ten ops with the most self time in ``reps`` calls of ``step`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    step()  # not the first call: allocation and kernel choice are not the steady state
    with profile(activities=activities) as prof:
        for _ in range(reps):
            step()
        _sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1.0
    return [{"op": e.key, "self_ms_per_step": getattr(e, attr) / 1000 / reps,
             "share": getattr(e, attr) / total, "calls_per_step": e.count / reps}
            for e in events[:10]]


def bench_data(data_path: str, settings: dict[str, dict], workers: int, batches: int = 20,
               batch_size: int = 64, log: Callable[[str], None] = print) -> dict:
    """Decode + multi-crop images/s of the training stream for each named crop setting
    (with ``colour_on: batch``, the batch's colour step in this process included)."""
    from attmask.data.shards import load_dataset
    from attmask.data.stream import TrainStream, make_loader
    from attmask.data.transforms import MultiCropTransform

    dataset = load_dataset(data_path)
    out: dict = {"data": data_path, "workers": workers, "batch_size": batch_size, "settings": {}}
    for name, s in settings.items():
        transform = MultiCropTransform(s["global_size"], s["local_size"],
                                       local_number=s["local_number"],
                                       colour_on=s.get("colour_on", "image"), loader_workers=workers)
        stream = TrainStream(dataset, "train", transform, batch_size, min_size=0)
        loader = iter(make_loader(stream, workers))
        next(loader)  # worker start-up is not throughput
        start = time.perf_counter()
        for _ in range(batches):
            transform.finish(next(loader), torch.device("cpu"))
        rate = batches * batch_size / (time.perf_counter() - start)
        out["settings"][name] = {**s, "images_per_s": rate}
        log(f"{name}: {rate:.1f} images/s ({workers} workers)")
    return out


def ddp_step(cfg: Config, world_size: int, *, steps: int = 5, warmup: int = 2,
             device_type: str = "cuda") -> dict:
    """The training step through ``DistributedDataParallel`` on ``world_size`` processes: one per
    GPU over NCCL, or CPU processes over gloo (how the tests run it). Each rank steps on its own
    random inputs of the config's shape. Reports the global images/s (median step of rank 0,
    every rank waiting at a barrier before each step), the share per worker, and the largest
    difference of any student weight between ranks afterwards, which is 0 when DDP's gradient
    all-reduce (and the loss's all-reduced centres) keep the replicas identical."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        result = Path(d) / "ddp.json"
        mp.spawn(_ddp_worker, args=(world_size, cfg, steps, warmup, device_type,
                                    f"file://{d}/rendezvous", str(result)),
                 nprocs=world_size, join=True)
        return json.loads(result.read_text())


def _ddp_worker(rank: int, world_size: int, cfg: Config, steps: int, warmup: int,
                device_type: str, init_method: str, result: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cuda = device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:  # the processes share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank,
                            world_size=world_size)
    try:
        unused = cfg.loss.framework == "dino" and not cfg.model.shared_head
        engine = Engine(cfg, steps_per_epoch=10_000, device=device, world_size=world_size,
                        rank=rank, wrap_student=lambda m: DistributedDataParallel(
                            m, device_ids=[rank] if cuda else None,
                            find_unused_parameters=unused))
        B, m, n_local = cfg.train.batch_size_per_worker, cfg.model, cfg.data.local_crops_number
        inputs = torch.Generator().manual_seed(rank)  # each rank its own images, as in training
        images = torch.randn(2, B, 3, m.image_size, m.image_size, generator=inputs).to(device)
        local = (torch.randn(n_local, B, 3, m.local_image_size, m.local_image_size,
                             generator=inputs).to(device) if n_local else None)
        times = []
        for i in range(warmup + steps):
            dist.barrier()
            elapsed = _timed(lambda: engine.train_step(images, local), device)
            if i >= warmup:
                times.append(elapsed)
        weights = torch.cat([p.detach().float().flatten() for p in engine.student.parameters()])
        high, low = weights.clone(), weights.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        if rank == 0:
            step_s = statistics.median(times)
            Path(result).write_text(json.dumps({
                "world_size": world_size, "backend": dist.get_backend(),
                "device": describe_device(device), "precision": engine.precision,
                "batch_per_worker": B, "step_s_median": step_s,
                "images_per_s": B * world_size / step_s, "images_per_s_per_worker": B / step_s,
                "max_weight_difference_between_ranks": (high - low).abs().max().item()}))
    finally:
        dist.destroy_process_group()


def device_check(full_configs: dict[str, Config], pretrain_cfg: Config, *, steps: int = 5,
                 warmup: int = 2, pretrain_steps: int = 20, device: Optional[torch.device] = None,
                 ddp_workers: Optional[int] = None, log: Callable[[str], None] = print) -> dict:
    """The figures to record the first time a machine (a GPU) is available, in one dictionary:
    ``bench-step`` of each config in fp32 and bf16 (images/s, fraction of the plain-timm bound,
    peak memory), then a short pretraining run of ``pretrain_cfg`` on generated images (no Ray,
    no shards: the library alone), whose loss, masks and teacher targets should behave as on a
    CPU, then ``pretrain_cfg``'s step through DDP on ``ddp_workers`` processes (default: every
    GPU when more than one is visible). Needs only torch, timm and this package."""
    from attmask.data.synthetic import ObjectsOnBackgrounds
    from attmask.data.transforms import collate_views, pretraining_transform

    out: dict = {"bench_step": {}, "pretrain": {}}
    on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
    for name, cfg in full_configs.items():
        for precision in ("fp32", "bf16"):
            c = copy.deepcopy(cfg)
            c.train.precision = precision
            # On a GPU, bf16 also times train.compile: the figure that decides its GPU default.
            r = bench_step(c, ["random", "attmask_high"], steps=steps, warmup=warmup,
                           device=device, compare_compile=on_gpu and precision == "bf16",
                           log=lambda s: None)
            out["device"] = r["device"]
            out["bench_step"][f"{name}/{precision}"] = {
                "precision": r["precision"], "batch": r["config"]["batch"],
                "plain_backbone_images_per_s": r["plain_backbone"]["images_per_s"],
                "bound_images_per_s": r["bound_images_per_s"],
                "peak_gpu_memory_mb": r.get("peak_gpu_memory_mb"),
                "matmul_peak_gflop_s": r["matmul_peak_gflop_s"][precision],
                **({"compile": r["compile"]} if "compile" in r else {}),
                **{s: {k: v[k] for k in ("images_per_s", "fraction_of_bound",
                                         "achieved_gflop_s")}
                   for s, v in r["strategies"].items()}}
            log(f"{name} {precision}: " + ", ".join(
                f"{s} {v['images_per_s']:.1f} img/s ({v['fraction_of_bound']:.2f} of bound)"
                for s, v in r["strategies"].items()))

    m = pretrain_cfg.model
    engine = Engine(pretrain_cfg, steps_per_epoch=pretrain_steps, device=device)
    images = ObjectsOnBackgrounds(m.image_size, seed=0)
    crops = pretraining_transform(pretrain_cfg)
    batch_size, history = pretrain_cfg.train.batch_size_per_worker, []
    start = None
    for step in range(pretrain_steps):
        views = [crops(torch.from_numpy(images.sample("train", step * batch_size + i).image)
                       .permute(2, 0, 1)) for i in range(batch_size)]
        global_crops, local_crops = crops.finish(collate_views(views), engine.device)
        if step == 1:  # the first step pays for kernel selection and allocation
            _sync(engine.device)
            start = time.perf_counter()
        floats = engine.train_step(global_crops, local_crops).as_floats()
        history.append({k: floats[k] for k in ("loss", "masked_fraction", "teacher_flatness")})
    _sync(engine.device)
    elapsed = time.perf_counter() - start if start is not None else float("nan")
    losses = [h["loss"] for h in history]
    out["pretrain"] = {
        "arch": m.arch, "image_size": m.image_size, "batch": batch_size, "steps": pretrain_steps,
        "precision": engine.precision, "first_loss": losses[0], "last_loss": losses[-1],
        "all_finite": all(map(math.isfinite, losses)),
        "masked_fraction_mean": statistics.mean(h["masked_fraction"] for h in history),
        "teacher_flatness_last": history[-1]["teacher_flatness"],
        "images_per_s_with_crops_on_cpu": (pretrain_steps - 1) * batch_size / elapsed,
    }
    if engine.device.type == "cuda":
        out["pretrain"]["gpus_visible"] = torch.cuda.device_count()
        out["pretrain"]["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    log(f"pretrain {m.arch} {m.image_size}px: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"{out['pretrain']['images_per_s_with_crops_on_cpu']:.1f} img/s (crops made on the CPU)")

    gpus = torch.cuda.device_count() if engine.device.type == "cuda" else 0
    workers = ddp_workers if ddp_workers is not None else gpus
    if workers > 1:
        out["ddp"] = ddp_step(pretrain_cfg, workers, steps=steps, warmup=warmup,
                              device_type=engine.device.type)
        log(f"ddp {workers} x {engine.device.type}: {out['ddp']['images_per_s']:.1f} img/s, "
            f"replicas differ by {out['ddp']['max_weight_difference_between_ranks']:.1e}")
    else:
        out["ddp"] = {"skipped": f"{max(gpus, 1)} device(s): DDP needs at least 2"}
    return out
