"""Every hook a rustinfer plugin can implement.

Plugins are packages with one entry point in the group ``rustinfer``; the object it names (a module,
usually) carries functions decorated with :data:`hookimpl`. Each hook is called once per process, when
the registries are first needed, and is handed a ``register`` callback (the simonw/llm style) rather than
returning a list, so the core can validate each entry and record which plugin supplied it.

Registration is lazy: plugins pass ``"module:attr"`` strings, so importing a plugin never initialises CUDA
or compiles a kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from rustinfer.registry import RegisterDevice, RegisterModel, RegisterOp, RegisterToolParser

PROJECT_NAME = "rustinfer"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def rustinfer_register_ops(register: RegisterOp) -> None:
    """Register op implementations.

    Called once per process. Call ``register(op, name, target, device=..., dtypes=..., priority=...,
    requires=...)`` for each implementation: ``op`` names a spec in :mod:`rustinfer.ops`, ``target`` is
    ``"module:attr"`` of the callable, ``requires`` are ``"module:attr"`` strings or callables that return
    ``None`` when the implementation can run here, or a reason string when it cannot.
    """


@hookspec
def rustinfer_register_models(register: RegisterModel) -> None:
    """Register model classes.

    Called once per process. Call ``register(architecture, target)`` where ``architecture`` is a HF
    ``architectures[0]`` name (``"LlamaForCausalLM"``) or a GGUF ``general.architecture`` (``"llama"``)
    and ``target`` is ``"module:Class"`` of a :class:`rustinfer.models.Model` subclass.
    """


@hookspec
def rustinfer_register_devices(register: RegisterDevice) -> None:
    """Register device types.

    Called once per process. Call ``register(device_type, target)`` where ``device_type`` is a torch
    device type (``"cpu"``, ``"cuda"``) and ``target`` is ``"module:Class"`` of a
    :class:`rustinfer.device.Device` subclass.
    """


@hookspec
def rustinfer_register_tool_parsers(register: RegisterToolParser) -> None:
    """Register tool-call output parsers (a model family brings the parser of its format).

    Called once per process. Call ``register(name, target, template_markers=..., priority=...)``:
    ``name`` is what ``rustinfer serve --tool-call-parser`` accepts, ``target`` is ``"module:Class"``
    of a :class:`rustinfer.tool_calls.ToolParser` subclass, and ``template_markers`` say how a chat
    template that renders tools asks for this format: alternatives, each a string the template
    contains or a tuple of strings it contains all of. With no parser configured, the template
    selects the matching registration of highest ``priority`` (then the largest matching group,
    then the first name); with none matching, the core's ``hermes`` parser reads the output.
    """
