"""The ``dist-chita`` console command (installed by pip): the launcher's scripts as subcommands.

    dist-chita prune [--config configs/<run>.yaml] [--launch-config cpu_2] [--print-config] [key=value ...]
    dist-chita plan --params 7e9 --n 128 --gpus 64 --hardware configs/hardware/h100.yaml [...]
    dist-chita decompress [--overwrite] <sparse checkpoint> <output directory>

``prune`` is ``launch/prune.py`` and runs the same way under ``accelerate launch`` and ``torchrun`` (give them the
command's path, ``$(command -v dist-chita)``, or ``-m launch.cli``); ``--launch-config NAME`` checks the arguments
and the config, then runs it under ``accelerate launch --config_file launch/accelerate/NAME.yaml`` itself and exits
with the prune's status. ``plan`` is ``launch/plan.py``.
``decompress`` writes a sparse (compressed-tensors) checkpoint back as a dense one, which any transformers
version and vLLM load; a prune's report and model card in it then describe the dense weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent
if str(ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

LAUNCH_CONFIGS = PACKAGE / "accelerate"
RUN_CONFIGS = ROOT / "configs"  # beside the launch package in a checkout (an editable install)
COMMANDS = {"prune": "prune a model (launch/prune.py)", "plan": "plan a prune on a cluster (launch/plan.py)",
            "decompress": "write a sparse compressed-tensors checkpoint as a dense one"}


def _summary(path: Path, width: int = 88) -> str:
    """The first sentence of a YAML file's leading comment, cut to ``width`` characters."""
    text = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text.append(line.lstrip("# ").strip())
    first = " ".join(text).split(". ")[0].split(": ")[0].rstrip(".")
    return first if len(first) <= width else first[:width - 3].rsplit(" ", 1)[0] + "..."


def listing() -> str:
    """The run configs (configs/*.yaml beside the launch package) and the launch configs, one per line."""
    runs = sorted(RUN_CONFIGS.glob("*.yaml")) if RUN_CONFIGS.is_dir() else []
    lines = [f"run configs in {RUN_CONFIGS} (--config):"]
    lines += [f"  {p.name:22s} {_summary(p)}" for p in runs] or ["  (none: not a source checkout)"]
    lines.append(f"launch configs in {LAUNCH_CONFIGS} (--launch-config NAME, or accelerate launch --config_file):")
    lines += [f"  {p.stem:22s} {_summary(p)}" for p in sorted(LAUNCH_CONFIGS.glob("*.yaml"))]
    return "\n".join(lines)


def usage() -> str:
    lines = ["usage: dist-chita {" + ",".join(COMMANDS) + "} [options]", "",
             "Distributed one-shot pruning with CHITA (dist-chita).", "", "commands:"]
    lines += [f"  {name:12s} {what}" for name, what in COMMANDS.items()]
    lines += ["", "dist-chita COMMAND --help shows a command's options.", "", listing()]
    return "\n".join(lines)


def relaunch(name: str, argv: list[str]) -> int:
    """Run ``dist-chita prune argv`` under ``accelerate launch --config_file launch/accelerate/<name>.yaml``, this
    process being the launcher, and return the prune's exit status. A rank that fails says why in one line
    (launch/prune.py), so the launcher's own account of the failure (its log lines and a traceback) is left out;
    a rank that ended without a word (killed) is named in one line."""
    path = LAUNCH_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(p.stem for p in sorted(LAUNCH_CONFIGS.glob("*.yaml")))
        print(f"error: no launch config {name!r} (one of {names})", file=sys.stderr)
        return 2
    import logging

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "launch.cli", "prune", *argv])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    loggers = [logging.getLogger(n) for n in _ELASTIC_LOGGERS]
    for logger in loggers:
        logger.addFilter(_not_a_failure_notice)
    try:
        launch_command(args)
    except ChildFailedError as e:
        return _failed({rank: (f.exitcode, f.pid, f.error_file) for rank, f in e.failures.items()})
    except subprocess.CalledProcessError as e:  # one process (distributed_type NO), run as a plain subprocess
        return _failed({0: (e.returncode, None, None)}) if e.returncode < 0 else e.returncode
    except SignalException as e:  # the launcher itself stopped (accelerate versions that do not exit on it)
        return 128 + int(e.sigval)
    finally:
        for logger in loggers:
            logger.removeFilter(_not_a_failure_notice)
    return 0


# torch elastic's notices of a launch that failed or was stopped: each rank says what happened itself
_ELASTIC_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api")
_FAILURE_NOTICES = ("Sending process ", "failed (exitcode: ", "Received %s death signal")


def _not_a_failure_notice(record) -> bool:
    return not str(record.msg).startswith(_FAILURE_NOTICES)


def _failed(failures: dict[int, tuple[int, int | None, str | None]]) -> int:
    """The exit status of a launch whose ranks failed (``failures``: rank -> (exit code, PID, the launcher's error
    file of the rank)): that of the lowest rank that said why (it wrote its error line into its error file,
    launch/watchdog.py), else that of the lowest rank, named in one line. A rank ended by a signal counts as
    128 + the signal's number, as a shell reports it."""
    import signal

    told = [code for _, (code, _, path) in sorted(failures.items()) if path and os.path.isfile(path)]
    if not told:
        rank, (code, pid, _) = min(failures.items())
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        where = f" (process {pid})" if pid else ""
        print(f"error: rank {rank}{where} {how} without saying why; no output was written", file=sys.stderr)
        told = [code]
    return 128 - told[0] if told[0] < 0 else told[0]


def prune(argv: list[str]) -> int:
    from launch import prune as recipe

    name = None
    if "--launch-config" in argv or any(a.startswith("--launch-config=") for a in argv):
        argv, name = _take_option(argv, "--launch-config")
        if name is None:
            print("error: --launch-config needs a name (e.g. cpu_2)", file=sys.stderr)
            return 2
    if "-h" in argv or "--help" in argv:
        epilog = ("--launch-config NAME   run under accelerate launch --config_file launch/accelerate/NAME.yaml\n\n"
                  + listing())
        recipe.make_parser("dist-chita prune", epilog).print_help()
        return 0
    if name is None:
        return recipe.main(argv)
    # the arguments and the config are checked as launch/prune.py checks them, before any process starts
    args = recipe.parse_args(argv)
    try:
        recipe.load_config(args.config, args.overrides)
    except recipe.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        return recipe.main(argv)
    return relaunch(name, argv)


def _take_option(argv: list[str], flag: str) -> tuple[list[str], str | None]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE``, and VALUE (None when missing)."""
    rest, value, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == flag:
            value = argv[i + 1] if i + 1 < len(argv) else None
            i += 2
            continue
        if a.startswith(flag + "="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return rest, value


def decompress(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="dist-chita decompress", description=COMMANDS["decompress"])
    ap.add_argument("source", help="a directory written with output.format: compressed-tensors")
    ap.add_argument("target", help="the new directory (must not exist, unless --overwrite); not inside the source")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing target (once the new one is complete)")
    args = ap.parse_args(argv)
    from dist_chita.io import compressed

    try:
        compressed.decompress_checkpoint(args.source, args.target, args.overwrite, "pass --overwrite",
                                         "output directory", finish=_describe_dense)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.target}")
    return 0


def _describe_dense(out: Path) -> None:
    """Rewrite the report and the model card that a prune wrote beside its sparse weights (prune_report.json,
    README.md from dist_chita_config.yaml) for the dense weights decompressed into ``out``, as a prune with
    ``output.format: dense`` writes them. Other checkpoints have no report and are left as they are. A report or
    config this version cannot read (another version's, or edited) is copied as it is, with a note on stderr: the
    weights matter more than their description."""
    from dist_chita.report import Report
    from launch import prune as recipe

    report, config, readme = out / "prune_report.json", out / "dist_chita_config.yaml", out / "README.md"
    if not report.is_file():
        return
    try:
        rep = Report.from_json(report.read_text())
    except (ValueError, TypeError, KeyError) as e:
        print(f"note: {report.name} and {readme.name} copied as they are, describing the sparse weights: the "
              f"report cannot be read ({' '.join(str(e).split())})", file=sys.stderr)
        return
    sparse = rep.output_format
    recipe.record_dense(rep, out)
    report.write_text(rep.to_json())
    if not (readme.is_file() and config.is_file()):
        return
    try:
        cfg = recipe.load_config(config)
    except recipe.ConfigError as e:
        print(f"note: {readme.name} copied as it is, describing the sparse weights: {config.name} cannot be read "
              f"({e})", file=sys.stderr)
        return
    note = (f"The weights are stored dense: `dist-chita decompress` wrote them from the run's compressed-tensors "
            f"output ({sparse}), the format the command below writes.")
    readme.write_text(recipe.card(cfg, rep, [note, ""]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "prune":
        return prune(rest)
    if command == "plan":
        from launch import plan

        return plan.main(rest, prog="dist-chita plan")
    if command == "decompress":
        return decompress(rest)
    print(f"error: unknown command {command!r} (one of {', '.join(COMMANDS)}); dist-chita --help lists them",
          file=sys.stderr)
    return 2


def entry() -> None:
    """The console script: exit with :func:`main`'s status (as launch/prune.py does, a multi-process run skips the
    interpreter's teardown once everything is written)."""
    from launch import watchdog

    watchdog.stop_quietly_while_starting()
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
