"""The method registry: every method's name and what code needs to know about it.

A method registers itself with one decorator line, ``@register_method("name", ...)``, whose
keywords are its :class:`MethodInfo`; named variants (a registered method with fixed
options) with :func:`register_variant`. The CLI, the benchmark, the sanity check and the
tests list methods with :func:`list_methods` and build them with :func:`create_method`.

Example:
    >>> from class_space_saliency import list_methods
    >>> list_methods(needs_gradients=False, model_agnostic=False, variants=False)
    ['class_space', 'class_space_contributions', 'rollout', 'raw_attention', 'linear_probe']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from torch import nn

from .base import COSTS, FLAGS, MethodInfo, SaliencyMethod

_REGISTRY: dict[str, MethodInfo] = {}

METHODS: dict[str, type[SaliencyMethod]] = {}
"""Registered methods: name -> class (a live view of the registry, variants excluded)."""

VARIANTS: dict[str, tuple[str, Mapping[str, Any]]] = {}
"""Named variants: name -> (registered method, fixed options) (a live view)."""

Method = TypeVar("Method", bound=type[SaliencyMethod])


def _add(info: MethodInfo) -> None:
    if info.name in _REGISTRY:
        raise ValueError(
            f"method {info.name!r} is already registered ({_REGISTRY[info.name].method.__name__}); "
            "choose another name or call unregister_method first"
        )
    _REGISTRY[info.name] = info
    if info.variant_of is None:
        METHODS[info.name] = info.method
    else:
        VARIANTS[info.name] = (info.variant_of, info.fixed_options)


def register_method(
    name: str,
    *,
    needs_gradients: bool = False,
    class_specific: bool = True,
    needs_attention: bool = False,
    needs_cls: bool = False,
    model_agnostic: bool = False,
    needs_fitting: bool = False,
) -> Callable[[Method], Method]:
    """Class decorator: register a :class:`~.base.SaliencyMethod` subclass under ``name``.

    The keywords are the method's :class:`MethodInfo`; the class gets it as ``info`` (and
    ``cost``), and its constructor checks the model against it.

    Args:
        name: The registry name (an identifier), e.g. ``"class_space"``.
        needs_gradients: The method takes gradients.
        class_specific: The map depends on the target class.
        needs_attention: The method reads attention probabilities.
        needs_cls: The method needs a [CLS] token that the head reads.
        model_agnostic: The method never runs the model.
        needs_fitting: The method is built from fitted parameters (a constructor option
            without a default).

    Returns:
        The decorator (it returns the class unchanged apart from ``info`` and ``cost``).

    Raises:
        ValueError: For a name that is taken or not an identifier.
        TypeError: For a class that is not a SaliencyMethod, or a flag that is not a bool.

    Example:
        >>> import torch
        >>> from class_space_saliency import SaliencyMethod, register_method
        >>> from class_space_saliency.methods import unregister_method
        >>> @register_method("doc_flat", class_specific=False, model_agnostic=True)
        ... class Flat(SaliencyMethod):
        ...     def _attribute(self, inputs, target, grid, options):
        ...         return torch.ones(len(inputs), 1, *grid)
        >>> Flat.info.cost
        'no model pass'
        >>> unregister_method("doc_flat")
    """

    def decorate(cls: Method) -> Method:
        info = MethodInfo(
            name,
            cls,
            needs_gradients=needs_gradients,
            class_specific=class_specific,
            needs_attention=needs_attention,
            needs_cls=needs_cls,
            model_agnostic=model_agnostic,
            needs_fitting=needs_fitting,
        )
        _add(info)
        cls.info = info
        cls.cost = info.cost
        return cls

    return decorate


def register_variant(name: str, of: str, **fixed_options: Any) -> None:
    """Register ``name``: the registered method ``of`` with ``fixed_options``.

    Args:
        name: The variant's name, e.g. ``"class_space_gradient_paper"``.
        of: A registered method (not a variant).
        **fixed_options: Options the variant fixes (checked against the method's options).

    Raises:
        ValueError: For an unknown ``of``, a taken name or an unknown option.
    """
    base = method_info(of)
    if base.variant_of is not None:
        raise ValueError(f"{of!r} is itself a variant; register a variant of {base.variant_of!r}")
    unknown = sorted(set(fixed_options) - set(base.options))
    if unknown:
        raise ValueError(f"{of!r} has no option(s) {unknown}; its options are {base.options}")
    flags = {flag: getattr(base, flag) for flag in FLAGS}
    _add(MethodInfo(name, base.method, **flags, fixed_options=fixed_options, variant_of=of))


def unregister_method(name: str) -> None:
    """Remove ``name`` (a method with no registered variants, or a variant).

    Raises:
        ValueError: For an unknown name, or a method that still has variants.
    """
    info = method_info(name)
    variants = sorted(n for n, i in _REGISTRY.items() if i.variant_of == name)
    if variants:
        raise ValueError(f"method {name!r} has variants {variants}; unregister them first")
    del _REGISTRY[name]
    METHODS.pop(name, None)
    VARIANTS.pop(name, None)
    if info.variant_of is None and info.method.info is info:
        info.method.info = None


def method_info(name: str) -> MethodInfo:
    """The :class:`MethodInfo` of a registered method or variant.

    Raises:
        ValueError: For an unknown name, listing the registered ones.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"method must be one of {list(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def list_methods(*, variants: bool = True, cost: str | None = None, **flags: bool) -> list[str]:
    """Names of the registered methods (then variants) whose metadata match the filters.

    Args:
        variants: Include named variants.
        cost: Keep only methods of this cost (one of :data:`COSTS`).
        **flags: Any of :data:`FLAGS` set to the wanted bool, e.g. ``needs_gradients=False``.

    Returns:
        Names in registration order, methods before variants.

    Raises:
        TypeError: For an unknown filter (naming it) or a flag that is not a bool.
        ValueError: For an unknown cost.

    Example:
        >>> list_methods(needs_gradients=True)
        ['class_space_gradient', 'gradcam', 'chefer', 'class_space_gradient_paper']
    """
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise TypeError(f"list_methods() got unknown filter(s) {unknown}; filters are {FLAGS}")
    for flag, wanted in flags.items():
        if not isinstance(wanted, bool):
            raise TypeError(f"filter {flag} must be a bool, got {wanted!r}")
    if cost is not None and cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    if not isinstance(variants, bool):
        raise TypeError(f"variants must be a bool, got {variants!r}")
    infos = sorted(_REGISTRY.values(), key=lambda info: info.variant_of is not None)
    return [
        info.name
        for info in infos
        if (variants or info.variant_of is None)
        and (cost is None or info.cost == cost)
        and all(getattr(info, flag) == wanted for flag, wanted in flags.items())
    ]


def method_names() -> list[str]:
    """Every name :func:`create_method` accepts: the methods, then the variants."""
    return list_methods()


def create_method(name: str, model: nn.Module, **options: Any) -> SaliencyMethod:
    """Build a registered method or named variant by name.

    Args:
        name: A name of :func:`list_methods`, e.g. ``"class_space"``.
        model: The model to explain.
        **options: Constructor options of that method (for a variant: options beside the
            fixed ones), and ``class_names`` or parts of a custom model.

    Returns:
        The method instance.

    Raises:
        ValueError: For an unknown name or an option that overrides a variant's fixed one.

    Example:
        >>> import timm
        >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
        ...                           depth=2, num_classes=5)
        >>> create_method("class_space", model, layer=-2).layer
        [0]
        >>> create_method("class_space_gradient_paper", model).paper_exact
        True
    """
    info = method_info(name)
    clash = sorted(set(info.fixed_options) & set(options))
    if clash:
        raise ValueError(f"method {name!r} fixes {clash}; use {info.variant_of!r} to choose them")
    return info.method(model, **info.fixed_options, **options)


def create_methods(
    model: nn.Module,
    names: str | Sequence[str],
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, SaliencyMethod]:
    """Build several registered methods by name, each once.

    Args:
        model: The model to explain.
        names: Registry names (see :func:`list_methods`).
        method_kwargs: Constructor options per name.

    Returns:
        ``{name: method}`` in the order of ``names``.

    Raises:
        TypeError: For names that are not strings.
        ValueError: For repeated or unknown names, no names, or options for a name not built.
    """
    names = [names] if isinstance(names, str) else list(names)
    if not all(isinstance(name, str) for name in names):
        raise TypeError(f"methods must be registry names, got {names}")
    if not names:
        raise ValueError("no methods given")
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    method_kwargs = dict(method_kwargs or {})
    unknown = sorted(set(method_kwargs) - set(names))
    if unknown:
        raise ValueError(f"method_kwargs given for methods not built: {unknown}")
    return {name: create_method(name, model, **method_kwargs.get(name, {})) for name in names}
