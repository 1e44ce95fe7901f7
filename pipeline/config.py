"""Configuration dataclasses as the one source of every option: command-line flags, YAML files, help.

A command built by `command_from(Config)` takes one flag per dataclass field (help text = the field's
attribute docstring, written once where the field is declared), plus `--config FILE.yaml` and
`--print-config`. Precedence: a flag given on the command line, then the file, then the default.
File keys follow the dataclass structure (nested dataclasses are nested mappings, as in a run's
`config.json`, which is therefore a valid `--config`); unknown keys are refused, naming them. A file
may instead hold one section per command (`cache-teacher:`, `train-student:`), so one file describes
a whole setup (the shipped `configs/`). On the command line, `null` clears an optional option that
the file sets (e.g. `--teacher-classes null`).

Hand-written because typer builds commands from function signatures only; this turns a dataclass
into such a signature (jsonargparse does the same for argparse, but the CLI here is typer).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from pipeline.errors import UserError

OUTPUT_ONLY = ("resolved",)  # keys a run writes into its config.json for reading, ignored on input


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """{field: its attribute docstring} (the string literal right after the field, as litgpt writes them)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def strip_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
    return tp


def _kind(tp) -> str:
    """How a field's type travels on the command line."""
    tp = strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "choice"
    if origin is list:
        return "list"
    if tp is dict or origin is dict:
        return "kwargs"
    if dataclasses.is_dataclass(tp):
        return "nested"
    if tp in (bool, int, float, str) or tp is Path:
        return tp.__name__ if tp is not Path else "path"
    return "str"  # unions such as `str | dict`: the command line gives the string form


@dataclasses.dataclass
class Flag:
    name: str  # field name
    path: tuple[str, ...]  # where it lives in the (nested) configuration
    tp: Any
    kind: str
    help: str
    decls: tuple[str, ...] = ()  # flag spelling when not --field-name
    default: Any = None


def flags_of(cls, prefix: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[Flag]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.metadata.get("cli") is False:
            continue
        kind = _kind(hints[f.name])
        if kind == "nested":
            out += flags_of(strip_optional(hints[f.name]), (*prefix, f.name), exclude)
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append(Flag(f.name, (*prefix, f.name), hints[f.name], kind, docs.get(f.name, ""),
                        tuple(f.metadata.get("flags", ())), default))
    return out


def _annotation(flag: Flag):
    spelling = flag.decls or (f"--{flag.name.replace('_', '-')}",)
    if flag.kind == "bool":
        spelling = flag.decls or (f"--{flag.name.replace('_', '-')}/--no-{flag.name.replace('_', '-')}",)
    help_ = flag.help
    if flag.kind == "choice":
        help_ = f"{help_} [{'|'.join(map(str, typing.get_args(strip_optional(flag.tp))))}]".strip()
    cli_type = {"bool": bool, "int": int, "float": float, "path": Path, "kwargs": list[str]}.get(flag.kind, str)
    if flag.kind == "list":
        help_ += " (comma-separated)"
    if flag.kind == "kwargs":
        help_ += " (name=value, repeatable)"
    if flag.default not in (None, {}, []) and "[default:" not in help_:
        shown = ",".join(map(str, flag.default)) if isinstance(flag.default, list) else flag.default
        help_ += f" [default: {shown}]"
    from rich.markup import escape  # typer renders help as rich markup: keep our [brackets] literal
    return Annotated[cli_type | None, typer.Option(*spelling, help=escape(help_), show_default=False)]


def _parse_list(text, item, option: str) -> list:
    if isinstance(text, list):
        return [item(t) for t in text]
    try:
        return [item(t) for t in str(text).replace(",", " ").split()]
    except ValueError:
        raise UserError(f"{option} '{text}' is not a comma-separated list of {item.__name__}s, e.g. 1,2,3") from None


def _convert(flag: Flag, value, source: str):
    """A value from the command line or a file -> the field's type; bad values name the option."""
    if value is None:
        return None
    optional = strip_optional(flag.tp) is not flag.tp
    if source == "flag" and optional and value == "null":  # a flag that clears what the file set
        return None
    option = f"--{flag.name.replace('_', '-')}" if source == "flag" else f"'{'.'.join(flag.path)}' in {source}"
    tp = strip_optional(flag.tp)
    if flag.kind == "choice":
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"{option} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if flag.kind == "list":
        return _parse_list(value, typing.get_args(tp)[0], option)
    if flag.kind == "kwargs":
        if isinstance(value, dict):
            return dict(value)
        from pipeline.models import parse_kwargs
        return parse_kwargs(list(value))
    if flag.kind == "path":
        return Path(value)
    if flag.kind in ("int", "float"):
        try:
            return {"int": int, "float": float}[flag.kind](value)
        except (TypeError, ValueError):
            raise UserError(f"{option} must be a number, got {value!r}") from None
    return value


def read_file(path: Path) -> dict:
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass an existing --config") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML ({e}); fix it") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    return data


def _flatten_file(data: dict, flags: list[Flag], path: Path) -> dict[tuple[str, ...], Any]:
    known = {f.path for f in flags}
    groups = {f.path[:i] for f in flags for i in range(1, len(f.path))}
    out, unknown = {}, []

    def walk(d: dict, prefix: tuple[str, ...]):
        for k, v in d.items():
            p = (*prefix, str(k))
            if p in known:
                out[p] = v
            elif p in groups and isinstance(v, dict):
                walk(v, p)
            elif not (prefix == () and k in OUTPUT_ONLY):
                unknown.append(".".join(p))

    walk(data, ())
    if unknown:
        raise UserError(f"config file {path} has unknown keys: {', '.join(unknown)}; see --help for the options")
    return out


SECTIONS = ("cache-teacher", "train-student")  # a file may hold one section per command (a whole setup)


def resolve(cls, flags: list[Flag], given: dict[str, Any], config: Path | None, section: str | None = None) -> dict:
    """Nested dict of values: command-line flags over the file over nothing (the dataclass defaults)."""
    data = read_file(config) if config else {}
    if section and any(k in SECTIONS for k in data):
        others = [k for k in data if k not in SECTIONS]
        if others:
            raise UserError(f"config file {config} mixes command sections with other keys ({', '.join(others)}); "
                            f"put every option under {' or '.join(SECTIONS)}")
        data = data.get(section) or {}
    from_file = _flatten_file(data, flags, config) if config else {}
    values: dict = {}
    for f in flags:
        if f.name in given:
            v = _convert(f, given[f.name], "flag")
        elif f.path in from_file:
            v = _convert(f, from_file[f.path], str(config))
        else:
            continue
        d = values
        for p in f.path[:-1]:
            d = d.setdefault(p, {})
        d[f.path[-1]] = v
    return values


def instantiate(cls, values: dict):
    """Build the (nested) dataclass; missing required fields are named as flags."""
    hints = typing.get_type_hints(cls)
    kwargs, missing = {}, []
    for f in dataclasses.fields(cls):
        if f.name in values:
            v = values[f.name]
            sub = strip_optional(hints[f.name])
            kwargs[f.name] = instantiate(sub, v) if dataclasses.is_dataclass(sub) and isinstance(v, dict) else v
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append(f"--{f.name.replace('_', '-')}")
    if missing:
        raise UserError(f"missing required option(s) {', '.join(missing)}: pass them as flags or in --config")
    return cls(**kwargs)


def to_plain(cfg, flags: list[Flag]) -> dict:
    """The options of a configuration as plain, nested YAML/JSON data (paths as strings): what
    --print-config shows and what --config reads back."""
    out: dict = {}
    for f in flags:
        v = cfg
        for p in f.path:
            v = getattr(v, p)
        d = out
        for p in f.path[:-1]:
            d = d.setdefault(p, {})
        d[f.path[-1]] = json.loads(json.dumps(dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v,
                                              default=str))
    return out


def command_from(cls, run, section: str | None = None, exclude: tuple[str, ...] = ()):
    """A typer callback taking every field of `cls` as a flag, plus --config and --print-config;
    it builds the configuration and calls `run(config)`."""
    flags = flags_of(cls, exclude=exclude)

    def callback(ctx: typer.Context, **kwargs):
        import yaml
        config, print_config = kwargs.pop("config"), kwargs.pop("print_config")
        given = {k: v for k, v in kwargs.items() if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"}
        cfg = instantiate(cls, resolve(cls, flags, given, config, section))
        if print_config:
            print(yaml.safe_dump(to_plain(cfg, flags), sort_keys=False), end="")
            return
        run(cfg)

    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
              inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Path | None, typer.Option("--config", help="YAML file of options (a run's config.json works too); "
                                                   "flags given here override it")]),
              inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
                  bool, typer.Option("--print-config", help="print the resolved configuration and exit")])]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_annotation(f))
               for f in flags]
    callback.__signature__ = inspect.Signature(params)
    callback.__annotations__ = {p.name: p.annotation for p in params}
    callback.__doc__ = run.__doc__
    return callback
