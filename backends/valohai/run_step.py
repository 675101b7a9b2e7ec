"""Run one function of the example pipeline as a Valohai step (see valohai.yaml next to this file).

    python3 backends/valohai/run_step.py example_ml.steps:train --outputs model

Valohai hands a step its parameters in ``$VH_CONFIG_DIR/parameters.json``, downloads each input into
``$VH_INPUTS_DIR/<input>/`` and stores every file written under ``$VH_OUTPUTS_DIR`` as an output datum.
This script maps those onto the conventions of the pipeline's functions:

* keyword arguments: the parameters (text that holds a JSON list or object is decoded, because Valohai
  parameters are strings, numbers or flags and the backend sends structures as JSON);
* ``inputs[name]``: the one file of ``$VH_INPUTS_DIR/<name>/``, or that directory when it holds several
  (an upstream directory output arrives as several datums);
* ``outputs[name]``: ``$VH_OUTPUTS_DIR/<name>`` for each name given with ``--outputs`` (a file, or a
  directory whose files become datums named ``<name>/<file>``);
* a returned mapping is printed as one JSON line, which Valohai records as the execution's metadata.

Standard library only; the function's own imports (scikit-learn) must be in the image.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(os.path.dirname(HERE))


def _parameters(config_dir: str) -> dict[str, Any]:
    path = os.path.join(config_dir, "parameters.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        values = json.load(fh)
    decoded = {}
    for name, value in values.items():
        if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
            try:
                value = json.loads(value)
            except ValueError:
                pass  # text that merely starts with a bracket stays text
        decoded[name] = value
    return decoded


def _inputs(inputs_dir: str) -> dict[str, str]:
    found = {}
    if not os.path.isdir(inputs_dir):
        return found
    for name in sorted(os.listdir(inputs_dir)):
        folder = os.path.join(inputs_dir, name)
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names)
        found[name] = files[0] if len(files) == 1 else folder
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("callable", help="package.module:function")
    parser.add_argument("--outputs", nargs="*", default=[], help="output names the function writes")
    args = parser.parse_args(argv)

    for entry in (os.path.join(REPOSITORY, "dags"), REPOSITORY):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    module_name, _, attr = args.callable.partition(":")
    function = getattr(importlib.import_module(module_name), attr)

    params = _parameters(os.environ.get("VH_CONFIG_DIR", "/valohai/config"))
    inputs = _inputs(os.environ.get("VH_INPUTS_DIR", "/valohai/inputs"))
    outputs_dir = os.environ.get("VH_OUTPUTS_DIR", "/valohai/outputs")
    outputs = {name: os.path.join(outputs_dir, name) for name in args.outputs}

    accepted = inspect.signature(function).parameters
    kwargs: dict[str, Any] = {k: v for k, v in params.items() if k in accepted}
    ignored = sorted(set(params) - set(kwargs))
    if ignored:
        print(f"run_step: {args.callable} takes no parameter(s) {', '.join(ignored)}; ignored",
              file=sys.stderr)
    if "inputs" in accepted:
        kwargs["inputs"] = inputs
    if "outputs" in accepted:
        kwargs["outputs"] = outputs
    result = function(**kwargs)
    if isinstance(result, dict):
        print(json.dumps(result, default=str), flush=True)
    missing = [name for name, path in outputs.items() if not os.path.exists(path)]
    if missing:
        print(f"run_step: declared output(s) {', '.join(missing)} not written", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
