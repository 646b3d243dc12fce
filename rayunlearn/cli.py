"""Command line: subcommands -> config -> API call; nothing else.

    rayunlearn data synth [--config PRESET] [key=value ...]
    rayunlearn data check [--config PRESET] [data.key=value ...]
    rayunlearn finetune   [--config PRESET] [key=value ...]
    rayunlearn unlearn    [--config PRESET] [key=value ...]
    rayunlearn eval MODEL_OR_RUN [key=value ...]
    rayunlearn effects RUN_DIR [key=value ...]
    rayunlearn tofu-summary EVAL_DIR [--retain RETAIN_DIR] [--json]
    rayunlearn sweep SPACE [--resume | --extend N] [key=value ...]
    rayunlearn report RESULTS_DIR [--summary-md PATH [--readme README.md]]
    rayunlearn demo [--model tiny|smollm2-135m] [--stages study,early,sweep] [--summary PATH] [key=value ...]
    rayunlearn bench {effects,eval,sweep,gpu,attacks,all}
    rayunlearn methods        (objectives, method presets and their hyper-parameters)
"""

from __future__ import annotations

import argparse
import shlex
import sys

from rayunlearn import UserError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="a preset name (rayunlearn/presets) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of trials >= 1, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayunlearn", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="benchmark data: synthesize the embedded TOFU-format benchmark")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    synth = data_sub.add_parser("synth", help="write the synthetic fictitious-author benchmark as JSON files")
    _config_args(synth)
    check = data_sub.add_parser("check", help="load and validate a benchmark (synthetic, tofu, or a directory)")
    _config_args(check)

    _config_args(sub.add_parser("finetune", help="train the base, target or retain model"))
    _config_args(sub.add_parser("unlearn", help="unlearn a forget split from a target model"))

    ev = sub.add_parser("eval", help="TOFU evaluation of a model directory or an unlearning run")
    ev.add_argument("model", metavar="MODEL_OR_RUN")
    ev.add_argument("--out", default=None, help="where to write metrics.json (default: inside the run / model dir)")
    _config_args(ev)

    ef = sub.add_parser("effects", help="replay G-effects offline on a run's saved checkpoints")
    ef.add_argument("run_dir", metavar="RUN_DIR")
    _config_args(ef)

    ts = sub.add_parser("tofu-summary", help="summarise an evaluation directory in the original TOFU log format")
    ts.add_argument("eval_dir", metavar="EVAL_DIR")
    ts.add_argument("--retain", default=None, metavar="RETAIN_DIR", help="retain model's logs (for forget quality)")
    ts.add_argument("--json", action="store_true", help="print one JSON object")

    sw = sub.add_parser("sweep", help="Ray Tune + Optuna sweep over a search space (YAML)")
    sw.add_argument("space", metavar="SPACE",
                    help="a search space: a YAML file or the name of a shipped one (tiny, wga_kl, recipes/...)")
    sw.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    sw.add_argument("--extend", type=_positive_int, default=0, metavar="N",
                    help="add N trials to a finished sweep (its Optuna study keeps every earlier trial)")
    sw.add_argument("overrides", nargs="*", metavar="key=value")

    rp = sub.add_parser("report", help="HTML/Markdown/PNG report from a results directory (no Ray, no model)")
    rp.add_argument("results_dir", metavar="RESULTS_DIR")
    rp.add_argument("--summary-md", default=None, metavar="PATH",
                    help="also write a Markdown summary (tables, claim verdicts, commit, command) to PATH")
    rp.add_argument("--readme", default=None, metavar="FILE",
                    help="with --summary-md: replace FILE's generated-summary block with the new summary")

    dm = sub.add_parser("demo", help="the main job: synthesize, train, the paper's study, a sweep, the report")
    dm.add_argument("--model", default="tiny", help="tiny (default) or smollm2-135m")
    dm.add_argument("--out", default="results/demo")
    dm.add_argument("--fresh", action="store_true", help="ignore finished stages and start over")
    dm.add_argument("--stages", default=None, metavar="LIST",
                    help="the stages to run after the preparation, comma-separated: study, early, sweep "
                         "(default: all three); e.g. --stages study")
    dm.add_argument("--summary", default=None, metavar="PATH",
                    help="also write a Markdown summary of the results to PATH (e.g. docs/results/demo.md)")
    dm.add_argument("overrides", nargs="*", metavar="key=value")

    bn = sub.add_parser("bench", help="performance measurements, printed as side-by-side ratios")
    bn.add_argument("what", choices=["effects", "eval", "sweep", "gpu", "attacks", "all"])
    bn.add_argument("--model", default=None, help="tiny, smollm2-135m (default: both where installed)")
    bn.add_argument("--quick", action="store_true", help="fewer repetitions")

    sub.add_parser("methods", help="list objectives, method presets and their hyper-parameters")
    return parser


def dispatch(args: argparse.Namespace) -> int:
    from rayunlearn import config as C

    cmd = args.command
    if cmd == "data":
        if args.data_command == "synth":
            from rayunlearn.data.synth import synthesize

            cfg = C.load_config(C.SynthConfig, args.config, args.overrides)
            out = synthesize(cfg)
            print(f"wrote the synthetic benchmark to {out}")
            return 0
        if args.data_command == "check":
            from rayunlearn.data import describe_benchmark, load_benchmark

            cfg = C.load_data_config(args.config, args.overrides)
            print(describe_benchmark(load_benchmark(cfg)))
            return 0
        raise UserError("usage: rayunlearn data {synth,check} [key=value ...]")
    if cmd == "finetune":
        cfg = C.load_config(C.FinetuneConfig, args.config, args.overrides)
        from rayunlearn.train import finetune

        finetune(cfg)
        return 0
    if cmd == "unlearn":
        cfg = C.load_config(C.UnlearnConfig, args.config, args.overrides)
        from rayunlearn.train import unlearn

        unlearn(cfg)
        return 0
    if cmd == "eval":
        from rayunlearn.eval.evaluate import eval_command

        return eval_command(args.model, args.config, args.overrides, out=args.out)
    if cmd == "effects":
        from rayunlearn.effects.replay import replay_command

        return replay_command(args.run_dir, args.config, args.overrides)
    if cmd == "tofu-summary":
        from rayunlearn.eval.tofu_logs import summary_command

        return summary_command(args.eval_dir, retain_dir=args.retain, as_json=args.json)
    if cmd == "sweep":
        from rayunlearn.sweep.driver import sweep_command

        return sweep_command(args.space, args.overrides, resume=args.resume, extend=args.extend)
    if cmd == "report":
        from rayunlearn.report import report_command

        if args.readme and not args.summary_md:
            raise UserError("report: --readme quotes the summary that --summary-md PATH writes; give both")
        return report_command(args.results_dir, summary_md=args.summary_md, command=args.command_line,
                              readme=args.readme)
    if cmd == "demo":
        from rayunlearn.demo import demo_command, parse_stages

        return demo_command(model=args.model, out=args.out, overrides=args.overrides, fresh=args.fresh,
                            summary=args.summary, command=args.command_line, stages=parse_stages(args.stages))
    if cmd == "bench":
        from rayunlearn.bench import bench_command

        return bench_command(args.what, model=args.model, quick=args.quick)
    if cmd == "methods":
        from rayunlearn.objectives import describe

        print(describe())
        return 0
    build_parser().print_help()
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positional key=value overrides after options (`eval M --out X k=v`)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.command_line = "rayunlearn " + shlex.join(sys.argv[1:] if argv is None else argv)   # what summaries record
    try:
        return dispatch(args) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
