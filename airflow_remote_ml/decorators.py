"""``@task.remote_ml``: a Python function that runs as a remote step (docs/taskflow.md).

Registered as the provider's ``task-decorators`` entry (get_provider_info.py), the way
``@task.docker`` and ``@task.kubernetes`` are. The decorator takes the operator's arguments (backend,
image, compute, outputs, assets, ...); calling the function in a DAG takes the step's parameters::

    @task.remote_ml(backend="{{ params.backend }}", outputs=["model"], compute={"cpu": 2})
    def train(alpha: float, inputs: dict, outputs: dict) -> dict:
        ...
        return {"rmse": rmse}

    trained = train(alpha=0.5, inputs={"dataset": prepared["outputs"]["dataset"]})

Unlike ``@task.docker`` (which pickles the arguments and ships the function's *source*), the step
calls the function **by reference**, ``module:function``, with its arguments as JSON parameters: the
same code path as ``RemoteExecutionOperator(callable=...)``, so the version record names the code that
ran and the function keeps its imports, helpers and globals. A function the step cannot import by name
(defined in ``__main__`` -- a notebook or a script run directly --, nested in another function, or a
lambda) is refused with a ConfigError when the DAG is parsed; source is never serialized as a fallback,
because a function torn from its module fails only later, in the step, on the first global it needs.

``inputs`` and ``outputs`` are the runtime's: a function that declares them receives the local paths
of the step's inputs and outputs, and a call may pass ``inputs={name: uri}`` (URIs, XComArgs or Assets),
merged with the decorator's. The function's return value (JSON, at most
:data:`~airflow_remote_ml.runtime.RETURN_VALUE_LIMIT` bytes) is the ``result`` of the task's XCom;
a returned dict also counts as metrics, as for ``callable=`` steps.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attr
from airflow.sdk.bases.decorator import DecoratedOperator, _TaskDecorator, get_unique_task_id
from airflow.sdk.definitions._internal.contextmanager import DagContext, TaskGroupContext
from airflow.sdk.definitions.context import KNOWN_CONTEXT_KEYS
from airflow.sdk.definitions.xcom_arg import PlainXComArg

from airflow_remote_ml.core.errors import ArtifactError, ConfigError
from airflow_remote_ml.core.validation import check_json, short_repr
from airflow_remote_ml.operators import RemoteExecutionOperator, _is_templated, _plain, _with_asset_outlets, final
from airflow_remote_ml.results import StepResultArg

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.bases.decorator import TaskDecorator

    from airflow_remote_ml.core.status import StepResult

#: Parameters the runtime fills in (local paths of the step's inputs and outputs), never the caller.
RUNTIME_PARAMETERS = ("inputs", "outputs")
#: Operator arguments the decorator sets itself from the function and its call.
_DERIVED_ARGUMENTS = ("callable", "command", "shell", "parameters")
#: Prefix of the module names Airflow gives DAG files (airflow.utils.file.get_unique_dag_module_name).
_DAG_MODULE_PREFIX = "unusual_prefix_"
_JSON_FIX = "pass JSON values (str, number, bool, None, lists and dicts of them); pass data as an input URI"


def function_reference(function: Callable[..., Any]) -> str:
    """``module:qualname`` by which the step imports ``function``, or a ConfigError saying why it cannot.

    A function in a DAG file lives in a module Airflow named ``unusual_prefix_<sha1>_<file>``, which no
    other process can import: its importable name comes from the file's place under ``sys.path`` (the
    DAGs folder is on it in every Airflow process, and the local backend hands ``sys.path`` to its
    steps). When the module's attribute is the decorated task, the reference goes through its
    ``.function``.
    """
    name = getattr(function, "__name__", type(function).__name__)
    field = f"@task.remote_ml {name}"
    if not inspect.isfunction(function):
        raise ConfigError(field, f"is a {type(function).__name__}, not a function",
                          "decorate a function defined with def at the top level of a module")
    qualname = function.__qualname__
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise ConfigError(field, f"is defined inside another function ({qualname}); the step imports its function "
                          "by name (module:function) and cannot reach a nested one or a lambda",
                          "define it at the top level of a module")
    module = sys.modules.get(function.__module__)
    if function.__module__ == "__main__" or module is None:
        raise ConfigError(field, f"is defined in {function.__module__!r} (a notebook or a script run directly), "
                          "which the step cannot import",
                          "move it to a module importable where the step runs (e.g. steps.py beside the DAG) and "
                          "import it from there; `task.remote_ml(...)(steps.train)` decorates an imported function")
    importable = _importable_module_name(module)
    if importable is None:
        raise ConfigError(field, f"is defined in {getattr(module, '__file__', None) or module.__name__}, which is not "
                          "under any sys.path entry, so the step cannot import it",
                          "put the file in the DAGs folder or in a package on sys.path")
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
    if target is function:
        return f"{importable}:{qualname}"
    if getattr(target, "function", None) is function:  # the module's name holds the @task.remote_ml task
        return f"{importable}:{qualname}.function"
    raise ConfigError(field, f"{importable}.{qualname} is not this function (is the name bound to something else?)",
                      "give the function a module-level name of its own")


def _importable_module_name(module: Any) -> str | None:
    name = module.__name__
    if not name.startswith(_DAG_MODULE_PREFIX):
        return name
    path = getattr(module, "__file__", None)
    if not path:
        return None
    path = os.path.realpath(path)
    candidates = []
    for entry in sys.path:
        root = os.path.realpath(entry or os.getcwd())
        if not path.startswith(root + os.sep):
            continue
        parts = os.path.splitext(os.path.relpath(path, root))[0].split(os.sep)
        if parts and parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and all(part.isidentifier() for part in parts):
            candidates.append(".".join(parts))
    # The shortest name is the one the DAGs folder gives (a parent directory on sys.path gives dags.x).
    for candidate in sorted(candidates, key=lambda c: c.count(".")):
        spec = importlib.util.find_spec(candidate) if candidate not in sys.modules else sys.modules[candidate].__spec__
        if spec is not None and spec.origin and os.path.realpath(spec.origin) == path:
            return candidate
    return None


def _parameter_signature(function: Callable[..., Any]) -> inspect.Signature:
    """The function's signature as a caller sees it: without the parameters the runtime fills in."""
    signature = inspect.signature(function)
    field = f"@task.remote_ml {function.__name__}"
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            raise ConfigError(f"{field}(*{parameter.name})", "the step calls its function with keyword arguments "
                              "(JSON parameters), so *args would always be empty", "use named parameters")
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise ConfigError(f"{field}({parameter.name})", "is positional-only; the step passes every parameter by "
                              "name", "remove the '/' from the signature")
    return signature.replace(parameters=[p for p in signature.parameters.values() if p.name not in RUNTIME_PARAMETERS])


def _validation_stand_in(function: Callable[..., Any], signature: inspect.Signature) -> Callable[..., Any]:
    """A callable with ``signature`` for DecoratedOperator's parse-time check of the call's arguments.

    DecoratedOperator binds the call against the function's own signature, which would demand ``inputs``
    and ``outputs``: the runtime passes those, never the caller.
    """
    def stand_in(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    stand_in.__name__ = function.__name__
    stand_in.__qualname__ = function.__qualname__
    stand_in.__module__ = function.__module__
    stand_in.__doc__ = function.__doc__
    stand_in.__signature__ = signature  # type: ignore[attr-defined]
    return stand_in


class RemoteMLDecoratedOperator(DecoratedOperator, RemoteExecutionOperator):
    """The operator behind ``@task.remote_ml``: a RemoteExecutionOperator whose step calls the function.

    Args:
        python_callable: the decorated function (run by reference, see :func:`function_reference`).
        op_args: the call's positional arguments (step parameters, by the function's parameter names).
        op_kwargs: the call's keyword arguments; ``inputs`` among them are step inputs, the rest parameters.
        multiple_outputs: must stay False: the task's XCom is the step's result (``result`` holds the return).
        **kwargs: RemoteExecutionOperator's arguments, except ``callable``/``command``/``shell``/``parameters``.
    """

    custom_operator_name = "@task.remote_ml"
    template_fields: Sequence[str] = (*RemoteExecutionOperator.template_fields, "op_args", "op_kwargs")
    template_fields_renderers = {**RemoteExecutionOperator.template_fields_renderers, "op_args": "json",
                                 "op_kwargs": "json"}
    shallow_copy_attrs: Sequence[str] = ("python_callable",)

    def __init__(self, *, python_callable: Callable[..., Any], op_args: Collection[Any] | None = None,
                 op_kwargs: Mapping[str, Any] | None = None, multiple_outputs: bool = False, **kwargs: Any) -> None:
        try:
            for name in _DERIVED_ARGUMENTS:
                if name in kwargs:
                    raise ConfigError(f"@task.remote_ml({name}=...)", "is set by the decorator: the step calls the "
                                      "decorated function with the call's arguments as its parameters",
                                      "use RemoteExecutionOperator for a command or a callable by name")
            if multiple_outputs:
                raise ConfigError("@task.remote_ml(multiple_outputs=True)", "the task's XCom is the step's result "
                                  "(outputs, metrics, result, ...), not the function's dict",
                                  "read the return value as task_output['result'][key]")
            reference = function_reference(python_callable)
            signature = _parameter_signature(python_callable)
            op_kwargs = dict(op_kwargs or {})
            if "outputs" in op_kwargs:
                raise ConfigError(f"{python_callable.__name__}(outputs=...)", "outputs are named on the decorator "
                                  "(the runtime gives the function their local paths)",
                                  "use @task.remote_ml(outputs=['model']) or .override(outputs=[...])")
            kwargs["inputs"] = _merged_inputs(kwargs.get("inputs"), op_kwargs.pop("inputs", None))
            _check_call_is_json(python_callable.__name__, signature, list(op_args or ()), op_kwargs)
        except ConfigError as exc:
            raise final(exc) from exc
        super().__init__(python_callable=_validation_stand_in(python_callable, signature), op_args=op_args,
                         op_kwargs=op_kwargs, multiple_outputs=False, callable=reference, **kwargs)
        self.python_callable = python_callable
        self._signature = signature

    # -- run time ----------------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        self._bind_call()
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        self._bind_call()  # a resumed task is a fresh operator: its spec needs the rendered call again
        return super().execute_complete(context, event)

    def _bind_call(self) -> None:
        """The rendered call (XComArgs resolved, templates rendered) as the step's parameters."""
        try:
            self.parameters = call_parameters(self.python_callable.__name__, self._signature, self.op_args,
                                              self.op_kwargs)
        except ConfigError as exc:
            raise final(exc) from exc

    def _on_result(self, result: StepResult, xcom: dict[str, Any]) -> None:
        error = result.manifest.get("return_value_error")
        if error:
            # The step ran, but its result cannot reach the next task: a bug in the function, not retryable.
            raise final(ArtifactError(f"{self.python_callable.__name__}: {error}"))
        xcom["result"] = result.manifest.get("return_value")
        super()._on_result(result, xcom)


def _merged_inputs(declared: Any, called: Any) -> Any:
    """The decorator's inputs with the call's; a name given twice is a ConfigError."""
    if called is None:
        return declared
    if not declared:
        # A mapping, or an XComArg of one (rendered with the other templated arguments), checked as inputs are.
        return called
    if not isinstance(called, Mapping) or not isinstance(declared, Mapping):
        raise ConfigError("inputs", f"the decorator's inputs and the call's ({short_repr(called)}) can only be merged "
                          "when both are mappings of names to URIs", "give the inputs in one place")
    twice = sorted(set(declared) & set(called))
    if twice:
        raise ConfigError(f"inputs.{twice[0]}", "is given both on the decorator and in the call", "give it once")
    return {**declared, **called}


def call_parameters(function_name: str, signature: inspect.Signature, args: Collection[Any],
                    kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The function's (rendered) call arguments as the step's JSON parameters, by parameter name.

    Arguments the call leaves out are left to the function's defaults in the step; ``**kwargs`` spread.
    """
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{function_name}()", str(exc), "call it with the function's parameters") from None
    parameters: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            parameters.update(value)
        else:
            parameters[name] = value
    _check_context_names(function_name, signature, bound.arguments)
    for name, value in parameters.items():
        check_json(f"{function_name}({name})", _plain(value), _JSON_FIX)
    return {name: _plain(value) for name, value in parameters.items()}


def _check_context_names(function_name: str, signature: inspect.Signature, given: Mapping[str, Any]) -> None:
    """A parameter named like an Airflow context variable must be passed: the step gets no Airflow context.

    ``@task`` fills ``ti``, ``run_id``, ``params``... in; a remote step cannot receive them (most are not JSON),
    so leaving one out would silently call the function with its default.
    """
    for name in signature.parameters:
        if name in KNOWN_CONTEXT_KEYS and name not in given:
            raise ConfigError(f"{function_name}({name})", "is an Airflow context variable, which a remote step does "
                              "not receive (the function runs where there is no Airflow context)",
                              f"pass it in the call, e.g. {function_name}({name}='{{{{ {name} }}}}') for a value a "
                              "template renders")


def _check_call_is_json(function_name: str, signature: inspect.Signature, args: Collection[Any],
                        kwargs: Mapping[str, Any]) -> None:
    """Check the call when the task is created: literal arguments are JSON (templated ones are checked once
    rendered) and every context-named parameter is given.

    A mapped task's operator is only created when it is unmapped, with the mapped arguments in ``kwargs``.
    """
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{function_name}()", str(exc), "call it with the function's parameters") from None
    _check_context_names(function_name, signature, bound.arguments)
    for name, value in bound.arguments.items():
        if not _is_templated(value):
            check_json(f"{function_name}({name})", _plain(value), _JSON_FIX)


@attr.define(slots=False)
class _RemoteMLTaskDecorator(_TaskDecorator):  # type: ignore[type-arg]
    """``@task.remote_ml``'s task factory: gives a mapped task the outlets of its Assets when the DAG is
    parsed (a mapped task's outlets come from its partial arguments, not from the operator's __init__)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The task's result is one ``return_value`` row; ``fit(...)["outputs"]["model"]`` reads into it the
        # way ``RemoteExecutionOperator.output[...]`` does (results.py), not a row per key.
        arg = super().__call__(*args, **kwargs)
        if type(arg) is PlainXComArg:
            return StepResultArg(operator=arg.operator, key=arg.key)
        return arg

    def _expand(self, expand_input: Any, *, strict: bool) -> Any:
        if not self.kwargs.get("assets"):
            return super()._expand(expand_input, strict=strict)
        dag = self.kwargs.get("dag") or DagContext.get_current()
        group = self.kwargs.get("task_group") or TaskGroupContext.get_current(dag)
        # The id _expand will give the task (get_unique_task_id), so the Assets are named after it.
        unique_id = get_unique_task_id(self.kwargs["task_id"], dag, group)
        evolved = attr.evolve(self, kwargs=_with_asset_outlets(self.kwargs, task_id=unique_id))
        return _TaskDecorator._expand(evolved, expand_input, strict=strict)


def remote_ml_task(python_callable: Callable[..., Any] | None = None, multiple_outputs: bool | None = None,
                   **kwargs: Any) -> TaskDecorator:
    """``@task.remote_ml``: run the decorated function as a remote step (see the module docstring).

    Args:
        python_callable: the function (when used as ``@task.remote_ml`` without parentheses).
        multiple_outputs: not supported (the XCom is the step's result); ``True`` is a ConfigError.
        **kwargs: RemoteExecutionOperator's arguments (backend, image, compute, outputs, inputs, timeout,
            backend_options, secrets, deferrable, assets, ...) and BaseOperator's (task_id, retries, ...).
    """
    if multiple_outputs:
        raise final(ConfigError("@task.remote_ml(multiple_outputs=True)", "the task's XCom is the step's result "
                                "(outputs, metrics, result, ...), not the function's dict",
                                "read the return value as task_output['result'][key]"))

    def decorate(function: Callable[..., Any]) -> Any:
        # multiple_outputs is fixed to False: Airflow would otherwise infer it from a ``-> dict`` annotation.
        return _RemoteMLTaskDecorator(function=function, multiple_outputs=False,
                                      operator_class=RemoteMLDecoratedOperator, kwargs=kwargs,
                                      decorator_name="task.remote_ml")

    if python_callable is not None:
        return decorate(python_callable)  # type: ignore[no-any-return]
    return decorate  # type: ignore[return-value]
