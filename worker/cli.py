"""`akm`: a thin argparse skin over the worker's modules.

Each command names the function that does it as "module:function"; the module
is imported only when that command runs, so `akm tasks run` (a process per
scheduled run) pays for nothing else. Handlers take the parsed arguments and
return an exit code; they raise AkmError for anything a user can fix.
"""

import argparse
import os
import sys

from .errors import EXIT_INTERNAL, EXIT_STATE, EXIT_USAGE, AkmError, StateError

FORMATS = ("text", "json")


class _Formatter(argparse.HelpFormatter):
    # argparse's own formatter imports shutil (and with it bz2 and lzma) to
    # measure the terminal, on every run, even when no help is printed.
    def __init__(self, prog, **kw):
        try:
            width = os.get_terminal_size().columns - 2
        except OSError:
            width = 78
        super().__init__(prog, width=max(40, min(width, 118)), **kw)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*a, **kw)

    def error(self, message):
        # argparse exits 2; ours is documented as 64 (EX_USAGE) everywhere.
        self.print_usage(sys.stderr)
        sys.stderr.write(f"akm: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _common():
    # --stash is accepted before or after the subcommand; SUPPRESS keeps a
    # subcommand's missing --stash from overwriting a global one.
    p = _Parser(add_help=False)
    p.add_argument("--stash", metavar="DIR", default=argparse.SUPPRESS,
                   help="the stash directory (default: $AKM_STASH or /stash)")
    return p


def _fmt(p, choices=FORMATS):
    p.add_argument("--format", choices=choices, default="text",
                   help="output format (default: text)")


def build_parser(only_run: bool = False) -> argparse.ArgumentParser:
    """The whole CLI, or (ONLY_RUN) just `akm tasks run`: that command starts
    a process per scheduled run, and building every subparser costs more
    than the rest of its start-up."""
    common = _common()
    root = _Parser(prog="akm", parents=[common],
                   description="Run akm task assets on a schedule and keep a record of every run.")
    sub = root.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def cmd(parent, name, target, help_):
        p = parent.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(target=target)
        return p

    tasks = sub.add_parser("tasks", help="list, validate, run and install task files",
                           description="list, validate, run and install task files")
    tsub = tasks.add_subparsers(dest="tasks_command", metavar="COMMAND", parser_class=_Parser)
    tsub.required = True

    p = cmd(tsub, "run", "worker.runner:cmd_run", "run one task now and record the run")
    p.add_argument("task_id", metavar="ID")
    p.add_argument("--trigger", choices=("manual", "schedule"), default="manual",
                   help="recorded with the run (default: manual; the crontab uses schedule)")
    p.add_argument("--detach", action="store_true",
                   help="return at once and run in the background, output to $AKM_LOG_SINK "
                        "(the crontab uses this so a long task never holds up the scheduler)")
    if not only_run:
        _add_the_rest(sub, tsub, cmd)
    return root


def _add_the_rest(sub, tsub, cmd):

    p = cmd(tsub, "list", "worker.taskfile:cmd_list",
            "list tasks: enabled, schedule, next run, last status")
    _fmt(p)
    p = cmd(tsub, "validate", "worker.taskfile:cmd_validate",
            "check every task file; one line per invalid file")
    _fmt(p)
    p = cmd(tsub, "install", "worker.crontab:cmd_install",
            "write the crontab for supercronic from the valid, enabled tasks")
    p.add_argument("--crontab", metavar="PATH",
                   help="where to write it (default: $AKM_CRONTAB or ~/.akm/crontab)")
    p.add_argument("--print", action="store_true", dest="print_only",
                   help="print the crontab instead of writing it")

    p = cmd(sub, "runs", "worker.state:cmd_runs", "list recorded runs, newest first")
    p.add_argument("--task", metavar="ID")
    p.add_argument("--status", metavar="STATUS")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="default: 20")
    _fmt(p)

    p = cmd(sub, "logs", "worker.runlog:cmd_logs", "print a run's log (the newest by default)")
    p.add_argument("task_id", metavar="ID")
    p.add_argument("--run", type=int, metavar="N", help="run id (see `akm runs`)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing while the run goes on")
    p.add_argument("--raw", action="store_true", help="print the JSON Lines file as it is")

    p = cmd(sub, "prune", "worker.state:cmd_prune",
            "delete old runs and their log files together (never a running one)")
    p.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h")
    p.add_argument("--dry-run", action="store_true")

    p = cmd(sub, "health", "worker.health:cmd_health", "summarise what went wrong")
    p.add_argument("--window", default="24h", metavar="AGE", help="default: 24h")
    _fmt(p, FORMATS + ("discord",))

    p = cmd(sub, "report", "worker.report:cmd_report",
            "post the health report to a Discord webhook on a schedule (the sidecar)")
    p.add_argument("--discord", action="store_true", help="post to $DISCORD_WEBHOOK_URL")
    p.add_argument("--once", action="store_true", help="post once and exit")

    cmd(sub, "scheduler", "worker.scheduler:cmd_scheduler",
        "the container's main process: keep the crontab in step with tasks/ and run supercronic")
    cmd(sub, "healthcheck", "worker.scheduler:cmd_healthcheck",
        "exit 0 if the scheduler is alive and its crontab loaded (Docker HEALTHCHECK)")
    cmd(sub, "version", "worker.cli:cmd_version", "print akm-worker's and supercronic's versions")


def cmd_version(args) -> int:
    from . import __version__
    print(f"akm-worker {__version__}")
    print(f"supercronic {_supercronic_version()}")
    return 0


def _supercronic_version() -> str:
    # The image records what it carries at build time; a host install has none.
    path = os.environ.get("AKM_SUPERCRONIC_VERSION_FILE", "/usr/share/akm-worker/supercronic.version")
    try:
        with open(path) as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "not installed"


def _call(target: str, args) -> int:
    import importlib
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)(args)


def _is_run(argv) -> bool:
    words, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--stash":
            skip = True  # its value is not a command word
        elif not a.startswith("-"):
            words.append(a)
    return words[:2] == ["tasks", "run"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(only_run=_is_run(argv)).parse_args(argv)
    if not hasattr(args, "stash"):
        args.stash = None
    try:
        code = _call(args.target, args)
    except AkmError as e:
        sys.stderr.write(f"akm: {e}\n")
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # `akm runs | head`: the reader left; that is not an error.
        code = 0
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if os.environ.get("AKM_DEBUG") == "1":
            raise
        sqlite3 = sys.modules.get("sqlite3")  # loaded by whoever touched state.db
        if sqlite3 and isinstance(e, sqlite3.DatabaseError):
            sys.stderr.write(f"akm: {StateError.from_sqlite('state.db', e)}\n")
            return EXIT_STATE
        sys.stderr.write(f"akm: internal error: {type(e).__name__}: {e} "
                         f"(run with AKM_DEBUG=1 for details, and please report it)\n")
        code = EXIT_INTERNAL
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
