"""The model registry: a trained model logged to its trial run and registered as ``models:/<name>@<alias>``, loaded
back onto the CPU, and a registered version looked up.

Models are pickled ``nn.Module`` objects (cloudpickle), not MLflow 3's default ``pt2`` graph: a capsule network's
class must be importable (``drcapsnet``) where it is loaded. Registry URIs are resolved with the given tracking URI;
the one place MLflow's process-global tracking URI is set (``log_model`` reads only that) puts it back after.
"""

from __future__ import annotations

import json
import re
import tempfile
from typing import TYPE_CHECKING

from drcapsnet.errors import TrackingError
from search.tracking.client import mlflow_client, quiet_mlflow

if TYPE_CHECKING:
    import torch


def log_and_register_model(uri: str, run_id: str, model: torch.nn.Module, input_example: torch.Tensor, *,
                           registered_name: str, alias: str = "best", description: str = "") -> str:
    """Log ``model`` to run ``run_id`` as a pickled ``nn.Module`` (cloudpickle; its class must be importable where
    it is loaded, e.g. ``drcapsnet``), register it as a new version of ``registered_name``, point ``alias`` at it.

    ``model(x)`` must return ONE tensor, e.g. ``CapsNetClassifier``: ``x (B, C, H, W) -> lengths (B, K)``; wrap
    a model whose forward returns a tuple or dict. ``input_example``: a few real-shaped samples (stored in the
    model, and the signature is inferred from it). Returns ``models:/<name>@<alias>``.
    """
    import copy

    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    model = copy.deepcopy(model).cpu().eval()          # don't move or mutate the caller's model
    x = input_example.detach().cpu()
    with torch.no_grad():
        y = model(x)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"log_and_register_model: model(x) must return one tensor (e.g. class-capsule lengths "
                        f"(B, num_classes)), got {type(y).__name__}; wrap the model")
    client = mlflow_client(uri)
    run = client.get_run(run_id)
    # Pre-create the LoggedModel: left to log_model it would land in the global/default experiment, not the run's.
    logged = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id)
    # log_model, and the SQL registry store when it resolves a "models:/<id>" source, read only the process-global
    # tracking URI (else ./mlflow.db in the cwd): set it for this block, then restore it. Not thread-safe.
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        # We pickle on purpose (see above); MLflow warns about it on every call, which a user can do nothing about.
        with quiet_mlflow():
            info = mlflow.pytorch.log_model(
                model, name="model", run_id=run_id, model_id=logged.model_id,
                serialization_format="pickle",             # the 3.x default is "pt2" (torch.export graph module)
                signature=infer_signature(x.numpy(), y.numpy()), input_example=x.numpy(),
                pip_requirements=mlflow.pytorch.get_default_pip_requirements())   # skips an inference subprocess
        try:
            client.create_registered_model(registered_name)
        except MlflowException as e:
            if "already exists" not in str(e).lower():
                raise
        version = client.create_model_version(registered_name, source=info.model_uri, run_id=run_id,
                                              model_id=info.model_id)
    finally:
        mlflow.set_tracking_uri(previous)              # None unsets it (and MLFLOW_TRACKING_URI) again
    # Link the logged model to its version as log_model(registered_model_name=...) does (the logged model's
    # "Registered versions" in the UI), so its page does not offer to register it again.
    client.set_logged_model_tags(info.model_id, {"mlflow.modelVersions": json.dumps(
        [{"name": registered_name, "version": version.version}])})
    if description:
        client.update_model_version(registered_name, version.version, description=description)
    client.set_registered_model_alias(registered_name, alias, version.version)
    return f"models:/{registered_name}@{alias}"


def load_model(uri: str, model_uri: str) -> torch.nn.Module:
    """Load a logged PyTorch model onto the CPU from ``models:/<name>@<alias>``, ``models:/<name>/<version>``,
    ``runs:/...`` or a local path. Registry URIs are resolved with this ``uri`` explicitly: mlflow 3.17.2's
    ``models:/`` download path reads the process-global registry URI even when given one."""
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    client = mlflow_client(uri)
    source = model_uri
    try:
        if m := re.fullmatch(r"models:/([^/@]+)@([^/]+)", model_uri):
            version = client.get_model_version_by_alias(m[1], m[2]).version
            source = client.get_model_version_download_uri(m[1], version)
        elif m := re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri):
            source = client.get_model_version_download_uri(m[1], m[2])
    except MlflowException as e:
        raise TrackingError(f"--model-uri: {model_uri} is not in the registry at {uri} ({e.message}); "
                            "list models in 'drcaps ui', or pass the --tracking-uri the search used") from None
    with tempfile.TemporaryDirectory(prefix="drcaps-model-") as tmp:
        with quiet_mlflow():
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri)
            except (MlflowException, OSError) as e:          # no such run, model, version or artifact
                text = e.message if isinstance(e, MlflowException) else str(e)
                reason = ([line.strip() for line in str(text).splitlines() if line.strip()] or [type(e).__name__])[-1]
                raise TrackingError(f"--model-uri: cannot load {model_uri} from {uri} ({reason}); pass e.g. "
                                    "models:/<name>@best, models:/<name>/<version> or runs:/<run id>/model") from None
            return mlflow.pytorch.load_model(local, map_location="cpu")


def model_version(uri: str, name: str, alias: str) -> dict[str, str]:
    """The registered version ``name@alias``: its version, run id, source URI and logged model id (if any)."""
    from mlflow.exceptions import MlflowException

    try:
        v = mlflow_client(uri).get_model_version_by_alias(name, alias)
    except MlflowException as e:
        raise TrackingError(f"no model version {name}@{alias} at {uri}: {e.message}") from e
    model_id = v.model_id or (v.source.removeprefix("models:/") if v.source.startswith("models:/m-") else "")
    return {"version": str(v.version), "run_id": v.run_id or "", "source": v.source, "model_id": model_id or ""}


def set_model_alias(uri: str, name: str, alias: str, version: str | None) -> None:
    """Point ``name@alias`` at ``version``; ``None`` removes the alias (nothing happens when it is not set)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(uri)
    if version is not None:
        client.set_registered_model_alias(name, alias, version)
        return
    try:
        client.delete_registered_model_alias(name, alias)
    except MlflowException:
        pass


def model_aliases(uri: str, name: str) -> dict[str, str]:
    """Every alias of registered model ``name`` -> its version; ``{}`` when there is no such model."""
    from mlflow.exceptions import MlflowException

    try:
        return {a: str(v) for a, v in mlflow_client(uri).get_registered_model(name).aliases.items()}
    except MlflowException:
        return {}


def run_version(uri: str, name: str, run_id: str) -> str | None:
    """The newest version of registered model ``name`` made from run ``run_id``; None when it has none (or there is
    no such model): a search published again (``--extend``) points its aliases at it instead of adding a version."""
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow_client(uri).search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return str(max(int(v.version) for v in found)) if found else None
