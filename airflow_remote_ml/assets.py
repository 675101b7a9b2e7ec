"""A step's outputs as Airflow Assets, and Assets as a step's inputs (docs/assets.md).

Airflow accepts an asset event only for an Asset that is in the task's ``outlets`` when the DAG is
parsed (the scheduler registers the DAG's assets from its serialized outlets; the execution API then
drops events for assets it does not know: ``TaskInstance.register_asset_changes_in_db`` looks them up
among the active ``AssetModel`` rows). An output's URI holds the run id, so it is known only when the
step ran: the Asset therefore has a stable identity, and each event carries the concrete artifact in
its ``extra``::

    Asset(name="<dag_id>.<task_id>.<output>", uri="x-remote-ml://<dag_id>/<task_id>/<output>",
          group="remote-ml")
    event.extra == {"uri": "/artifacts/.../model", "sha256": "...", "size": 1234, "kind": "file",
                    "metrics": {...}, "backend": "local", "job_id": "...", "url": None}

Why not a URI under the artifact root: an Asset is identified by its name *and* URI, so moving the
artifact root (a laptop path to ``s3://``) would make a new Asset and cut every consumer scheduled on
the old one off; reading the root at parse time would also tie the DAG's shape to each process's
configuration; and such a URI would look like a readable location while no file lives there. The
``x-`` prefix is Airflow's convention for a scheme it must leave alone (``_sanitize_uri`` skips
normalizing it). An author who wants another identity passes their own ``Asset`` per output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_remote_ml.core.errors import ArtifactError, ConfigError
from airflow_remote_ml.core.validation import short_repr, type_name

if TYPE_CHECKING:
    from airflow.sdk import Asset

    from airflow_remote_ml.core.status import StepResult

#: Scheme of the Assets this provider names itself (see the module docstring).
ASSET_SCHEME = "x-remote-ml"
#: Group of those Assets in Airflow's Assets view.
ASSET_GROUP = "remote-ml"

_ASSETS_EXAMPLE = "assets=True (every output), assets=['model'] or assets={'model': Asset('churn-model')}"


def step_asset(dag_id: str, task_id: str, output: str) -> Asset:
    """The Asset of ``output`` of task ``task_id`` in DAG ``dag_id`` (stable across runs and deployments)."""
    from airflow.sdk import Asset

    return Asset(name=f"{dag_id}.{task_id}.{output}", uri=f"{ASSET_SCHEME}://{dag_id}/{task_id}/{output}",
                 group=ASSET_GROUP)


def output_assets(assets: Any, outputs: Any, dag_id: str | None, task_id: str) -> dict[str, Asset]:
    """``{output: Asset}`` for the operator's ``assets`` argument; a ConfigError for anything else.

    ``assets`` is ``True`` (every output), a list of output names, or ``{output: Asset}``. The Assets must
    exist when the DAG is parsed, so ``outputs`` must be final then (not a template).
    """
    from airflow.sdk import Asset

    if assets is None or assets is False:
        return {}
    if isinstance(outputs, str) or not isinstance(outputs, (list, tuple)) \
            or not all(isinstance(name, str) for name in outputs):
        raise ConfigError("assets", "needs the outputs listed when the DAG is parsed (outputs is "
                          f"{short_repr(outputs)})", "list the outputs literally, e.g. outputs=['model']")
    if assets is True:
        chosen: dict[str, Asset | None] = dict.fromkeys(outputs)
    elif isinstance(assets, Mapping):
        chosen = {}
        for name, asset in assets.items():
            if not isinstance(asset, Asset):
                raise ConfigError(f"assets.{name}", f"expected an Asset, got {type_name(asset)} {short_repr(asset)}",
                                  "pass airflow.sdk.Asset(...) objects, or a list of output names for the defaults")
            chosen[name] = asset
    elif isinstance(assets, Sequence) and not isinstance(assets, str):
        chosen = {}
        for name in assets:
            if not isinstance(name, str):
                raise ConfigError("assets", f"expected output names, got {type_name(name)} {short_repr(name)}",
                                  _ASSETS_EXAMPLE)
            chosen[name] = None
    else:
        raise ConfigError("assets", f"expected True, a list of output names or a mapping, got "
                          f"{type_name(assets)} {short_repr(assets)}", _ASSETS_EXAMPLE)
    unknown = [name for name in chosen if name not in outputs]
    if unknown:
        raise ConfigError(f"assets.{unknown[0]}", f"is not a declared output (outputs: {', '.join(outputs) or 'none'})",
                          "declare it in outputs, or remove it from assets")
    if any(asset is None for asset in chosen.values()) and not dag_id:
        raise ConfigError("assets", "default Assets are named after the task's DAG, and this task has none",
                          "create the operator inside `with DAG(...)`, or pass an Asset per output")
    return {name: asset if asset is not None else step_asset(str(dag_id), task_id, name)
            for name, asset in chosen.items()}


def asset_inputs(inputs: Any) -> dict[str, Asset]:
    """The inputs given as Assets (each becomes an inlet; its newest event's artifact is the input)."""
    from airflow.sdk import Asset

    if not isinstance(inputs, Mapping):
        return {}
    return {name: value for name, value in inputs.items() if isinstance(value, Asset)}


def event_extra(result: StepResult, output: str) -> dict[str, Any]:
    """What an output's asset event carries: the concrete artifact, its checksum and where it came from."""
    meta = dict((result.manifest.get("outputs") or {}).get(output) or {})
    return {
        "uri": result.outputs[output],
        "sha256": meta.get("sha256"),
        "size": meta.get("size"),
        "kind": meta.get("kind"),
        "metrics": dict(result.metrics),
        "backend": result.backend,
        "job_id": result.job_id,
        "url": result.url,
    }


def input_uri(name: str, asset: Asset, context: Mapping[str, Any]) -> str:
    """The artifact an Asset input stands for: the event that triggered this run, else the newest one.

    An Asset of another producer (no ``uri`` in its events' extra) stands for its own URI, unless it is one
    of this provider's ``x-remote-ml://`` names, which point at nothing readable.
    """
    triggering = context.get("triggering_asset_events")
    triggered_by = list(triggering.get(asset) or []) if triggering else []
    event = triggered_by[-1] if triggered_by else None
    if event is None:
        events = context["inlet_events"][asset]
        event = events[-1] if len(events) else None
    uri = (getattr(event, "extra", None) or {}).get("uri") if event is not None else None
    if isinstance(uri, str) and uri:
        return uri
    if not asset.uri.startswith(f"{ASSET_SCHEME}://"):
        return asset.uri
    if event is None:
        raise ArtifactError(f"inputs.{name}: Asset {asset.name!r} has no event yet, so there is no artifact to read; "
                            "run the DAG that produces it first (or schedule this DAG on the Asset)")
    raise ArtifactError(f"inputs.{name}: the newest event of Asset {asset.name!r} has no 'uri' in its extra; "
                        "it was not emitted by an airflow-remote-ml step")
