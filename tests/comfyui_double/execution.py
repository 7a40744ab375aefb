"""Prompt validation and execution of the ComfyUI test double, as ComfyUI's `execution.py` does them.

`validate_prompt` answers what ComfyUI's does, with its error shapes: a node without `class_type`
or of a class that is not installed (`missing_node_type`, the first one found), then every output
node's inputs and, through their links, the inputs of the nodes it depends on: a combo value not
in the class's list (`value_not_in_list`, `input_config` and the list left out past 20 values).
Outputs that fail are reported in `node_errors` with their `dependent_outputs`; the prompt is
refused (`prompt_outputs_failed_validation`) only when no output is left, and runs the good ones
otherwise. Tests and roles post small graphs without output nodes or required inputs, so three
checks of ComfyUI's are made only under `--test-double-strict`: a prompt without an output node
(`prompt_no_outputs`), a missing required input (`required_input_missing`), and a link that is not
`[node id, slot]` of a node in the prompt or gives the wrong type (`bad_linked_input`,
`return_type_mismatch`). Without the flag a graph without outputs runs every node.

`Executor.execute` runs a validated prompt in ComfyUI's order: each node after the nodes it links
to, output by output. It sends ComfyUI's messages to the prompt's client (its `client_id`; none
without one, except `execution_interrupted`, which then goes to every socket, as in ComfyUI):
`execution_start`, `execution_cached` (`nodes` always empty: the double caches nothing, so a prompt
posted twice runs twice and saves twice), per node `executing` and, for a node with UI output,
`executed`; `progress` per step of a step-taking node (KSampler); last `execution_success`,
`execution_error` (a node raised: TestDoubleFail does) or `execution_interrupted` (POST
/interrupt). Those four carry a millisecond `timestamp` and are the history's status messages.
The caller then writes /history and sends `executing` with node null (see server.py).

The run length is `extra_data.test_double_seconds` (default 0), spent in the step-taking nodes
(each step a share), else in the first node run; an interrupt ends the wait at once and is
reported at the node that was running. `extra_data.test_double_drop_ws_after_seconds` makes the
double close the client's sockets without a close frame that many seconds into the run (the
prompt runs on; a client that reconnects with the same clientId gets the rest, and first an
`executing` message naming the running node, as ComfyUI sends).
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import nodes

# ComfyUI keeps these extra_data keys out of /queue and /history (SENSITIVE_EXTRA_DATA_KEYS).
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
# ComfyUI's combo lists longer than this are not echoed back in a validation error.
COMBO_ECHO_LIMIT = 20

Error = dict[str, Any]


class InterruptProcessingException(Exception):  # noqa: N818 - ComfyUI's name
    """POST /interrupt reached a running node."""


def _node_title(node: dict[str, Any], default: object) -> object:
    meta = node.get("_meta")
    return meta.get("title", default) if isinstance(meta, dict) else default


def _missing_class(prompt: dict[str, Any]) -> Error | None:
    """ComfyUI's first check: every node has a class_type of an installed class."""
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            title = _node_title(node, None) if isinstance(node, dict) else None
            return {
                "type": "missing_node_type",
                "message": f"Node '{title or f'ID #{node_id}'}' has no class_type. The workflow may be corrupted or "
                "a custom node is missing.",
                "details": f"Node ID '#{node_id}'",
                "extra_info": {"node_id": node_id, "class_type": None, "node_title": title},
            }
        class_type = node["class_type"]
        if not isinstance(class_type, str) or class_type not in nodes.NODE_CLASS_MAPPINGS:
            title = _node_title(node, class_type)
            return {
                "type": "missing_node_type",
                "message": f"Node '{title}' not found. The custom node may not be installed.",
                "details": f"Node ID '#{node_id}'",
                "extra_info": {"node_id": node_id, "class_type": class_type, "node_title": title},
            }
    return None


def _inputs(node: dict[str, Any]) -> dict[str, Any]:
    inputs = node.get("inputs")
    return inputs if isinstance(inputs, dict) else {}


def _declared(node_class: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """The class's required and optional input specs."""
    spec = node_class.INPUT_TYPES()  # type: ignore[attr-defined]
    return dict(spec.get("required") or {}), dict(spec.get("optional") or {})


class _Validator:
    """ComfyUI's validate_inputs, memoised per node: (valid, reasons)."""

    def __init__(self, prompt: dict[str, Any], strict: bool) -> None:
        self.prompt = prompt
        self.strict = strict
        self.validated: dict[str, tuple[bool, list[Error]]] = {}

    def node(self, node_id: str) -> tuple[bool, list[Error]]:
        if node_id in self.validated:
            return self.validated[node_id]
        self.validated[node_id] = (True, [])  # a cycle ends here, as ComfyUI's memo does
        node = self.prompt[node_id]
        required, optional = _declared(nodes.NODE_CLASS_MAPPINGS[node["class_type"]])
        inputs = _inputs(node)
        custom = getattr(nodes.NODE_CLASS_MAPPINGS[node["class_type"]], "VALIDATE_INPUTS", None)
        custom_names = inspect.getfullargspec(custom).args if custom else []
        errors: list[Error] = []
        valid = True
        for name, info in {**required, **optional}.items():
            if name not in inputs:
                if self.strict and name in required:
                    errors.append(
                        {
                            "type": "required_input_missing",
                            "message": "Required input is missing",
                            "details": name,
                            "extra_info": {"input_name": name},
                        }
                    )
                continue
            value = inputs[name]
            if isinstance(value, list):
                link_ok, link_errors = self._link(name, info, value)
                errors += link_errors
                valid = valid and link_ok
            elif name in custom_names:  # the class checks this value itself, in place of the combo
                answer = custom(**{name: value})  # type: ignore[misc]
                if answer is not True:
                    errors.append(
                        {
                            "type": "custom_validation_failed",
                            "message": "Custom validation failed for node",
                            "details": f"{name} - {answer}",
                            "extra_info": {"input_name": name, "input_config": info, "received_value": value},
                        }
                    )
            elif isinstance(info[0], list) and value not in info[0]:
                errors.append(_not_in_list(name, info, value))
        result = (valid and not errors, errors)
        self.validated[node_id] = result
        return result

    def _link(self, name: str, info: tuple[Any, ...], value: list[Any]) -> tuple[bool, list[Error]]:
        """A linked input: its upstream node validated; its shape and type checked when strict."""
        upstream = str(value[0]) if len(value) == 2 else None
        if upstream is None or upstream not in self.prompt or not isinstance(value[1], int):
            if not self.strict:
                return True, []
            return False, [
                {
                    "type": "bad_linked_input",
                    "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    "details": name,
                    "extra_info": {"input_name": name, "input_config": info, "received_value": value},
                }
            ]
        returns = getattr(nodes.NODE_CLASS_MAPPINGS[self.prompt[upstream]["class_type"]], "RETURN_TYPES", ())
        wanted = info[0]
        if self.strict and isinstance(wanted, str) and 0 <= value[1] < len(returns):
            received = returns[value[1]]
            if "*" not in (received, wanted) and received != wanted:
                return False, [
                    {
                        "type": "return_type_mismatch",
                        "message": "Return type mismatch between linked nodes",
                        "details": f"{name}, received_type({received}) mismatch input_type({wanted})",
                        "extra_info": {
                            "input_name": name,
                            "input_config": info,
                            "received_type": received,
                            "linked_node": value,
                        },
                    }
                ]
        return self.node(upstream)[0], []  # ComfyUI validates the upstream node only past the type check


def _not_in_list(name: str, info: tuple[Any, ...], value: object) -> Error:
    options = info[0]
    long = len(options) > COMBO_ECHO_LIMIT
    return {
        "type": "value_not_in_list",
        "message": "Value not in list",
        "details": f"{name}: '{value}' not in {f'(list of length {len(options)})' if long else str(options)}",
        "extra_info": {"input_name": name, "input_config": None if long else info, "received_value": value},
    }


def _exception_during_validation(exc: Exception) -> Error:
    kind = type(exc)
    return {
        "type": "exception_during_validation",
        "message": "Exception when validating node",
        "details": str(exc),
        "extra_info": {"exception_type": kind.__qualname__, "traceback": traceback.format_tb(exc.__traceback__)},
    }


def output_nodes(prompt: dict[str, Any]) -> list[str]:
    return [
        node_id
        for node_id, node in prompt.items()
        if getattr(nodes.NODE_CLASS_MAPPINGS[node["class_type"]], "OUTPUT_NODE", False) is True
    ]


def validate_prompt(prompt: dict[str, Any], strict: bool) -> tuple[bool, Error | None, list[str], dict[str, Any]]:
    """ComfyUI's validate_prompt: (valid, error, outputs to execute, node_errors)."""
    missing = _missing_class(prompt)
    if missing is not None:
        return False, missing, [], {}
    outputs = output_nodes(prompt)
    if not outputs:
        if not strict:
            return True, None, [], {}
        error = {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}
        return False, error, [], {}
    validator = _Validator(prompt, strict)
    good: list[str] = []
    failed: list[tuple[str, list[Error]]] = []
    node_errors: dict[str, Any] = {}
    for output in outputs:
        try:
            valid, reasons = validator.node(output)
        except Exception as exc:  # noqa: BLE001 - a node's INPUT_TYPES or VALIDATE_INPUTS raised: ComfyUI reports it
            valid, reasons = False, [_exception_during_validation(exc)]
            validator.validated[output] = (False, reasons)
        if valid:
            good.append(output)
            continue
        failed.append((output, reasons))
        for node_id, (node_valid, node_reasons) in validator.validated.items():
            if node_valid or not node_reasons:  # downstream of a failure: no reasons of its own
                continue
            entry = node_errors.setdefault(
                node_id,
                {"errors": node_reasons, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]},
            )
            entry["dependent_outputs"].append(output)
        logging.error("Failed to validate prompt for output %s:", output)
    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for _output, errors in failed for e in errors)
        error = {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": details,
            "extra_info": {},
        }
        return False, error, [], node_errors
    return True, None, good, node_errors


def execution_order(prompt: dict[str, Any], outputs: list[str]) -> list[str]:
    """Each output (or, without outputs, each node) after the nodes it links to, each node once."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        for value in _inputs(prompt[node_id]).values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                visit(str(value[0]))
        order.append(node_id)

    for node_id in outputs or list(prompt):
        visit(node_id)
    return order


def _seconds(value: object) -> float | None:
    """A test hook's number of seconds (not below 0); None when it is absent or no number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None


def _format(value: object) -> object:
    return value if value is None or isinstance(value, (int, float, bool, str)) else str(value)


class Executor:
    """Runs one prompt at a time; `send(event, data, sid)` delivers a message (sid None: every socket),
    `drop(sid)` closes a client's sockets without a close frame (the test hook)."""

    def __init__(
        self,
        send: Callable[[str, dict[str, Any], str | None], None],
        drop: Callable[[str], None],
        interrupted: threading.Event,
    ) -> None:
        self.send = send
        self.drop = drop
        self.interrupted = interrupted
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.status_messages: list[list[Any]] = []
        self.success = True
        self.history_result: dict[str, Any] = {}

    def add_message(self, event: str, data: dict[str, Any], broadcast: bool) -> None:
        """A status message: kept for /history, sent to the client (or to all when `broadcast`)."""
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.status_messages.append([event, data])
        if self.client_id is not None or broadcast:
            self.send(event, data, self.client_id)

    def execute(self, prompt: dict[str, Any], prompt_id: str, extra_data: dict[str, Any], outputs: list[str]) -> None:
        self.client_id = extra_data.get("client_id")
        self.status_messages = []
        self.success = True
        self.add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)
        self.add_message("execution_cached", {"nodes": [], "prompt_id": prompt_id}, broadcast=False)
        order = execution_order(prompt, outputs)
        run = _Run(self, prompt, prompt_id, extra_data, order)
        try:
            run.all()
        except InterruptProcessingException:
            self.success = False
            logging.info("Processing interrupted")
            self.add_message("execution_interrupted", run.failure({}), broadcast=True)
        except Exception as exc:  # noqa: BLE001 - a node's failure is reported, as ComfyUI does
            self.success = False
            logging.error("!!! Exception during processing !!! %s", exc)
            logging.error(traceback.format_exc())
            self.add_message("execution_error", run.failure(run.error_details(exc)), broadcast=False)
        else:
            self.add_message("execution_success", {"prompt_id": prompt_id}, broadcast=False)
        finally:
            run.stop_timer()
        meta = {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in run.ui}
        self.history_result = {"outputs": run.ui, "meta": meta}
        self.last_node_id = None


class _Run:
    """One execution of a prompt: node outputs, UI outputs, the node running, the time left to spend."""

    def __init__(
        self, executor: Executor, prompt: dict[str, Any], prompt_id: str, extra_data: dict[str, Any], order: list[str]
    ) -> None:
        self.executor = executor
        self.prompt = prompt
        self.prompt_id = prompt_id
        self.extra_data = extra_data
        self.order = order
        self.outputs: dict[str, tuple[Any, ...]] = {}
        self.ui: dict[str, dict[str, Any]] = {}
        self.executed: list[str] = []
        self.current: str | None = None
        self.inputs: dict[str, Any] = {}
        seconds = _seconds(extra_data.get("test_double_seconds")) or 0.0
        stepping = [n for n in order if getattr(self._class(n), "STEPS_INPUT", None)]
        takers = stepping or order[:1]
        self.budget = {n: seconds / len(takers) for n in takers}
        self.idle = 0.0 if takers else seconds
        self.timer = self._drop_timer(extra_data.get("test_double_drop_ws_after_seconds"))

    def _class(self, node_id: str) -> type:
        return nodes.NODE_CLASS_MAPPINGS[self.prompt[node_id]["class_type"]]

    def _drop_timer(self, seconds: object) -> threading.Timer | None:
        sid = self.executor.client_id
        delay = _seconds(seconds)
        if delay is None or sid is None:
            return None
        timer = threading.Timer(delay, self.executor.drop, (sid,))
        timer.daemon = True
        timer.start()
        return timer

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def wait(self, seconds: float) -> None:
        """Spend run time; an interrupt ends it at once."""
        if self.executor.interrupted.wait(seconds) if seconds > 0 else self.executor.interrupted.is_set():
            raise InterruptProcessingException

    def progress(self, value: int, total: int) -> None:
        if self.executor.client_id is not None:
            self.executor.send(
                "progress",
                {"value": value, "max": total, "prompt_id": self.prompt_id, "node": self.current},
                self.executor.client_id,
            )

    def all(self) -> None:
        self.wait(self.idle)
        for node_id in self.order:
            self.node(node_id)

    def node(self, node_id: str) -> None:
        self.current = node_id
        self.wait(0)  # ComfyUI checks for an interrupt before each node
        executor = self.executor
        executor.last_node_id = node_id
        if executor.client_id is not None:
            message = {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id}
            executor.send("executing", message, executor.client_id)
        node_class = self._class(node_id)
        self.inputs = {}
        for name, value in _inputs(self.prompt[node_id]).items():
            if isinstance(value, list) and len(value) == 2:
                upstream = self.outputs.get(str(value[0]), ())
                slot = value[1] if isinstance(value[1], int) else -1
                self.inputs[name] = upstream[slot] if 0 <= slot < len(upstream) else None
            else:
                self.inputs[name] = value
        context = nodes.RunContext(
            node_id=node_id,
            prompt=self.prompt,
            extra_data=self.extra_data,
            seconds=self.budget.get(node_id, 0.0),
            wait=self.wait,
            progress=self.progress,
        )
        run = getattr(node_class, "double_run", None)
        if run is None:  # a custom node: the double runs nothing of it, its outputs are empty
            result: tuple[Any, ...] = tuple(None for _ in getattr(node_class, "RETURN_TYPES", ()))
            ui = None
            context.wait(context.seconds)
        else:
            result, ui = run(context, **self.inputs)
        self.outputs[node_id] = result
        if ui:
            self.ui[node_id] = ui
            if executor.client_id is not None:
                message = {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": self.prompt_id}
                executor.send("executed", message, executor.client_id)
        self.executed.append(node_id)

    def failure(self, details: dict[str, Any]) -> dict[str, Any]:
        node_id = self.current
        node_type = self.prompt[node_id]["class_type"] if node_id is not None else None
        return {
            "prompt_id": self.prompt_id,
            "node_id": node_id,
            "node_type": node_type,
            "executed": list(self.executed),
            **details,
        }

    def error_details(self, exc: BaseException) -> dict[str, Any]:
        kind = type(exc)
        module = kind.__module__
        return {
            "exception_message": str(exc),
            "exception_type": kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}",
            "traceback": traceback.format_tb(sys.exc_info()[2]),
            "current_inputs": {name: [_format(value)] for name, value in self.inputs.items()},
            "current_outputs": list(self.outputs),
        }
