"""How a configuration dataclass declares its options: field metadata for groups, flag names and
positional arguments (read by `commands.options`, which builds the command line from them), and the
choice check a configuration built in Python gets too.

A configuration is a plain dataclass of the library (`CacheConfig`, `TrainConfig`, ...): its fields
are options or groups (nested dataclasses declared once and reused, such as `ModelSpec`), each with
its help text as the attribute docstring under it.
"""

from __future__ import annotations

import dataclasses
import types
import typing


def group(prefix: str = "", suffix: str = "", names: dict[str, str] | None = None, about: str = "",
          help: dict[str, str] | None = None, required: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
          defaults: dict | None = None, panel: str = "", transparent: bool = False) -> dict:
    """Field metadata mounting a nested dataclass (a group) in a configuration.

    Its fields' flags are `--{prefix}{field}{suffix}` (underscores as dashes), except those `names`
    spells out (without the dashes); `about` prefixes their help ("teacher: ..."), `help` replaces a
    field's help here, `required` makes fields required here, `exclude` leaves fields out here, and
    `defaults` replaces fields' defaults here (the field's own default_factory must agree: `mounted`).
    `panel` names the --help panel its options are listed in (a field's own `in_panel` wins). A `transparent`
    group structures the code only: in files its fields sit at the level of the group's field (`TrainConfig`'s
    stream and run options are one flat set of options)."""
    return {"group": {"prefix": prefix, "suffix": suffix, "names": dict(names or {}), "about": about,
                      "help": dict(help or {}), "required": tuple(required), "exclude": tuple(exclude),
                      "defaults": dict(defaults or {}), "panel": panel, "transparent": transparent}}


def in_panel(name: str) -> dict:
    """Field metadata: list this option in the --help panel `name` (Data, Student, Loss, ...)."""
    return {"panel": name}


def mounted(cls, **defaults) -> dataclasses.Field:
    """A group field of type `cls` with other defaults than its class's, in one place:
    `views: ViewSpec = mounted(ViewSpec, recipe="imagenet-cnn", seed=0)`."""
    return dataclasses.field(default_factory=lambda: cls(**defaults), metadata=group(defaults=defaults))


def flag_name(name: str) -> dict:
    """Field metadata giving an option's flag another name than its field (e.g. 'teacher')."""
    return {"flag": name}


def argument() -> dict:
    """Field metadata: a positional command-line argument instead of a --flag."""
    return {"argument": True}


def strip_optional(tp):
    """`X | None` -> X (a union of several others stays a union of them)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
    return tp


def fits(value, tp) -> bool:
    """Whether a JSON value (read from a file or a store) has a field's declared type: a bool is no number, an
    int is a float, a list is a tuple of the declared length, a record (dataclass) is an object."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is type(None):
        return value is None
    if tp in (int, float):
        return isinstance(value, int if tp is int else int | float) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(fits(v, args[0]) for v in value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return isinstance(value, list | tuple) and all(fits(v, args[0]) for v in value)
        return isinstance(value, list | tuple) and len(value) == len(args) and all(map(fits, value, args))
    if origin is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    return tp is typing.Any or (isinstance(tp, type) and isinstance(value, tp))


def type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of: " + ", ".join(map(str, typing.get_args(tp)))
    return tp.__name__ if isinstance(tp, type) and typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def choice_problems(obj) -> list[str]:
    """Fields of a configuration dataclass (nested ones included) typed `Literal[...]` whose value is not
    one of the choices: a configuration built in Python gets the check the command line makes."""
    problems = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        if value is None and strip_optional(tp) is not tp:  # an optional option left unset
            continue
        tp = strip_optional(tp)
        if typing.get_origin(tp) is typing.Literal and value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            problems.append(f"--{f.name.replace('_', '-')} must be one of {choices}, got {value!r}")
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            problems += choice_problems(value)
    return problems
