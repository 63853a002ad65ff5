"""`sft-dist`: argument parsing, and the mapping of outcomes to exit codes (sft_dist.errors.Exit:
0 success; 2 bad config, data or arguments, found before training; 1 a run that started and failed;
143 a run stopped by SIGTERM, saved).
"""

from __future__ import annotations

import argparse
import sys

from sft_dist.errors import Exit, UserError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sft-dist", description="Distributed supervised fine-tuning.")
    commands = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "fine-tune a model"), ("data", "validate the data and print statistics"),
                            ("eval", "run the config's validation on a saved checkpoint"),
                            ("lr-find", "the learning-rate range test: sweep, plot, suggest"),
                            ("tune", "hyperparameter search with Ray Tune, each trial a distributed run"),
                            ("plan", "estimate memory per device; recommend the cheapest ZeRO setting that fits")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("config", help="run config (YAML)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key by dotted path, e.g. --set train.lr=1e-4")
    export = commands.add_parser("export", help="write a checkpoint as a Hugging Face model folder")
    export.add_argument("checkpoint",
                        help="a checkpoint folder or object-store URI, or a run's (its best, else latest)")
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    export.add_argument("--merge-lora", action="store_true",
                        help="adapter checkpoints (LoRA, LoHa, IA3, ...): write the base with the adapter merged in, "
                             "not the adapter folder")
    export.add_argument("--trust-remote-code", action="store_true",
                        help="run the model folder's own Python code (a checkpoint's config never turns this on)")
    commands.choices["eval"].add_argument(
        "--checkpoint", required=True, help="a checkpoint folder, or a run folder (its best, else latest)")
    plan = commands.choices["plan"]
    plan.add_argument("--device-memory", metavar="SIZE", help="memory of one device, e.g. 80GB (GiB)")
    plan.add_argument("--model-config", metavar="DIR", help="a folder with the model's config.json")
    plan.add_argument("--gpus-per-node", type=int, help="for host-memory figures (default: min(workers, 8))")
    plan.add_argument("--bench", metavar="FILE", help="`sft-dist bench`'s JSON, for the speed advice "
                      "(default: ./bench.json if there)")
    bench = commands.add_parser("bench", help="measure sft_dist against baselines, as ratios")
    bench.add_argument("--quick", action="store_true", help="the tiny model, a minute or two on CPU")
    bench.add_argument("--out", default="bench.json", help="where to write the JSON results")
    bench.add_argument("--config", help="run config to measure (default: the quickstart, tiny with --quick)")
    bench.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                       help="where to train (auto: the GPU when CUDA has one); GPU runs add MFU")
    bench.add_argument("--peak-tflops", type=float, help="the GPU's peak TFLOP/s for MFU (default: from a table)")
    commands.choices["tune"].add_argument("--space", required=True, help="search space (YAML)")
    commands.choices["tune"].add_argument("--resume", action="store_true", help="continue an interrupted search")
    lr_find = commands.choices["lr-find"]
    lr_find.add_argument("--lr-min", type=float, default=1e-7)
    lr_find.add_argument("--lr-max", type=float, default=1.0)
    lr_find.add_argument("--steps", type=int, default=100, help="sweep length (it stops early on divergence)")
    for name in ("train", "eval", "lr-find"):
        commands.choices[name].add_argument(
            "--no-ray", action="store_true",
            help="run in this process, without Ray (debugging, benchmarks, single GPU)")
    commands.choices["train"].add_argument(
        "--resume", metavar="auto|PATH",
        help="auto: continue the run named by run_name (else this config's newest run) from its latest "
             "complete checkpoint; PATH: start a new run from that checkpoint (or run folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    from sft_dist import quiet

    quiet.driver()  # before anything imports Ray or DeepSpeed: both read their log settings on import
    args = parser().parse_args(argv)
    try:
        return Exit(run_command(args))
    except UserError as err:  # the one place an exception becomes an exit code
        print(f"error: {err}", file=sys.stderr)
        return Exit.BAD_INPUT


def run_command(args: argparse.Namespace) -> Exit:
    """The command's own exit code (errors.Exit); bad input raises UserError."""
    if args.command in ("train", "eval", "lr-find"):
        from sft_dist.driver import commands

        if args.command == "train":
            return commands.train(args.config, args.overrides, use_ray=not args.no_ray, resume=args.resume)
        if args.command == "eval":
            return commands.evaluate(args.config, args.overrides, args.checkpoint, use_ray=not args.no_ray)
        return commands.find_learning_rate(args.config, args.overrides, args.lr_min, args.lr_max, args.steps,
                                         use_ray=not args.no_ray)
    if args.command == "tune":
        from sft_dist.driver import tuning

        return tuning.tune_command(args.config, args.overrides, args.space, args.resume)
    if args.command == "data":
        return data_command(args.config, args.overrides)
    if args.command == "export":
        return export_command(args.checkpoint, args.out, args.dtype, args.merge_lora, args.trust_remote_code)
    if args.command == "plan":
        from sft_dist.tools import plan

        print(plan.plan(args.config, args.overrides, args.device_memory, args.model_config, args.gpus_per_node,
                        args.bench))
        return Exit.OK
    from sft_dist.tools import bench  # argparse allows no other command

    return Exit(bench.main(args.config, args.quick, args.out, args.device, args.peak_tflops))


def data_command(config_path: str, overrides: list[str]) -> Exit:
    """Prepare the data exactly as `train` would (and cache it); print its statistics and one example."""
    from pathlib import Path

    from sft_dist.driver import commands

    cfg = commands.load_checked(config_path, overrides, fresh_run=False, needs_weights=False)
    data = commands.prepare_data(cfg)
    from sft_dist.data import stats
    from sft_dist.data.prepare import first_example
    from sft_dist.tasks import task_of

    task = task_of(cfg)  # a classifier's labels are ids, not tokens to mark
    example = stats.marked_example(commands.text_tokenizer(cfg.model), *first_example(data.train_dir)) \
        if task.labels_are_tokens else None
    print(stats.report(data.stats, example))
    if task.labelled:
        print(f"labels: {', '.join(cfg.model.labels)}")
    print(f"tokenized rows: {Path(data.train_dir).parent}")
    return Exit.OK


def export_command(source: str, out: str, dtype: str, merge_lora: bool = False, trust_remote_code: bool = False
                   ) -> Exit:
    from pathlib import Path

    from sft_dist.driver import commands

    commands.export_checkpoint(source, Path(out), dtype, merge_lora, trust_remote_code)
    return Exit.OK
