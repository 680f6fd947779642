"""``fedbus config validate`` checks an experiment before anyone runs it; ``config new`` writes one.

Shows the layers with their output shapes, the parameter count and the training and
federation settings, or the JSON path of the first problem (exit 2). Human output
goes to stderr; ``--json`` prints one JSON document on stdout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from protocol.config import ConfigError, Experiment, load_experiment

if TYPE_CHECKING:
    from protocol.model import ModelSummary

app = typer.Typer(help="Experiment configuration.", no_args_is_help=True)


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _print_human(console: Console, experiment: Experiment, summary: ModelSummary, source: Path) -> None:
    table = Table(title=f"{experiment.name} ({source})", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("layer")
    table.add_column("type")
    table.add_column("output shape")
    table.add_column("parameters", justify="right")
    for row in summary.layers:
        table.add_row(
            str(row["index"]), row["name"] or "", row["type"], _shape(row["output_shape"]), f"{row['parameters']:,}"
        )
    console.print(table)
    console.print(
        f"parameters: {summary.parameters:,}  input {_shape(summary.input_shape)} -> output {_shape(summary.output_shape)}"
    )
    training = experiment.training
    opt = training.optimizer
    console.print(
        f"training:   {opt.type} lr={opt.learning_rate:g} weight_decay={opt.weight_decay:g}  "
        f"loss={training.loss_function}  epochs={training.epochs} batch_size={training.batch_size} "
        f"rounds={training.rounds} seed={training.seed}"
    )
    dp = training.dp
    sa = experiment.federated.secure_aggregation
    if dp is None and sa is not None and sa.dp == "pooled":
        from protocol.secagg import skellam
        from protocol.secagg.rules import pooled_mu

        mu = pooled_mu(experiment)
        sigma = skellam.gaussian_equivalent(mu, skellam.sensitivities(sa.clip, sa.scale, summary.trainable)[1])
        console.print(f"privacy:    pooled DP under secure aggregation: one DP-SGD step a round per site, Skellam "
                      f"noise mu={mu:.4g} in every sum (Gaussian-equivalent noise_multiplier={sigma:.4g}), "
                      f"clip={sa.clip:g} scale={sa.scale:g} sample_rate={sa.sample_rate:g} delta={sa.delta:g} "
                      f"accountant={skellam.ACCOUNTANT}")
    elif dp is None and sa is not None and sa.dp == "central":
        from protocol.secagg import skellam
        from protocol.secagg.rules import central_dim, pooled_mu

        mu = pooled_mu(experiment)
        sigma = skellam.gaussian_equivalent(mu, skellam.sensitivities(sa.clip, sa.scale, central_dim(experiment))[1])
        sampling = ("no site sampling (FedBuff: each masked update charged un-subsampled, q=1)"
                    if experiment.federated.name == "FedBuff" else
                    f"site sampling fraction_fit={experiment.federated.fraction_fit:g}")
        console.print(f"privacy:    user-level (central) DP under secure aggregation: each sampled site clips its "
                      f"update, Skellam noise mu={mu:.4g} in every sum (Gaussian-equivalent noise_multiplier="
                      f"{sigma:.4g}), clip={sa.clip:g} scale={sa.scale:g} {sampling} delta={sa.delta:g} "
                      f"accountant={skellam.ACCOUNTANT}")
    elif dp is None:
        console.print("privacy:    DP off")
    elif dp.noise_multiplier is not None:
        console.print(
            f"privacy:    DP-SGD noise_multiplier={dp.noise_multiplier:g} max_grad_norm={dp.max_grad_norm:g} "
            f"delta={dp.delta:g} accountant={dp.accountant}"
        )
    elif dp.total_epsilon is not None:
        console.print(
            f"privacy:    DP-SGD total_epsilon={dp.total_epsilon:g} for the whole run per site "
            f"(each site derives its noise from its rows) max_grad_norm={dp.max_grad_norm:g} "
            f"delta={dp.delta:g} accountant={dp.accountant}"
        )
    else:
        console.print(
            f"privacy:    DP-SGD target_epsilon={dp.target_epsilon:g} max_grad_norm={dp.max_grad_norm:g} "
            f"delta={dp.delta:g} accountant={dp.accountant}"
        )
    fed = experiment.federated
    extras = {k: v for k, v in fed.parameters.items() if k not in _SAMPLING}
    console.print(
        f"federated:  {fed.name} fraction_fit={fed.fraction_fit:g} fraction_eval={fed.fraction_eval:g} "
        f"min_fit_clients={fed.min_fit_clients} min_eval_clients={fed.min_eval_clients} "
        f"min_available_clients={fed.min_available_clients} round_timeout_s={fed.round_timeout_s:g}"
        + (f" {json.dumps(extras)}" if extras else "")
    )
    if fed.early_stopping is not None:
        console.print(
            f"            early stopping patience={fed.early_stopping.patience} "
            f"min_delta={fed.early_stopping.min_delta:g}"
        )
    if fed.central_dp is not None:
        console.print(
            f"            central DP clip_norm={fed.central_dp.clip_norm:g} "
            f"noise_multiplier={fed.central_dp.noise_multiplier:g}"
        )
    data = experiment.dataset
    line = f"dataset:    {data.name} ({data.kind}) target={data.target} task={data.task}"
    if data.task != "regression":
        line += f" num_classes={data.num_classes}"
    if data.positive_if:
        line += f" positive_if={data.positive_if}"
    if data.features is not None:
        line += f" features={len(data.features)} (one-hot width {data.input_width()})"
    console.print(line)
    if experiment.not_used:
        console.print("not used by fedbus (MediNet's own fields, kept as given): " + ", ".join(experiment.not_used))
    console.print("[green]valid[/green]")


_SAMPLING = ("fraction_fit", "fraction_eval", "min_fit_clients", "min_eval_clients", "min_available_clients")


@app.command()
def validate(
    experiment_file: Annotated[Path, typer.Argument(metavar="EXPERIMENT.json", help="Experiment JSON file.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    catalogue: Annotated[Path | None, typer.Option(
        "--catalogue", help='JSON {"site-id": rows, ...} (or {"site-id": {"rows": N}}): show the privacy plan '
                            'each site derives from a total_epsilon budget.')] = None,
) -> None:
    """Validate an experiment: layers, output shapes, parameter count, settings."""
    from fedbus.experiment_check import check_experiment, error_doc, report

    console = Console(stderr=True, soft_wrap=True)
    try:
        experiment, summary = check_experiment(experiment_file)
    except ConfigError as exc:
        if json_out:
            typer.echo(json.dumps(error_doc(exc)))
        console.print(f"[red]invalid experiment[/red] {experiment_file}: {escape(str(exc))}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    plan = _privacy_plan(experiment, catalogue, console, json_out) if catalogue is not None else None
    if json_out:
        typer.echo(json.dumps({**report(experiment, summary), **({"privacy_plan": plan} if plan else {})}))
    else:
        _print_human(console, experiment, summary, experiment_file)
        if plan:
            from simulator.privacy import describe_plan

            console.print("\n".join(describe_plan(plan)), highlight=False)


def _privacy_plan(experiment: Experiment, path: Path, console: Console, json_out: bool) -> dict[str, Any] | None:
    """Per site: ε at the end of the run from its announced rows (``protocol.privacy_plan``), in
    every DP mode (total_epsilon, noise_multiplier, target_epsilon per task), for the site defaults."""
    def fail(message: str) -> None:
        if json_out:
            typer.echo(json.dumps({"valid": False, "error": {"path": "--catalogue", "message": message}}))
        console.print(f"[red]--catalogue[/red] {path}: {escape(str(message))}", highlight=False)
        raise typer.Exit(2)

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        fail(f"cannot read it as JSON: {e}")
    if not isinstance(raw, dict) or not raw:
        fail('must be a JSON object {"site-id": rows, ...}')
    rows: dict[str, int] = {}
    for site, v in raw.items():
        n = v.get("rows") if isinstance(v, dict) else v
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            fail(f"{site}: rows must be an integer >= 2, got {n!r}")
        rows[str(site)] = n
    if experiment.training.dp is None:
        console.print("privacy plan: DP is off in this experiment; nothing to plan (ε = ∞)", highlight=False)
        return None
    from fedbus.experiment_check import privacy_plan as plan

    return plan(experiment, rows)


@app.command("new")
def new(
    out: Annotated[Path, typer.Option("--out", help="Experiment JSON to write.")],
    dataset: Annotated[str, typer.Option("--dataset", help="A CSV/Parquet file, or with --from-site the dataset name in the site catalogue.")],
    target: Annotated[Optional[str], typer.Option("--target", help="Target column (default: the site's, with --from-site).")] = None,
    from_site: Annotated[Optional[str], typer.Option("--from-site", help="Build from what SITE's hello announced (metadata only); needs --state.")] = None,
    state: Annotated[Optional[Path], typer.Option("--state", help="Coordinator state directory (with --from-site).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Column to leave out (repeat).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="basic_info.name [the dataset's name].")] = None,
    dataset_name: Annotated[Optional[str], typer.Option("--dataset-name", help="The name sites offer the data under ([datasets.NAME] in site.toml) [the file's name].")] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="training.rounds.")] = 10,
    keep: Annotated[Optional[list[str]], typer.Option("--keep", help="Keep a column flagged as an outcome leak (repeat).")] = None,
    epsilon: Annotated[float, typer.Option("--epsilon", min=0.01, max=100.0, help="Whole-run ε per site (total_epsilon).")] = 8.0,
    rows_per_site: Annotated[Optional[int], typer.Option("--rows-per-site", min=2, help="Size the model for this many rows per site [the file's rows].")] = None,
    secure: Annotated[Optional[int], typer.Option("--secure-aggregation", min=2, metavar="K",
                                                  help="Run under secure aggregation: the coordinator sees only sums of "
                                                       "at least K sites' updates, and the final test's union figures "
                                                       "come from one sum (noise once).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out.")] = False,
) -> None:
    """Write an experiment from a dataset's columns, leaving out columns that leak the outcome,
    with a model sized to the rows per site and the whole-run ε (logistic regression for small sites)."""
    from fedbus.config_new import experiment_from_catalogue, experiment_from_file

    if out.exists() and not force:
        _fail(f"{out} exists; pass --force to overwrite it")
    try:
        if from_site is not None:
            if state is None:
                _fail("--from-site needs --state (the coordinator's state directory, where site hellos are kept)")
            doc, notes = experiment_from_catalogue(state, from_site, dataset, target=target, exclude=exclude or [], name=name,
                                                     rounds=rounds, epsilon=epsilon, rows_per_site=rows_per_site)
        else:
            if target is None:
                _fail("--target COLUMN is required with a --dataset file")
            doc, notes = experiment_from_file(Path(dataset), target=target, exclude=exclude or [], name=name, rounds=rounds,
                                              dataset_name=dataset_name, keep=keep, epsilon=epsilon,
                                              rows_per_site=rows_per_site)
    except ValueError as e:
        _fail(str(e))
    if secure is not None:
        notes.append(secure_aggregation(doc, secure))
    try:
        exp = load_experiment(doc)
    except ConfigError as e:  # a bug in the template, never the user's fault
        _fail(f"internal: the generated experiment does not validate: {e}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    ds = exp.dataset
    linear = [layer for layer in exp.architecture.layers if layer.type == "Linear"]
    model = "logistic regression" if len(linear) == 1 else "MLP " + "-".join(str(lay.params["out_features"]) for lay in linear)
    typer.echo(f"wrote {out}: {len(ds.features or [])} features ({len(ds.categorical)} categorical) -> input "
               f"{exp.input_shape[0]}, target {ds.target!r} ({ds.task}), {model}, "
               f"DP-SGD within a whole-run epsilon {epsilon:g} per site, clip 1.0, delta 1e-5", err=True)
    for n in notes:
        typer.echo(f"note: {n}", err=True)
    typer.echo(f"next: fedbus config validate {out}", err=True)


def secure_aggregation(doc: dict[str, Any], k: int) -> str:
    """Put ``doc`` under secure aggregation for K sites: every sum holds at least K updates, K − 1
    surviving sites unmask it (one may drop after uploading), and each round waits for K sites."""
    fed = doc["federated"]
    fed["secure_aggregation"] = {"min_contributors": k, "threshold": k - 1}
    fed["parameters"].update(min_fit_clients=k, min_eval_clients=k, min_available_clients=k)
    return (f"secure aggregation: the coordinator sees only sums of at least {k} sites' updates ({k - 1} surviving "
            f"sites unmask one); the final test's union figures come from one sum, with its noise added once")


def _fail(message: str) -> None:
    typer.echo(f"fedbus config: {message}", err=True)
    raise typer.Exit(2)
