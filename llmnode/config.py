"""The node's configuration: YAML in, frozen value objects out.

Every problem in a file is reported at once, each with the YAML path of the bad value
(C{Local-Models.Qwen-14B.Standard-Config.memory_mb: expected a mapping ...}); unknown keys are
warnings with a "did you mean" suggestion.

Two layouts load to the same models: the seed layout (C{program:} plus a C{Local-Models:}
mapping of model id to model) and the original project's layout (models as top-level keys
beside C{program}). A model mapping's keys are the model keys below; any other key whose value
is a mapping with C{required_devices} is a hardware plan (tried in file order).

Each key is declared once, as a field of L{Program}, L{Model} or L{Plan} (see L{_key}):
its default, meaning and reader; L{PROGRAM_KEYS}, L{MODEL_KEYS} and L{PLAN_KEYS} (name ->
L{KeyDoc}) are read from those fields, and README's tables are checked against them by the
tests. Relative paths are taken against the config file's folder. A string
C{${env:NAME}} in C{api_keys}, C{admin_api_keys} or a plan's C{env} values is replaced by the
environment variable NAME.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, cast

import yaml

#: The endpoints a model can serve: name (as a model's C{endpoints} list writes it) -> what
#: it is called in messages, with its paths.
ENDPOINTS = {
    "chat": "chat completions (/v1/chat/completions)",
    "completions": "completions (/v1/completions)",
    "embeddings": "embeddings (/v1/embeddings)",
    "rerank": "rerank (/v1/rerank)",
    "responses": "responses (/v1/responses)",
    "messages": "messages (/v1/messages, /v1/messages/count_tokens)",
    "completion": "llama.cpp completion (/completion)",
    "infill": "llama.cpp infill (/infill)",
    "tokenize": "llama.cpp tokenize (/tokenize, /detokenize)",
    "transcriptions": "audio transcriptions (/v1/audio/transcriptions)",
    "translations": "audio translations (/v1/audio/translations)",
    "speech": "audio speech (/v1/audio/speech)",
    "image_generations": "image generations (/v1/images/generations)",
    "image_edits": "image edits (/v1/images/edits)",
}

_NATIVE = frozenset({"completion", "infill", "tokenize"})

#: The endpoints each model mode serves (README.rst, *Endpoints by model*).
MODES = {
    "Chat": frozenset({"chat", "completions", "responses", "messages"}) | _NATIVE,
    "Base": frozenset({"completions"}) | _NATIVE,
    "Embedding": frozenset({"embeddings"}),
    "Reranker": frozenset({"rerank"}),
    "Audio": frozenset({"transcriptions", "translations"}),
    "Speech": frozenset({"speech"}),
    "Image": frozenset({"image_generations", "image_edits"}),
}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")


class FrozenMapping(Mapping[str, Any]):
    """A read-only, hashable mapping, so value objects holding one stay hashable."""

    __slots__ = ("_items",)

    def __init__(self, mapping: Optional[Mapping[str, Any]] = None) -> None:
        self._items = dict(mapping or {})

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._items == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMapping({self._items!r})"


def _frozen(mapping: Optional[Mapping[str, Any]] = None) -> Mapping[str, Any]:
    return FrozenMapping(mapping)


@dataclass(frozen=True)
class Config:
    """A loaded configuration file.

    @ivar base_dir: the folder of the config file; scripts run there.
    @ivar warnings: non-fatal findings (unknown keys, with suggestions).
    """

    program: Program
    models: tuple[Model, ...]
    path: Optional[str] = None
    base_dir: str = "."
    warnings: tuple[str, ...] = ()

    def resolve(self, name: str) -> Optional[Model]:
        """The model whose id or alias is C{name} (case-sensitive), or None."""
        for model in self.models:
            if name in model.names:
                return model
        return None


class ConfigError(Exception):
    """A configuration file is invalid.

    @ivar problems: one line per problem, each prefixed with its YAML path.
    @ivar warnings: the non-fatal findings made on the way.
    """

    def __init__(self, problems: Iterable[str], warnings: Iterable[str] = ()) -> None:
        self.problems = list(problems)
        self.warnings = list(warnings)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


@dataclass(frozen=True)
class KeyDoc:
    """One config key as declared (see L{_key}): its default (as written in YAML), meaning,
    the default as the README's tables show it, and the reader the checker converts its
    value with."""

    default: Any
    meaning: str
    required: bool = False
    shown: str = ""
    read: Optional[Reader] = field(default=None, compare=False, repr=False)


#: Program keys that were renamed: old name -> new name (the old one is read, with a warning).
RENAMED_PROGRAM_KEYS: Mapping[str, str] = FrozenMapping({"placement_wait": "queue_timeout"})


_TOP = "(top level)"
_DOC = "llmnode.config.key"
_ENV_REF = re.compile(r"\$\{env:([^}]*)\}")
_BAD = object()


def load_config(path: str, environ: Optional[Mapping[str, str]] = None) -> Config:
    """Read and validate the file at C{path}.

    @raise OSError: the file cannot be read.
    @raise ConfigError: the file is invalid (every problem at once).
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{_TOP}: the file is not UTF-8 text ({e.reason} at byte "
                           f"{e.start})"])
    absolute = os.path.abspath(path)
    return parse_config(text, path=absolute, base_dir=os.path.dirname(absolute),
                        environ=environ)


def parse_config(text: str, path: Optional[str] = None, base_dir: str = ".",
                 environ: Optional[Mapping[str, str]] = None) -> Config:
    """Validate YAML C{text}; relative paths are taken against C{base_dir}.

    @param environ: the environment for C{${env:NAME}}; default C{os.environ}.
    @raise ConfigError: the text is invalid (every problem at once).
    """
    checker = _Checker(os.path.abspath(base_dir),
                       os.environ if environ is None else environ)
    config = checker.check(text, path)
    if config.program.strict_config and checker.warnings:
        checker.problems.extend(f"{warning} (an error: program.strict_config is on)"
                                for warning in checker.warnings)
    if checker.problems:
        raise ConfigError(checker.problems, checker.warnings)
    return config


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _got(value: object) -> str:
    if isinstance(value, (bool, int, float, str)):
        return f"got {_kind(value)} ({_shown(value)})"
    return f"got {_kind(value)}"


def _join(path: str, key: object) -> str:
    return str(key) if not path else f"{path}.{key}"


def _suggest(key: object, known: Iterable[str]) -> str:
    lowered = {k.lower(): k for k in known}
    match = difflib.get_close_matches(str(key).lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[match[0]]!r}?)" if match else ""


def _duplicate_keys(node: yaml.Node, path: str = "") -> Iterator[str]:
    """Problems for keys written twice in one mapping (PyYAML keeps the last silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in seen:
                    yield (f"{_join(path, key)}: key written twice (lines {seen[key]} "
                           f"and {line}); only the last would count")
                else:
                    seen[key] = line
                yield from _duplicate_keys(value_node, _join(path, key))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, f"{path}[{index}]")


class _Checker:
    """Collects every problem and warning while turning parsed YAML into value objects."""

    def __init__(self, base_dir: str, environ: Mapping[str, str]) -> None:
        self.base_dir = base_dir
        self.environ = environ
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")

    def unknown(self, path: str, key: object, known: Iterable[str]) -> None:
        self.warn(_join(path, key), "unknown key" + _suggest(key, known))

    # -- document ---------------------------------------------------------------------

    def check(self, text: str, path: Optional[str]) -> Config:
        data = self.parse_yaml(text)
        program = Program()
        models: list[tuple[str, Model]] = []
        if data is _BAD:
            pass
        elif data is None:
            self.problem(_TOP, "the document is empty; expected a mapping with 'program' "
                               "and 'Local-Models'")
        elif not isinstance(data, dict):
            self.problem(_TOP, f"expected a mapping with 'program' and 'Local-Models', "
                               f"{_got(data)}")
        else:
            program = self.program(data.get("program"))
            models = self.all_models(data)
            self.cross_check(program, models)
        return Config(program=program, models=tuple(m for _, m in models),
                      path=path, base_dir=self.base_dir, warnings=tuple(self.warnings))

    def parse_yaml(self, text: str) -> Any:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            duplicates = list(_duplicate_keys(node))
            if duplicates:
                self.problems.extend(duplicates)
                return _BAD
            return loader.construct_document(node)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else _TOP
            detail = e.problem or "invalid YAML"
            if e.context:
                detail = f"{detail} ({e.context})"
            self.problem(where, f"YAML syntax error: {detail}")
        except yaml.YAMLError as e:
            self.problem(_TOP, f"YAML error: {str(e)[:200]}")
        finally:
            loader.dispose()
        return _BAD

    def all_models(self, data: dict[Any, Any]) -> list[tuple[str, Model]]:
        models = []
        section = data.get("Local-Models")
        if "Local-Models" in data and section is not None:
            if isinstance(section, dict):
                for model_id, body in section.items():
                    model = self.model(_join("Local-Models", model_id), model_id, body)
                    if model is not _BAD:
                        models.append((_join("Local-Models", model_id), model))
            else:
                self.problem("Local-Models", f"expected a mapping of model id to model, "
                                             f"{_got(section)}")
        for key, body in data.items():
            if key in ("program", "Local-Models"):
                continue
            if _looks_like_model(body):
                model = self.model(str(key), key, body)
                if model is not _BAD:
                    models.append((str(key), model))
            else:
                self.unknown("", key, ("program", "Local-Models"))
        if not models and not self.problems:
            self.warn("Local-Models", "no models configured; the node will serve nothing")
        return models

    # -- sections ---------------------------------------------------------------------

    def fields(self, path: str, body: dict[Any, Any],
               keys: Mapping[str, KeyDoc]) -> Optional[dict[str, Any]]:
        """Read C{keys} from C{body}, each with its reader; None when any is bad."""
        values: dict[str, Any] = {}
        ok = True
        for key, doc in keys.items():
            if key not in body:
                if doc.required:
                    self.problem(path, f"missing required key {key!r}")
                    ok = False
                continue
            value = cast(Reader, doc.read)(self, _join(path, key), body[key])  # declared by _key
            if value is _BAD:
                ok = False
            else:
                values[key] = value
        return values if ok else None

    def program(self, body: Any) -> Program:
        path = "program"
        if body is None:
            body = {}
        if not isinstance(body, dict):
            self.problem(path, f"expected a mapping, {_got(body)}")
            return Program()
        for key in body:
            if key not in PROGRAM_KEYS and key not in RENAMED_PROGRAM_KEYS:
                self.unknown(path, key, PROGRAM_KEYS)
        body = dict(body)
        for old, new in RENAMED_PROGRAM_KEYS.items():
            if old not in body:
                continue
            value = body.pop(old)
            if new in body:
                self.warn(_join(path, old), f"ignored: renamed to {new}, which is set too")
            else:
                self.warn(_join(path, old), f"renamed to {new}; read as {new}")
                body[new] = value
        values = self.fields(path, body, PROGRAM_KEYS)
        if values is None:
            return Program()
        for key in ("device_plugin_dir", "log_dir", "runtime_dir"):
            if values.get(key) is not None:
                values[key] = self.absolute(values[key])
        log_dir = values.setdefault("log_dir", self.absolute(Program.log_dir))
        if values.get("runtime_dir") is None:
            values["runtime_dir"] = default_runtime_dir(log_dir)
        return Program(**values)

    def absolute(self, value: str) -> str:
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value)))

    def model(self, path: str, model_id: Any, body: Any) -> Any:
        ok = True
        if not isinstance(model_id, str):
            self.problem(path, f"a model id must be a string, {_got(model_id)}")
            ok = False
        elif _name(self, path, model_id, "model id") is _BAD:
            ok = False
        if not isinstance(body, dict):
            self.problem(path, f"expected a mapping (the model's settings), {_got(body)}")
            return _BAD
        plans, saw_plan = [], False
        for key, value in body.items():
            if key in MODEL_KEYS:
                continue
            key_path = _join(path, key)
            if isinstance(value, dict):
                saw_plan = True
                if "required_devices" in value:
                    plan = self.plan(key_path, key, value)
                    if plan is _BAD:
                        ok = False
                    else:
                        plans.append(plan)
                else:
                    self.problem(key_path, "a mapping here is read as a hardware plan, but "
                                           "it has no required_devices"
                                 + _suggest(key, MODEL_KEYS))
                    ok = False
            else:
                self.unknown(path, key, MODEL_KEYS)
        values = self.fields(path, body, MODEL_KEYS)
        if values is None:
            ok = False
        if not saw_plan:
            self.problem(path, "no hardware plan (a mapping with required_devices and "
                               "script_path)")
            ok = False
        if not ok:
            return _BAD
        return Model(id=model_id, plans=tuple(plans), **cast("dict[str, Any]", values))

    def plan(self, path: str, name: Any, body: dict[Any, Any]) -> Any:
        ok = True
        if not isinstance(name, str) or not name:
            self.problem(path, f"a plan name must be a non-empty string, {_got(name)}")
            ok = False
        for key in body:
            if key not in PLAN_KEYS:
                self.unknown(path, key, PLAN_KEYS)
        values = self.fields(path, body, PLAN_KEYS)
        if values is None:
            ok, values = False, {}
        devices = values.get("required_devices")
        memory = values.get("memory_mb")
        if devices is not None and memory:
            for device in memory:
                if device not in devices:
                    self.problem(_join(_join(path, "memory_mb"), device),
                                 f"device {device!r} is not in required_devices "
                                 f"{list(devices)}")
                    ok = False
        if not ok:
            return _BAD
        return Plan(name=name, **values)

    # -- across models ----------------------------------------------------------------

    def cross_check(self, program: Program, models: list[tuple[str, Model]]) -> None:
        owners: dict[str, tuple[str, str]] = {}
        ports: dict[int, str] = {}
        for path, model in models:
            for index, name in enumerate(model.names):
                where = path if index == 0 else f"{path}.aliases[{index - 1}]"
                if name in owners:
                    other_id, other_path = owners[name]
                    if other_path == path:
                        self.problem(where, f"name {name!r} is listed twice for model "
                                            f"{model.id!r}")
                    else:
                        self.problem(where, f"name {name!r} is already used by model "
                                            f"{other_id!r} ({other_path}); ids and aliases "
                                            f"must be unique")
                else:
                    owners[name] = (model.id, path)
            port_path = _join(path, "port")
            if model.port == program.port:
                self.problem(port_path, f"port {model.port} is the node's own port "
                                        f"(program.port)")
            elif model.port in ports:
                self.problem(port_path, f"port {model.port} is also used by model "
                                        f"{ports[model.port]!r}")
            else:
                ports[model.port] = model.id

    def substitute(self, path: str, value: str) -> Any:
        """Replace each C{${env:NAME}} in C{value}; _BAD (reported) if one is unset."""
        missing = []

        def lookup(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.environ:
                missing.append(name)
                return ""
            return self.environ[name]

        result = _ENV_REF.sub(lookup, value)
        for name in missing:
            self.problem(path, f"environment variable {name!r} is not set"
                         if name else "empty variable name in ${env:}")
        return _BAD if missing else result


def _looks_like_model(body: Any) -> bool:
    return isinstance(body, dict) and (
        "mode" in body or any(isinstance(v, dict) and "required_devices" in v
                              for v in body.values()))


# -- readers: (checker, path, value) -> converted value, or _BAD after reporting ---------

Reader = Callable[[_Checker, str, Any], Any]


def _optional(reader: Reader) -> Reader:
    def read(checker: _Checker, path: str, value: Any) -> Any:
        return None if value is None else reader(checker, path, value)
    return read


def _number(minimum: float = 0.0, exclusive: bool = False,
            maximum: Optional[float] = None) -> Reader:
    def read(checker: _Checker, path: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            checker.problem(path, f"expected a number, {_got(value)}")
            return _BAD
        if not math.isfinite(value):
            checker.problem(path, f"expected a finite number, got {value}")
            return _BAD
        if value < minimum or (exclusive and value == minimum):
            bound = "greater than" if exclusive else "at least"
            checker.problem(path, f"must be {bound} {minimum:g}, got {value:g}")
            return _BAD
        if maximum is not None and value > maximum:
            checker.problem(path, f"must be at most {maximum:g}, got {value:g}")
            return _BAD
        return float(value)
    return read


def _integer(minimum: int, maximum: Optional[int] = None) -> Reader:
    def read(checker: _Checker, path: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            checker.problem(path, f"expected a whole number, {_got(value)}")
            return _BAD
        if value < minimum or (maximum is not None and value > maximum):
            wanted = f"{minimum}-{maximum}" if maximum is not None else f">= {minimum}"
            checker.problem(path, f"must be {wanted}, got {value}")
            return _BAD
        return value
    return read


_port = _integer(1, 65535)


def _boolean(checker: _Checker, path: str, value: Any) -> Any:
    if not isinstance(value, bool):
        checker.problem(path, f"expected true or false, {_got(value)}")
        return _BAD
    return value


def _string(checker: _Checker, path: str, value: Any) -> Any:
    if not isinstance(value, str):
        checker.problem(path, f"expected a string, {_got(value)}")
        return _BAD
    if not value.strip():
        checker.problem(path, "must not be empty")
        return _BAD
    return value


def _name(checker: _Checker, path: str, value: Any, what: str = "name") -> Any:
    if _string(checker, path, value) is _BAD:
        return _BAD
    if "/" in value:
        checker.problem(path, f"{what} {value!r} must not contain '/' (it appears in URLs)")
        return _BAD
    return value


def _choice(choices: Iterable[str], canonical: Callable[[str], str]) -> Reader:
    def read(checker: _Checker, path: str, value: Any) -> Any:
        if isinstance(value, str):
            for choice in choices:
                if choice.lower() == value.lower():
                    return canonical(choice)
        checker.problem(path, f"expected one of {', '.join(choices)}, {_got(value)}")
        return _BAD
    return read


def _mode(checker: _Checker, path: str, value: Any) -> Any:
    if isinstance(value, str):
        for mode in MODES:
            if mode.lower() == value.strip().lower():
                return mode
    checker.problem(path, f"unknown mode {_shown(value)} (expected one of "
                          f"{', '.join(MODES)})")
    return _BAD


def _health_path(checker: _Checker, path: str, value: Any) -> Any:
    if _string(checker, path, value) is _BAD:
        return _BAD
    if not value.startswith("/"):
        checker.problem(path, f"must start with '/', got {_shown(value)}")
        return _BAD
    return value


def _string_list(item: Reader, what: str, nonempty: bool = False,
                 substitute: bool = False) -> Reader:
    def read(checker: _Checker, path: str, value: Any) -> Any:
        if value is None and not nonempty:
            return ()
        if not isinstance(value, list):
            checker.problem(path, f"expected a {'non-empty ' if nonempty else ''}list of "
                                  f"{what}, {_got(value)}")
            return _BAD
        if nonempty and not value:
            checker.problem(path, f"expected a non-empty list of {what}, got an empty list")
            return _BAD
        items, ok = [], True
        for index, element in enumerate(value):
            element_path = f"{path}[{index}]"
            element = item(checker, element_path, element)
            if element is not _BAD and substitute:
                element = checker.substitute(element_path, element)
                if element is not _BAD and not element:
                    checker.problem(element_path, "is empty after ${env:} substitution")
                    element = _BAD
            if element is _BAD:
                ok = False
            else:
                items.append(element)
        return tuple(items) if ok else _BAD
    return read


def _endpoints(checker: _Checker, path: str, value: Any) -> Any:
    names = _string_list(_string, "endpoint names", nonempty=True)(checker, path, value)
    if names is _BAD:
        return _BAD
    unknown = [name for name in names if name not in ENDPOINTS]
    if unknown:
        checker.problem(path, f"unknown endpoint {unknown[0]!r} (expected any of "
                              f"{', '.join(ENDPOINTS)})")
        return _BAD
    return frozenset(names)


def _param_name(checker: _Checker, path: str, value: Any) -> Any:
    if _string(checker, path, value) is _BAD:
        return _BAD
    if value == "model":
        checker.problem(path, "'model' routes the request and cannot be filtered (see "
                              "upstream_model)")
        return _BAD
    return value


def _params(checker: _Checker, path: str, value: Any) -> Any:
    if value is None:
        return _frozen()
    if not isinstance(value, dict):
        checker.problem(path, f"expected a mapping of parameter name to value, {_got(value)}")
        return _BAD
    ok = True
    for name in value:
        ok = _param_name(checker, _join(path, name), name) is not _BAD and ok
    return _frozen(value) if ok else _BAD


def _origin(checker: _Checker, path: str, value: Any) -> Any:
    if _string(checker, path, value) is _BAD:
        return _BAD
    if value != "*" and not re.fullmatch(r"https?://[^/\s]+", value, re.IGNORECASE):
        checker.problem(path, f"expected '*' or an origin like 'http://localhost:3000' "
                              f"(scheme and host, no path), got {_shown(value)}")
        return _BAD
    return value.lower() if value != "*" else value


def _memory(checker: _Checker, path: str, value: Any) -> Any:
    if value is None:
        return _frozen()
    if not isinstance(value, dict):
        checker.problem(path, f"expected a mapping of device name to MB, {_got(value)}")
        return _BAD
    result, ok = {}, True
    read = _number(0.0)
    for device, megabytes in value.items():
        entry_path = _join(path, device)
        if not isinstance(device, str) or not device.strip():
            checker.problem(entry_path, f"a device name must be a non-empty string, "
                                        f"{_got(device)}")
            ok = False
            continue
        megabytes = read(checker, entry_path, megabytes)
        if megabytes is _BAD:
            ok = False
        else:
            result[device] = megabytes
    return _frozen(result) if ok else _BAD


def _env(checker: _Checker, path: str, value: Any) -> Any:
    if value is None:
        return _frozen()
    if not isinstance(value, dict):
        checker.problem(path, f"expected a mapping of variable name to value, "
                              f"{_got(value)}")
        return _BAD
    result, ok = {}, True
    for name, setting in value.items():
        entry_path = _join(path, name)
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            checker.problem(entry_path, f"a variable name must be a non-empty string "
                                        f"without '=', {_got(name)}")
            ok = False
            continue
        if isinstance(setting, bool):
            setting = "true" if setting else "false"
        elif isinstance(setting, (int, float)):
            setting = str(setting)
        elif isinstance(setting, str):
            setting = checker.substitute(entry_path, setting)
        else:
            checker.problem(entry_path, f"expected a string, number or boolean, "
                                        f"{_got(setting)}")
            setting = _BAD
        if setting is _BAD:
            ok = False
        else:
            result[name] = setting
    return _frozen(result) if ok else _BAD


# -- the keys: each declared once, as a field of its value object -------------------------


def _key(meaning: str, read: Reader, default: Any = MISSING, *, shown: Optional[str] = None,
         hash: Optional[bool] = None) -> Any:
    """Declare a config key: a dataclass field with C{default} (none: the key is required)
    whose metadata hold the key's L{KeyDoc}, reader included.

    @param shown: the default as the README's tables write it, where the value does not say
        it (a default that is computed, or inherited from elsewhere).
    """
    required = default is MISSING
    doc = KeyDoc(None if required else _as_written(default), meaning, required=required,
                 shown=shown or ("(required)" if required else _written(default)), read=read)
    return field(default=default, hash=hash, metadata={_DOC: doc})


def _as_written(value: Any) -> Any:
    """A default as YAML writes it: lists and mappings instead of tuples and FrozenMappings."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _written(value: Any) -> str:
    """A default as the README's tables write it."""
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    return json.dumps(_as_written(value))


def _keys(cls: type) -> Mapping[str, KeyDoc]:
    """The config keys declared by the fields of C{cls}, in declaration order."""
    return FrozenMapping({f.name: f.metadata[_DOC] for f in fields(cls) if _DOC in f.metadata})


@dataclass(frozen=True)
class Plan:
    """One hardware plan of a model: what it needs and how to start it.

    @ivar memory_mb: device name (as written in required_devices) -> MB.
    """

    name: str
    required_devices: tuple[str, ...] = _key(
        "device ids or product-name parts the plan needs",
        _string_list(_string, "device names", nonempty=True))
    script_path: str = _key(
        "shell command line that starts the backend (run in the config file's folder)",
        _string)
    memory_mb: Mapping[str, float] = _key(
        "device name (from required_devices) -> MB reserved", _memory, _frozen())
    env: Mapping[str, str] = _key(
        "extra environment for the script; ${env:NAME} allowed", _env, _frozen())
    stop_command: Optional[str] = _key(
        "optional shell command run to stop the backend", _optional(_string), None)


@dataclass(frozen=True, kw_only=True)
class Model:
    """One model the node can serve. Times are in seconds except alive_time (minutes)."""

    id: str
    plans: tuple[Plan, ...]
    aliases: tuple[str, ...] = _key(
        "other names the model answers to (unique across models)",
        _string_list(lambda c, p, v: _name(c, p, v, "alias"), "strings"), ())
    mode: str = _key(
        "Chat, Base, Embedding, Reranker, Audio, Speech or Image: which endpoints the model "
        "serves", _mode)
    port: int = _key("port the backend listens on (1-65535, unique)", _port)
    auto_start: bool = _key("start the model when the node starts", _boolean, False)
    alive_time: Optional[float] = _key(
        "minutes idle before stop; default: program.alive_time; 0 = never",
        _optional(_number(0.0)), None, shown="program's")
    start_timeout: float = _key(
        "seconds a backend may take to become healthy", _number(0.0, exclusive=True), 300.0)
    health_path: Optional[str] = _key(
        "path probed for readiness; default: /health, falling back to /v1/models",
        _optional(_health_path), None, shown="/health")
    upstream_model: Optional[str] = _key(
        "rewrite the request's 'model' field to this", _optional(_string), None)
    stop_timeout: float = _key("seconds between SIGTERM and SIGKILL", _number(0.0), 10.0)
    max_concurrency: Optional[int] = _key(
        "most requests forwarded at once (positive); default: unlimited",
        _optional(_integer(1)), None, shown="unlimited")
    max_queue: int = _key(
        "most requests waiting in the model's queue (for a start, a turn or a concurrency "
        "slot); more get 429", _integer(0), 1000)
    endpoints: Optional[frozenset[str]] = _key(
        "the endpoints served, overriding the mode's (names: " + ", ".join(ENDPOINTS) + ")",
        _optional(_endpoints), None, shown="(mode's)")
    strip_params: tuple[str, ...] = _key(
        "keys removed from a JSON request body before it is forwarded",
        _string_list(_param_name, "parameter names"), ())
    # Values may be lists or mappings (unhashable): compared, not hashed.
    set_params: Mapping[str, Any] = _key(
        "keys set in a JSON request body before it is forwarded (replacing the client's)",
        _params, _frozen(), hash=False)
    default_params: Mapping[str, Any] = _key(
        "keys added to a JSON request body where the client sent none",
        _params, _frozen(), hash=False)
    priority: float = _key(
        "scheduling priority: each point counts as program.priority_step seconds of extra "
        "waiting", _number(-1e6), 0.0)
    turn_time: Optional[float] = _key(
        "fixed turn length in seconds for this model; default: derived (see "
        "program.turn_factor)", _optional(_number(0.0)), None, shown="(derived)")
    #: Whether a JSON body sent to the backend differs from the client's (C{upstream_model}
    #: or a parameter filter): one test on the proxy's path instead of four.
    edits_body: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "edits_body", bool(
            self.upstream_model is not None or self.strip_params or self.set_params
            or self.default_params))

    @property
    def names(self) -> tuple[str, ...]:
        """The id followed by every alias."""
        return (self.id,) + self.aliases

    @property
    def served(self) -> frozenset[str]:
        """The endpoints this model serves: its C{endpoints} list, else its mode's."""
        if self.endpoints is not None:
            return self.endpoints
        return MODES.get(self.mode, frozenset())

    def serves(self, endpoint: str) -> bool:
        """Whether this model serves C{endpoint} (a key of L{ENDPOINTS})."""
        if self.endpoints is not None:
            return endpoint in self.endpoints
        return endpoint in MODES.get(self.mode, ())

    def edit_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """C{body} as the backend gets it: C{strip_params} removed, C{default_params} added
        where absent, C{set_params} set, and the model renamed to C{upstream_model}."""
        for key in self.strip_params:
            body.pop(key, None)
        for key, value in self.default_params.items():
            body.setdefault(key, value)
        body.update(self.set_params)
        if self.upstream_model is not None:
            body["model"] = self.upstream_model
        return body


@dataclass(frozen=True)
class Program:
    """Node-wide settings (the C{program} section). Paths are absolute once loaded."""

    host: str = _key("address the node listens on", _string, "0.0.0.0")
    port: int = _key("port the node listens on (1-65535)", _port, 8080)
    log_level: str = _key("DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)",
                          _choice(LOG_LEVELS, str.upper), "INFO")
    log_format: str = _key("log line format: text or json", _choice(LOG_FORMATS, str.lower),
                           "text")
    alive_time: float = _key(
        "minutes a model may stay idle before it is stopped (fractions ok); 0 = never",
        _number(0.0), 30.0)
    device_plugin_dir: Optional[str] = _key(
        "optional folder of extra device plugins (*.py)", _optional(_string), None)
    log_dir: str = _key("folder for the node's and the backends' logs", _string, "logs")
    runtime_dir: Optional[str] = _key(
        "folder for runtime state; default: a 'run' folder beside log_dir",
        _optional(_string), None, shown="run")
    max_body_mb: float = _key("largest request body accepted, in MB",
                              _number(0.0, exclusive=True), 64.0)
    health_interval: float = _key(
        "seconds between health probes of a starting backend (> 0, <= 1)",
        _number(0.0, exclusive=True, maximum=1.0), 0.05)
    stream_idle_timeout: float = _key(
        "seconds a backend stream may stay silent before it is aborted",
        _number(0.0, exclusive=True), 300.0)
    backend_header_timeout: float = _key(
        "seconds to wait for a backend's response headers", _number(0.0, exclusive=True),
        600.0)
    queue_timeout: float = _key(
        "seconds a request may wait in its model's queue for other models' turns and memory "
        "before a 503 (0 = fail at once; waiting for its own model to load is bounded by "
        "start_timeout instead)", _number(0.0), 600.0)
    turn_factor: float = _key(
        "a busy model keeps its turn for this many times the swap it would cost (its stop "
        "plus the waiting model's load, as measured)", _number(0.0), 2.0)
    turn_min: float = _key("shortest turn, in seconds", _number(0.0), 2.0)
    turn_max: float = _key("longest turn, in seconds", _number(0.0, exclusive=True), 60.0)
    turn_time: Optional[float] = _key(
        "fixed turn length in seconds for every model, instead of deriving it from swap "
        "costs", _optional(_number(0.0)), None, shown="(derived)")
    priority_step: float = _key(
        "seconds of waiting that one point of a model's priority is worth", _number(0.0),
        10.0)
    idle_grace: float = _key(
        "seconds with nothing in flight after which a model within its turn counts as idle "
        "and makes room at once (shorter gaps are clients between two requests)",
        _number(0.0), 0.25)
    memory_margin: float = _key(
        "a plan without memory_mb is placed by its learned peak times 1 + memory_margin",
        _number(0.0), 0.1)
    connect_burst: int = _key(
        "most connections being opened to one backend at once; further requests wait for "
        "one of them or for a kept-alive connection", _integer(1), 4)
    shutdown_timeout: float = _key(
        "seconds the node drains in-flight requests when stopping", _number(0.0), 30.0)
    body_timeout: float = _key(
        "seconds a client may take to send a request body, from the end of its headers (408 "
        "after that)", _number(0.0, exclusive=True), 300.0)
    api_keys: tuple[str, ...] = _key(
        "keys required as 'Authorization: Bearer KEY' on /v1 and /rerank, and on /api and "
        "/metrics too while admin_api_keys is empty; none = no key needed; ${env:NAME} "
        "allowed", _string_list(_string, "strings", substitute=True), ())
    admin_api_keys: tuple[str, ...] = _key(
        "keys required as 'Authorization: Bearer KEY' on /api and /metrics (not on /v1); "
        "empty = api_keys apply there; ${env:NAME} allowed",
        _string_list(_string, "strings", substitute=True), ())
    open_health: bool = _key("serve the health endpoint without a key", _boolean, True)
    metrics_auth: bool = _key("require a key for the metrics endpoint", _boolean, True)
    cors_origins: tuple[str, ...] = _key(
        "browser origins allowed to call the node (CORS), e.g. ['http://localhost:3000'], or "
        "['*'] for any; empty = no CORS headers, preflights refused",
        _string_list(_origin, "origins"), ())
    strict_config: bool = _key(
        "treat warnings (unknown keys) as errors: the node refuses such a file at start and "
        "on reload", _boolean, False)

    @property
    def runtime_folder(self) -> str:
        """C{runtime_dir}, or its default where it is unset (a Program not read from a file)."""
        return self.runtime_dir or default_runtime_dir(self.log_dir)

    def with_log_dir(self, log_dir: str) -> Program:
        """This program writing its logs to C{log_dir}; a defaulted C{runtime_dir} moves
        along (it stays beside the log folder), a configured one stays."""
        runtime_dir = self.runtime_dir
        if runtime_dir == default_runtime_dir(self.log_dir):
            runtime_dir = default_runtime_dir(log_dir)
        return replace(self, log_dir=log_dir, runtime_dir=runtime_dir)


def default_runtime_dir(log_dir: str) -> str:
    """Where runtime state goes when C{program.runtime_dir} is unset: a C{run} folder beside
    the log folder."""
    return os.path.join(os.path.dirname(log_dir), "run")


PROGRAM_KEYS: Mapping[str, KeyDoc] = _keys(Program)
MODEL_KEYS: Mapping[str, KeyDoc] = _keys(Model)
PLAN_KEYS: Mapping[str, KeyDoc] = _keys(Plan)
