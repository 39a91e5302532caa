"""What C{python -m llmnode check} adds to validation: where in the file each finding is, and
whether each plan's script can start its program on this machine.

Validation (L{llmnode.config}) names a finding by its YAML path; an operator editing the file
wants the line too. And a config can be valid while its C{script_path} names a program that is
not installed or not executable, which only shows when a request first starts the model.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Mapping, Optional

import yaml

from llmnode.config import Config, Model, Plan
from llmnode.launcher.supervisor import last_command

_POSITION = re.compile(r"line (\d+), column \d+: ")
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def key_lines(text: str) -> dict[str, int]:
    """The line (from 1) of every key and list item of YAML C{text}, by its YAML path as the
    config's messages write it (C{Local-Models.chat.CPU.memory_mb}, C{...aliases[0]}); C{{}}
    when the text is not YAML."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    child = f"{path}.{key.value}" if path else key.value
                    lines.setdefault(child, key.start_mark.line + 1)
                    walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                child = f"{path}[{index}]"
                lines.setdefault(child, item.start_mark.line + 1)
                walk(item, child)

    if root is not None:
        walk(root, "")
    return lines


def line_of(message: str, lines: Mapping[str, int]) -> Optional[int]:
    """The line a config message (C{"PATH: text"}) is about: its YAML path's, else the nearest
    enclosing key's; line 1 for the top level; None when the file has no such place."""
    position = _POSITION.match(message)
    if position:
        return int(position.group(1))
    if message.startswith("(top level): "):
        return 1
    found = None
    at = message.find(": ")
    while at >= 0:
        path = message[:at]
        while path and path not in lines:
            path = path.rpartition(".")[0]
        if path:
            found = lines[path]
        at = message.find(": ", at + 1)
    return found


def script_problems(config: Config, lines: Mapping[str, int],
                    environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """One message per plan whose script's program does not exist, is not executable or is not
    on C{PATH}, prefixed with the plan's C{script_path} YAML path.

    @param lines: L{key_lines} of the file, which tell its layout (models under
        C{Local-Models}, or at the top level).

    The program is the last command's (C{cd models && llama-server ...} -> C{llama-server}),
    with the variables a backend gets (C{$LLMNODE_PYTHON}, the plan's C{env}) expanded. A
    script too involved to tell (a pipeline, C{$(...)}, several lines), or whose program word
    uses an unknown variable, is not judged.
    """
    found = []
    for model in config.models:
        for plan in model.plans:
            problem = _program_problem(plan, model, config.base_dir,
                                       os.environ if environ is None else environ)
            if problem:
                path = f"{model.id}.{plan.name}.script_path"
                if path not in lines:
                    path = "Local-Models." + path
                found.append(f"{path}: {problem}")
    return found


def _expand(word: str, env: Mapping[str, str]) -> Optional[str]:
    """C{word} with C{$NAME} and C{${NAME}} replaced from C{env}; None if one is not set (or
    the word uses other expansions)."""
    names = [a or b for a, b in _VARIABLE.findall(word)]
    if any(name not in env for name in names):
        return None
    expanded = _VARIABLE.sub(lambda m: env[m.group(1) or m.group(2)], word)
    return None if "$" in _VARIABLE.sub("", word) else expanded


def _program_problem(plan: Plan, model: Model, base_dir: str,
                     environ: Mapping[str, str]) -> Optional[str]:
    last = last_command(plan.script_path)
    if last is None or last[2] == "exec":
        return None
    start, _, word = last
    env = dict(environ, LLMNODE_MODEL=model.id, LLMNODE_PORT=str(model.port))
    env.setdefault("LLMNODE_PYTHON", sys.executable)
    env.update(plan.env)
    program = _expand(word, env)
    if not program:
        return None
    if "/" not in program:
        if shutil.which(program, path=env.get("PATH", os.defpath)) is None:
            return f"program {program!r} is not on PATH"
        return None
    if start > 0 and not os.path.isabs(program):
        return None  # an earlier command (cd ...) may change what the path means
    path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(program)))
    if not os.path.exists(path):
        return f"program {program!r} does not exist ({path})"
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        return f"program {program!r} is not executable ({path})"
    return None
