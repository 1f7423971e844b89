"""The `sr-pipeline` command line: thin commands that parse options and call library code.

Commands import their heavy dependencies lazily, so `sr-pipeline --help` is instant. Errors a
user can fix (:class:`pipeline.console.UserError`) are printed as one line with exit code 1.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from pipeline import __version__, console

app = typer.Typer(
    name="sr-pipeline",
    help="DNLAN super-resolution: preprocess DIV2K into shards, train with Ray, evaluate, track in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold credentials
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"sr-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],  # noqa: UP045 - typer needs the typing form on 3.10
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars; sparse plain-text status (automatic when not a TTY).")
    ] = False,
) -> None:
    if quiet:
        console.set_quiet(True)


@app.command()
def info(
    address: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Also report the resources of the Ray cluster at this address (e.g. 127.0.0.1:6379)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Environment report for bug reports: versions, GPUs, CPUs, tracking URI, Ray cluster."""
    from pipeline.info import environment_report, render_text

    report = environment_report(address)
    typer.echo(json.dumps(report, indent=2) if as_json else render_text(report))


STAGE_CONFIGS = {"preprocess": "PreprocessConfig", "train": "TrainConfig", "evaluate": "EvalConfig", "model": "ModelConfig"}


@app.command("config")
def config_cmd(
    stage: Annotated[str, typer.Argument(help="preprocess | train | evaluate | model")],
    preset: Annotated[Optional[str], typer.Option(help="paper | paper128 | tiny")] = None,  # noqa: UP045
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML file with option: value pairs.")] = None,  # noqa: UP045
    scale: Annotated[Optional[int], typer.Option(help="Upscaling factor (2, 3 or 4).")] = None,  # noqa: UP045
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override one value: KEY=VALUE (dotted for nested keys).")] = None,  # noqa: UP045
    flat: Annotated[bool, typer.Option("--flat", help="Print the flat key=value form logged as MLflow params.")] = False,
) -> None:
    """Show the fully resolved configuration of a stage (defaults, preset, file, overrides)."""
    from pipeline import config as cfgmod

    if stage not in STAGE_CONFIGS:
        raise console.UserError(f"unknown stage {stage!r} (choose from {', '.join(STAGE_CONFIGS)})")
    cls = getattr(cfgmod, STAGE_CONFIGS[stage])
    overrides: dict[str, object] = dict(cfgmod.parse_sets(set_))
    if scale is not None:
        overrides["scale" if stage == "model" else "model.scale"] = scale
    if stage == "model":
        values = cfgmod.preset_values(preset or "paper", scale).get("model", {})
        if config:
            values.update(cfgmod.read_yaml(config))
        values.update(overrides)
        cfg = cfgmod.from_mapping(cls, values)
        cfg.validate()
    elif stage == "preprocess":
        if preset:
            raise console.UserError("the preprocess stage has no presets")
        cfg = cfgmod.load_config(cls, yaml_path=config, overrides=overrides)
    else:
        cfg = cfgmod.load_config(cls, preset=preset, yaml_path=config, overrides=overrides)
    if flat:
        for key, value in cfgmod.flatten(cfg).items():
            typer.echo(f"{key}={value}")
    else:
        import yaml

        typer.echo(yaml.safe_dump(cfgmod.to_dict(cfg), sort_keys=False).rstrip())


# --- stage commands: each stage module adds its commands to `app` via register(app). ---
# Those modules import only typer and pipeline.config at top level (heavy imports go inside
# the command functions) so that `sr-pipeline --help` stays instant.
from pipeline.preprocess import commands as _preprocess_commands  # noqa: E402

_preprocess_commands.register(app)
from pipeline.train import commands as _train_commands  # noqa: E402

_train_commands.register(app)
from pipeline.evaluate import commands as _evaluate_commands  # noqa: E402

_evaluate_commands.register(app)
from pipeline.ops import commands as _ops_commands  # noqa: E402

_ops_commands.register(app)


def main() -> None:
    """Entry point: every failure a user can cause ends as one `error:` line.

    Typer runs in non-standalone mode so that usage errors (a bad option value) are printed
    as one line here instead of a boxed panel, and so that Ctrl-C, which Typer turns into
    exit code 130, still says what happened.
    """
    try:  # typer >= 0.2x ships its own copy of click
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import exceptions as click_exc

    try:
        code = app(standalone_mode=False)
    except console.UserError as exc:
        print(console.error_line(exc), file=sys.stderr)
        sys.exit(1)
    except click_exc.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(0)
    except click_exc.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "sr-pipeline"
        print(f"{console.error_line(Exception(exc.format_message()))} (see: {where} --help)", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click_exc.ClickException as exc:
        print(console.error_line(Exception(exc.format_message())), file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        code = 130
    if code == 130:
        print("interrupted", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
