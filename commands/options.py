"""Every command's options come from one configuration dataclass: flags, YAML files, help text.

A configuration is a dataclass whose fields are options or *groups*: nested dataclasses declared once
and reused (a model's `Weights`, a `ModelSpec`, a `TeacherSpec`, the views, the loss, ...). On the
command line every option is one flat, stable flag (`--lr`, `--teacher`, `--pretrained-file`): a group
is mounted with `group(prefix=..., suffix=..., names=...)`, which says how its fields' flags are
spelled there (the online teacher's weights are `--teacher-pretrained-file`, CKA's second model's are
`--pretrained-file-b`). In a `--config` file and in a run's `config.json`, options nest by group:

    teacher: {name: resnet50, weights: {pretrained_file: r50.pth}, classes: imagenet-1k}

A file may also be flat, with flag names as keys: a key that is no field of the file's level but is a
flag's name goes where that flag goes. A group mounted `transparent` exists in the code only (train-student's
stream and run options are one set of keys). Where a list is expected, one value is a list of one.

Compatibility: these spellings (nested by group, flat by flag name) are the whole input language of option
files, whatever version wrote them; anything else (a key no option has, a value of the wrong type) is refused,
naming it. What the tool writes to be read back by itself (a cache's format, a run directory's state) carries
a version, and another version is refused with one sentence naming both (README, "Compatibility").

Precedence: a flag given on the command line, then the file, then the default. Unknown keys are
refused, naming them. A file may hold one section per command (`cache-teacher:`, `train-student:`),
so one file describes a whole setup (the shipped `configs/`). On the command line `null` clears an
optional option that the file sets (e.g. `--teacher-classes null`). The help text of each option is
the attribute docstring written under its field.

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
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from pipeline.errors import UserError
from pipeline.spec import group, strip_optional
from students.checkpoint import OUTPUT_ONLY


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """{field: the first paragraph of its attribute docstring} (the string literal right after the field, as litgpt
    writes them; later paragraphs are details for the reader of the code and the README, not for --help)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                first = nxt.value.value.strip().split("\n\n")[0]  # --help shows the first paragraph
                docs[node.target.id] = " ".join(first.split())
    return docs


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
    return "str"  # unions such as `str | Recipe`: the command line gives the string form


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@dataclasses.dataclass
class Flag:
    """One option: where it lives in the (nested) configuration and how the command line spells it."""

    dest: str  # the command's parameter name: the flag without dashes, underscores for dashes
    path: tuple[str, ...]  # attribute path in the configuration
    key: tuple[str, ...]  # key path in files: the attribute path without transparent groups
    owner: type  # the dataclass that declares the field (its docstring is the help)
    tp: Any
    kind: str
    help: str
    default: Any = None
    required: bool = False
    decls: tuple[str, ...] = ()  # explicit spelling, e.g. ("--progress/--quiet",)
    argument: bool = False
    panel: str = ""  # the --help panel it is listed in

    @property
    def option(self) -> str:
        """How messages name the option."""
        return self.dest.upper() if self.argument else f"--{self.dest.replace('_', '-')}"


_TOP = group()["group"]


def flags_of(cls, prefix: tuple[str, ...] = (), mount: dict | None = None, key: tuple[str, ...] = ()) -> list[Flag]:
    """Every option of a configuration class, groups expanded (in declaration order)."""
    mount = mount or _TOP
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False or f.name in mount["exclude"]:
            continue
        kind = _kind(hints[f.name])
        if kind == "nested":
            inner = f.metadata.get("group", _TOP)
            about = ": ".join(a for a in (mount["about"], inner["about"]) if a)
            sub = {**inner, "prefix": mount["prefix"] + inner["prefix"], "suffix": inner["suffix"] + mount["suffix"],
                   "about": about, "panel": inner["panel"] or mount["panel"]}
            out += flags_of(strip_optional(hints[f.name]), (*prefix, f.name), sub,
                            key if inner["transparent"] else (*key, f.name))
            continue
        default = mount["defaults"][f.name] if f.name in mount["defaults"] else _default(f)
        name = f.metadata.get("flag") or mount["names"].get(f.name) or \
            f"{mount['prefix']}{f.name.replace('_', '-')}{mount['suffix']}"
        help_ = mount["help"].get(f.name) or docs.get(f.name, "")
        if mount["about"] and f.name not in mount["help"]:
            help_ = f"{mount['about']}: {help_[:1].lower()}{help_[1:]}"
        required = default is dataclasses.MISSING or f.name in mount["required"]
        out.append(Flag(name.replace("-", "_"), (*prefix, f.name), (*key, f.name), cls, hints[f.name], kind, help_,
                        None if default is dataclasses.MISSING else default, required,
                        tuple(f.metadata.get("flags", ())), bool(f.metadata.get("argument")),
                        f.metadata.get("panel") or mount["panel"]))
    dests = [fl.dest for fl in out]
    dup = sorted({d for d in dests if dests.count(d) > 1})
    if dup:  # a declaration bug, not a user error
        raise TypeError(f"{cls.__name__}: flags {dup} are declared twice; mount one group with another prefix")
    return out


def _annotation(flag: Flag):
    help_ = flag.help
    if flag.kind == "choice":
        help_ = f"{help_} [{'|'.join(map(str, typing.get_args(strip_optional(flag.tp))))}]".strip()
    cli_type = {"bool": bool, "int": int, "float": float, "path": Path, "kwargs": list[str],
                "list": list[str]}.get(flag.kind, str)
    if flag.kind == "list":
        help_ += " (comma-separated or repeated)"
    if flag.kind == "kwargs":
        help_ += " (name=value, repeatable)"
    if flag.default not in (None, {}, [], False) and "[default:" not in help_ and not dataclasses.is_dataclass(
            flag.default):
        shown = ",".join(map(str, flag.default)) if isinstance(flag.default, list) else flag.default
        help_ += f" [default: {shown}]"
    from rich.markup import escape  # typer renders help as rich markup: keep our [brackets] literal
    if flag.argument:
        return Annotated[cli_type, typer.Argument(help=escape(help_), show_default=False, metavar=flag.dest.upper())]
    dashed = flag.dest.replace("_", "-")
    spelling = flag.decls or ((f"--{dashed}/--no-{dashed}",) if flag.kind == "bool" else (f"--{dashed}",))
    return Annotated[cli_type | None, typer.Option(*spelling, help=escape(help_), show_default=False,
                                                   rich_help_panel=flag.panel or None)]


def _number(kind: str, value, option: str):
    """A file's or flag's value -> int or float, strictly: a bool, a fraction for an int, an infinite int or
    a non-number is refused (int(3.7) would silently be 3, int(True) 1)."""
    if isinstance(value, str):
        try:
            value = int(value) if kind == "int" else float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{option} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
    if kind == "float":
        return float(value)
    if isinstance(value, float) and not value.is_integer():  # also inf and nan
        raise UserError(f"{option} must be an integer, got {value!r}")
    return int(value)


def _parse_list(text, item, option: str) -> list:
    if isinstance(text, list | tuple) and not all(isinstance(t, str) for t in text):
        items = list(text)  # a file's list
    else:  # a flag's text, or a repeated flag's (one string per repeat): comma- or space-separated
        parts = text if isinstance(text, list | tuple) else [text]
        items = [t for p in parts for t in str(p).replace(",", " ").split()]
    if item is str:
        if not all(isinstance(t, str) for t in items):
            raise UserError(f"{option} {text!r} is not a list of strings")
        return items
    kind = "int" if item is int else "float"
    try:
        return [_number(kind, t, option) for t in items]
    except UserError:
        raise UserError(f"{option} {text!r} is not a comma-separated list of {item.__name__}s, e.g. 1,2,3") from None


def _convert(flag: Flag, value, source: str):
    """A value from the command line or a file -> the field's type; bad values (of any type, from a file)
    name the option."""
    optional = strip_optional(flag.tp) is not flag.tp
    option = flag.option if source == "flag" else f"'{'.'.join(flag.key)}' in {source}"
    if value is None:  # a file's null
        if not optional:
            raise UserError(f"{option} cannot be null; give a value or remove the key to use the default")
        return None
    if source == "flag" and optional and value == "null":  # a flag that clears what the file set
        return None
    tp = strip_optional(flag.tp)
    if flag.kind == "choice":
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"{option} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if flag.kind == "list":
        return _parse_list(value, typing.get_args(tp)[0], option)
    if flag.kind == "kwargs":
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            from pipeline.models import parse_kwargs
            return parse_kwargs(value)
        raise UserError(f"{option} must be a mapping of keyword arguments (name: value) or a list of "
                        f"name=value strings, got {value!r}")
    if flag.kind in ("int", "float"):
        return _number(flag.kind, value, option)
    if flag.kind == "bool":
        if not isinstance(value, bool):  # the string 'false' would be true
            raise UserError(f"{option} must be true or false, got {value!r}")
        return value
    if flag.kind == "path":
        if not isinstance(value, str | Path):
            raise UserError(f"{option} must be a path (a string), got {value!r}")
        return Path(value)
    recipe = flag.kind == "str" and any(dataclasses.is_dataclass(a) for a in typing.get_args(tp))
    if not isinstance(value, str) and not (recipe and isinstance(value, dict)):
        raise UserError(f"{option} must be a string{' or a mapping of its fields' if recipe else ''} (quote it in "
                        f"the file), got {value!r}")
    return value


def read_file(path: Path) -> dict:
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass an existing --config") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start}); pass a YAML or "
                        f"JSON file") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path} ({e.strerror or e}); pass a readable YAML file") from None
    except yaml.YAMLError as e:  # its message spans lines (the mark and a caret): one line here
        raise UserError(f"config file {path} is not valid YAML ({' '.join(str(e).split())}); fix it") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    return data


def file_values(data: dict, flags: list[Flag], path: Path) -> dict[tuple[str, ...], Any]:
    """File keys -> {option path: value}: nested by group, or (a flat file) by flag name."""
    known = {f.key: f for f in flags}
    by_dest = {f.dest: f for f in flags}
    groups = {f.key[:i] for f in flags for i in range(1, len(f.key))}
    out, unknown = {}, []

    def walk(d: dict, prefix: tuple[str, ...]):
        for k, v in d.items():
            p = (*prefix, str(k))
            if p in groups and isinstance(v, dict):
                walk(v, p)
            elif p in known:
                out[known[p].path] = v
            elif prefix == () and str(k) in by_dest:  # a flat file: the key is a flag's name
                out[by_dest[str(k)].path] = v
            elif not (prefix == () and k in OUTPUT_ONLY):
                unknown.append(repr(".".join(p)))  # quoted: a key may hold spaces, commas or line breaks

    walk(data, ())
    if unknown:
        raise UserError(f"config file {path} has unknown keys: {', '.join(unknown)}; see --help for the options")
    return out


def resolve(flags: list[Flag], given: dict[str, Any], config: Path | None, section: str | None = None,
            sections: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{option path: value}: command-line flags over the file over nothing (the dataclass defaults)."""
    data = read_file(config) if config else {}
    if section and any(k in sections for k in data):
        others = [k for k in data if k not in sections]
        if others:
            raise UserError(f"config file {config} mixes command sections with other keys ({', '.join(others)}); "
                            f"put every option under one of {', '.join(sections)}")
        data = data.get(section) or {}
    from_file = file_values(data, flags, config) if config else {}
    values = {}
    for f in flags:
        if f.dest in given:
            values[f.path] = _convert(f, given[f.dest], "flag")
        elif f.path in from_file:
            values[f.path] = _convert(f, from_file[f.path], str(config))
    return values


def instantiate(cls, values: dict[tuple[str, ...], Any], flags: list[Flag], prefix: tuple[str, ...] = (),
                mount_defaults: dict | None = None):
    """Build the (nested) configuration. A group none of whose options is given is its field's default;
    otherwise it is built from what is given over its mount's defaults over its class's. Missing
    required options are named as the command line spells them."""
    if not prefix:
        missing = [f.option for f in flags if f.required and f.path not in values]
        if missing:
            raise UserError(f"missing required option(s) {', '.join(missing)}: pass them as flags or in --config")
    hints = typing.get_type_hints(cls)
    kwargs = dict(mount_defaults or {})
    for f in dataclasses.fields(cls):
        p = (*prefix, f.name)
        sub = strip_optional(hints[f.name])
        if dataclasses.is_dataclass(sub) and f.metadata.get("cli") is not False:
            if any(k[:len(p)] == p for k in values):
                kwargs[f.name] = instantiate(sub, values, flags, p, f.metadata.get("group", _TOP)["defaults"])
        elif p in values:
            kwargs[f.name] = values[p]
    return cls(**kwargs)


def build(cls, **flags):
    """A configuration from flag names, as the command line would build it: `build(CacheConfig,
    data=..., teacher="resnet50", pretrained_file=..., epochs=2)` (the Python callers' short form)."""
    table = flags_of(cls)
    by_dest = {f.dest: f for f in table}
    unknown = sorted(set(flags) - set(by_dest))
    if unknown:
        raise TypeError(f"{cls.__name__} has no options {unknown}")
    return instantiate(cls, {by_dest[k].path: v for k, v in flags.items()}, table)


def to_plain(cfg, flags: list[Flag] | None = None) -> dict:
    """The options of a configuration as plain, nested YAML/JSON data (paths as strings): what
    --print-config shows and what --config reads back."""
    out: dict = {}
    for f in flags if flags is not None else flags_of(type(cfg)):
        v = cfg
        for p in f.path:
            v = getattr(v, p)
        d = out
        for p in f.key[:-1]:
            d = d.setdefault(p, {})
        d[f.key[-1]] = json.loads(json.dumps(dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v,
                                              default=str))
    return out


def command_from(cls, run, section: str | None = None, sections: tuple[str, ...] = ()):
    """A typer callback taking every option of `cls` as a flag (or argument), plus --config and
    --print-config; it builds the configuration and calls `run(config)`."""
    flags = flags_of(cls)

    def callback(ctx: typer.Context, **kwargs):
        config, print_config = kwargs.pop("config"), kwargs.pop("print_config")
        given = {k: v for k, v in kwargs.items() if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"}
        cfg = instantiate(cls, resolve(flags, given, config, section, sections), flags)
        if print_config:
            import yaml
            print(yaml.safe_dump(to_plain(cfg, flags), sort_keys=False), end="")
            return
        run(cfg)

    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    params += [inspect.Parameter(f.dest, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_annotation(f),
                                 default=inspect.Parameter.empty if f.required else None)
               for f in flags if f.argument]
    panels = getattr(cls, "panels", ())  # the --help panels in this order (typer lists them as first met)
    listed = sorted((f for f in flags if not f.argument),
                    key=lambda f: panels.index(f.panel) if f.panel in panels else len(panels))
    params += [inspect.Parameter(f.dest, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_annotation(f))
               for f in listed]
    params += [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Path | None, typer.Option("--config", rich_help_panel=getattr(cls, "config_panel", None),
                                  help="YAML file of options (a run's config.json works too); flags given here "
                                       "override it")]),
               inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
                   bool, typer.Option("--print-config", help="print the resolved configuration and exit",
                                      rich_help_panel=getattr(cls, "config_panel", None))])]
    callback.__signature__ = inspect.Signature(params)
    callback.__annotations__ = {p.name: p.annotation for p in params}
    callback.__doc__ = run.__doc__
    return callback


def override(cfg, data: dict, source: str):
    """A copy of a configuration with the options in `data` (a --config mapping: nested by group or flat by flag
    name) over its own; `source` names `data` in messages. What `train-student --runs` builds each run from."""
    flags = flags_of(type(cfg))
    values = {p: _convert(f, v, "the base options")
              for p, v in file_values(to_plain(cfg, flags), flags, "the base options").items()
              for f in flags if f.path == p}
    values |= {p: _convert(f, v, source) for p, v in file_values(data, flags, source).items()
               for f in flags if f.path == p}
    return instantiate(type(cfg), values, flags)
