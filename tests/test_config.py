"""Tests for llmnode.config (loading, validation) and the `python -m llmnode check` CLI."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

import llmnode
from llmnode.__main__ import main
from llmnode.config import (
    MODEL_KEYS, PLAN_KEYS, PROGRAM_KEYS, Config, ConfigError, Model, Plan, Program,
    load_config, parse_config)

EXAMPLE = """\
program: {host: 127.0.0.1, port: 8080, alive_time: 10, log_dir: logs}
Local-Models:
  demo-chat:
    aliases: [gpt-3.5-turbo, demo]
    mode: Chat
    port: 18101
    CPU:
      required_devices: [cpu]
      script_path: '"$LLMNODE_PYTHON" -m llmnode.demo.backend --port "$LLMNODE_PORT"'
      memory_mb: {cpu: 64}
"""

PLAN = """\
    CPU:
      required_devices: [cpu]
      script_path: run.sh
"""


def model(name="m1", port=18101, extra="", plan=PLAN, indent="  "):
    """YAML for one model under Local-Models (indent 2) with C{extra} model lines."""
    body = f"{name}:\n  mode: Chat\n  port: {port}\n" + textwrap.indent(
        textwrap.dedent(extra), "  ") + textwrap.indent(textwrap.dedent(plan), "  ")
    return textwrap.indent(body, indent)


def seed(*models, program=""):
    return f"program:\n{textwrap.indent(textwrap.dedent(program), '  ')}" \
           f"Local-Models:\n" + "".join(models)


class ConfigTestCase(SynchronousTestCase):

    def problems(self, text, environ=None):
        """The problems parse_config reports for C{text} (fails if it loads)."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(text, base_dir="/srv/node", environ=environ or {})
        error = caught.exception
        self.assertEqual(str(error).splitlines(), error.problems)
        return error.problems

    def assertProblem(self, text, path, *fragments, environ=None):
        """Some problem for C{text} starts with C{path: } and contains every fragment."""
        found = self.problems(text, environ)
        for line in found:
            if line.startswith(f"{path}: ") and all(f in line for f in fragments):
                return found
        self.fail(f"no problem at {path!r} with {fragments!r} in:\n" + "\n".join(found))

    def load(self, text, environ=None) -> Config:
        return parse_config(text, base_dir="/srv/node", environ=environ or {})


class ValidConfigTests(ConfigTestCase):

    def test_example_file_loads_cleanly(self):
        path = self.mktemp()
        os.makedirs(path)
        filename = os.path.join(path, "config.yaml")
        with open(filename, "w") as f:
            f.write(EXAMPLE)
        config = load_config(filename)
        folder = os.path.abspath(path)
        self.assertEqual(config.warnings, ())
        self.assertEqual(config.base_dir, folder)
        self.assertEqual(config.path, os.path.abspath(filename))
        self.assertEqual(config.program.host, "127.0.0.1")
        self.assertEqual(config.program.alive_time, 10)
        self.assertEqual(config.program.log_dir, os.path.join(folder, "logs"))
        self.assertEqual(config.program.runtime_dir, os.path.join(folder, "run"))
        [demo] = config.models
        self.assertEqual(demo.names, ("demo-chat", "gpt-3.5-turbo", "demo"))
        self.assertEqual(config.resolve("demo"), demo)
        self.assertEqual(demo.plans, (Plan(
            name="CPU", required_devices=("cpu",),
            script_path='"$LLMNODE_PYTHON" -m llmnode.demo.backend --port "$LLMNODE_PORT"',
            memory_mb={"cpu": 64}),))
        self.assertEqual(hash(demo), hash(demo))

    def test_defaults(self):
        config = self.load(seed(model()))
        self.assertEqual(config.program, Program(
            log_dir="/srv/node/logs", runtime_dir="/srv/node/run"))
        program = config.program
        self.assertEqual(
            (program.host, program.port, program.log_level, program.alive_time,
             program.device_plugin_dir, program.max_body_mb, program.health_interval,
             program.stream_idle_timeout, program.backend_header_timeout,
             program.queue_timeout, program.api_keys, program.admin_api_keys,
             program.open_health, program.shutdown_timeout, program.log_format,
             program.metrics_auth, program.turn_factor, program.turn_min, program.turn_max,
             program.turn_time, program.priority_step, program.connect_burst),
            ("0.0.0.0", 8080, "INFO", 30.0, None, 64.0, 0.05, 300.0, 600.0, 600.0, (), (),
             True, 30.0, "text", True, 2.0, 2.0, 60.0, None, 10.0, 4))
        [m] = config.models
        self.assertEqual(m, Model(id="m1", mode="Chat", port=18101, plans=(
            Plan(name="CPU", required_devices=("cpu",), script_path="run.sh"),)))
        self.assertEqual(
            (m.aliases, m.auto_start, m.alive_time, m.start_timeout, m.health_path,
             m.upstream_model, m.stop_timeout, m.max_concurrency, m.max_queue, m.priority,
             m.turn_time),
            ((), False, None, 300.0, None, None, 10.0, None, 1000, 0.0, None))
        self.assertEqual((m.plans[0].memory_mb, m.plans[0].env, m.plans[0].stop_command),
                         ({}, {}, None))

    def test_declared_keys(self):
        """The keys a section cannot do without are required; every key says what it is."""
        self.assertEqual({k for k, d in MODEL_KEYS.items() if d.required}, {"mode", "port"})
        self.assertEqual({k for k, d in PLAN_KEYS.items() if d.required},
                         {"required_devices", "script_path"})
        self.assertFalse([k for k, d in PROGRAM_KEYS.items() if d.required])
        for keys in (PROGRAM_KEYS, MODEL_KEYS, PLAN_KEYS):
            self.assertTrue(all(d.meaning for d in keys.values()))

    def test_every_key_set(self):
        config = self.load(seed(model(extra="""\
            aliases: [a1]
            auto_start: true
            alive_time: 0.5
            start_timeout: 20
            health_path: /v1/models
            upstream_model: real-name
            stop_timeout: 0
            max_concurrency: 2
            max_queue: 0
            priority: 2
            turn_time: 3
        """, plan="""\
            GPU:
              required_devices: [gpu0, cpu]
              script_path: run.sh --gpu
              memory_mb: {gpu0: 1000, cpu: 0}
              env: {A: x, N: 3, F: 1.5, B: true}
              stop_command: kill.sh
            CPU:
              required_devices: [cpu]
              script_path: run.sh
        """), program="""\
            host: ::1
            port: 9000
            log_level: debug
            log_format: JSON
            alive_time: 0
            device_plugin_dir: plugins
            log_dir: /var/log/llmnode
            runtime_dir: state
            max_body_mb: 0.5
            health_interval: 1
            stream_idle_timeout: 5
            backend_header_timeout: 6
            queue_timeout: 0
            turn_factor: 3
            turn_min: 1
            turn_max: 30
            turn_time: 5
            priority_step: 20
            connect_burst: 8
            shutdown_timeout: 0
            api_keys: [k1, k2]
            admin_api_keys: [adm]
            open_health: false
            metrics_auth: false
        """))
        self.assertEqual(config.warnings, ())
        self.assertEqual(config.program, Program(
            host="::1", port=9000, log_level="DEBUG", log_format="json", alive_time=0.0,
            device_plugin_dir="/srv/node/plugins", log_dir="/var/log/llmnode",
            runtime_dir="/srv/node/state", max_body_mb=0.5, health_interval=1.0,
            stream_idle_timeout=5.0, backend_header_timeout=6.0, queue_timeout=0.0,
            turn_factor=3.0, turn_min=1.0, turn_max=30.0, turn_time=5.0, priority_step=20.0,
            connect_burst=8,
            shutdown_timeout=0.0, api_keys=("k1", "k2"), admin_api_keys=("adm",),
            open_health=False, metrics_auth=False))
        [m] = config.models
        self.assertEqual(
            (m.aliases, m.auto_start, m.alive_time, m.start_timeout, m.health_path,
             m.upstream_model, m.stop_timeout, m.max_concurrency, m.max_queue, m.priority,
             m.turn_time),
            (("a1",), True, 0.5, 20.0, "/v1/models", "real-name", 0.0, 2, 0, 2.0, 3.0))
        self.assertEqual([p.name for p in m.plans], ["GPU", "CPU"])
        gpu = m.plans[0]
        self.assertEqual(gpu.required_devices, ("gpu0", "cpu"))
        self.assertEqual(dict(gpu.memory_mb), {"gpu0": 1000.0, "cpu": 0.0})
        self.assertEqual(dict(gpu.env), {"A": "x", "N": "3", "F": "1.5", "B": "true"})
        self.assertEqual(gpu.stop_command, "kill.sh")

    def test_runtime_dir_beside_log_dir(self):
        config = self.load(seed(model(), program="log_dir: var/logs/\n"))
        self.assertEqual(config.program.log_dir, "/srv/node/var/logs")
        self.assertEqual(config.program.runtime_dir, "/srv/node/var/run")

    def test_original_layout_equals_seed_layout(self):
        body = textwrap.dedent("""\
            aliases: [q]
            mode: Chat
            port: 10001
            Standard-Config:
              required_devices: ["rtx 4060"]
              script_path: scripts/run_qwen.sh
              memory_mb: {"rtx 4060": 12000}
            CPU-Config:
              required_devices: [cpu]
              script_path: scripts/run_cpu.sh
        """)
        embed = "mode: Embedding\nport: 10002\nE:\n  required_devices: [cpu]\n" \
                "  script_path: e.sh\n"
        seed_text = "program: {port: 8080}\nLocal-Models:\n  Qwen-14B:\n" \
            + textwrap.indent(body, "    ") + "  Embedder:\n" + textwrap.indent(embed, "    ")
        original = "program: {port: 8080}\nQwen-14B:\n" + textwrap.indent(body, "  ") \
            + "Embedder:\n" + textwrap.indent(embed, "  ")
        seed_config = self.load(seed_text)
        original_config = self.load(original)
        self.assertEqual(len(seed_config.models), 2)
        self.assertEqual(seed_config.models, original_config.models)
        self.assertEqual(original_config.warnings, ())

    def test_original_layout_model_without_mode_is_reported(self):
        """A top-level mapping holding a plan is a model, so a missing mode is an error."""
        self.assertProblem("P:\n  port: 1\n  X:\n    required_devices: [cpu]\n"
                           "    script_path: s\n", "P", "missing required key 'mode'")

    def test_mode_case_insensitive(self):
        config = self.load(seed(model(extra="")).replace("mode: Chat", "mode: reranker"))
        self.assertEqual(config.models[0].mode, "Reranker")
        self.assertTrue(config.models[0].serves("rerank"))

    def test_env_substitution(self):
        config = self.load(seed(model(plan="""\
            CPU:
              required_devices: [cpu]
              script_path: run.sh
              env: {TOKEN: "${env:HF}", MIX: "a-${env:HF}-${env:X}"}
        """), program="""\
            api_keys: ["${env:KEY1}", literal]
            admin_api_keys: ["${env:ADMIN}"]
        """), environ={"KEY1": "secret", "ADMIN": "root-key", "HF": "hf", "X": "y"})
        self.assertEqual(config.program.api_keys, ("secret", "literal"))
        self.assertEqual(config.program.admin_api_keys, ("root-key",))
        self.assertEqual(dict(config.models[0].plans[0].env), {"TOKEN": "hf", "MIX": "a-hf-y"})

    def test_env_substitution_defaults_to_process_environment(self):
        name = "LLMNODE_TEST_CONFIG_KEY"
        self.patch(os, "environ", {**os.environ, name: "from-env"})
        config = parse_config(seed(model(), program=f'api_keys: ["${{env:{name}}}"]\n'))
        self.assertEqual(config.program.api_keys, ("from-env",))

    def test_empty_node_warns(self):
        for text in ("program: {port: 8080}\n", "program: {}\nLocal-Models: {}\n",
                     "program:\nLocal-Models:\n"):
            config = self.load(text)
            self.assertEqual(config.models, ())
            self.assertEqual(len(config.warnings), 1)
            self.assertTrue(config.warnings[0].startswith("Local-Models: no models"),
                            config.warnings)

    def test_unknown_keys_warn_with_suggestion(self):
        config = self.load(seed(model(extra="aliasses: [x]\n", plan="""\
            CPU:
              required_devices: [cpu]
              script_path: run.sh
              memroy_mb: {cpu: 1}
        """), program="alive_tme: 5\nzzz: 1\n") + "Local-Model: {}\n")
        self.assertEqual(sorted(config.warnings), sorted([
            "program.alive_tme: unknown key (did you mean 'alive_time'?)",
            "program.zzz: unknown key",
            "Local-Models.m1.aliasses: unknown key (did you mean 'aliases'?)",
            "Local-Models.m1.CPU.memroy_mb: unknown key (did you mean 'memory_mb'?)",
            "Local-Model: unknown key (did you mean 'Local-Models'?)",
        ]))
        self.assertEqual(config.program.alive_time, 30.0)
        self.assertEqual(config.models[0].aliases, ())

    def test_strict_config_makes_warnings_errors(self):
        text = seed(model(extra="start_timout: 3\n"), program="strict_config: true\n")
        with self.assertRaises(ConfigError) as caught:
            self.load(text)
        self.assertEqual(caught.exception.problems, [
            "Local-Models.m1.start_timout: unknown key (did you mean 'start_timeout'?) "
            "(an error: program.strict_config is on)"])
        config = self.load(seed(model(), program="strict_config: true\n"))
        self.assertTrue(config.program.strict_config)


class ProblemTests(ConfigTestCase):

    def test_yaml_syntax_error_has_line_and_column(self):
        found = self.problems("program:\n  port: 8080\n   host: x\n")
        self.assertEqual(len(found), 1)
        self.assertRegex(found[0], r"^line 3, column \d+: YAML syntax error: ")

    def test_yaml_duplicate_key(self):
        self.assertProblem(seed(model(), program="port: 1\nport: 2\n"), "program.port",
                           "lines 2 and 3")

    def test_top_level_not_a_mapping(self):
        self.assertProblem("- a\n- b\n", "(top level)", "expected a mapping", "got a list")
        self.assertProblem("", "(top level)", "empty")

    def test_local_models_not_a_mapping(self):
        self.assertProblem("Local-Models: [a, b]\n", "Local-Models",
                           "expected a mapping of model id to model, got a list")

    def test_program_not_a_mapping(self):
        self.assertProblem(seed(model()).replace("program:\n", "program: [1]\n"), "program",
                           "expected a mapping, got a list")

    def test_unknown_mode(self):
        self.assertProblem(seed(model()).replace("mode: Chat", "mode: Chatbot"),
                           "Local-Models.m1.mode", "unknown mode 'Chatbot'",
                           "Chat, Base, Embedding, Reranker")

    def test_missing_mode_and_port(self):
        found = self.problems("Local-Models:\n  m1:\n    X:\n      required_devices: [c]\n"
                              "      script_path: s\n")
        self.assertIn("Local-Models.m1: missing required key 'mode'", found)
        self.assertIn("Local-Models.m1: missing required key 'port'", found)

    def test_name_used_twice(self):
        found = self.assertProblem(
            seed(model("a", 18101, "aliases: [shared]\n"),
                 model("b", 18102, "aliases: [shared]\n")),
            "Local-Models.b.aliases[0]", "'shared'", "model 'a'")
        self.assertEqual(len(found), 1)
        self.assertProblem(seed(model("a", 18101), model("b", 18102, "aliases: [a]\n")),
                           "Local-Models.b.aliases[0]", "model 'a'")
        self.assertProblem(seed(model("a", 18101, "aliases: [x, x]\n")),
                           "Local-Models.a.aliases[1]", "listed twice", "'a'")

    def test_id_in_both_layouts(self):
        text = seed(model("a", 18101)) + "a:\n" + textwrap.dedent(model("a", 18102))[3:]
        self.assertProblem(text, "a", "model 'a' (Local-Models.a)")

    def test_two_models_one_port(self):
        self.assertProblem(seed(model("a", 18101), model("b", 18101)),
                           "Local-Models.b.port", "18101", "model 'a'")

    def test_model_on_node_port(self):
        self.assertProblem(seed(model("a", 9000), program="port: 9000\n"),
                           "Local-Models.a.port", "node's own port")

    def test_plan_without_script_path(self):
        self.assertProblem(seed(model(plan="P:\n  required_devices: [cpu]\n")),
                           "Local-Models.m1.P", "missing required key 'script_path'")

    def test_plan_without_required_devices(self):
        self.assertProblem(seed(model(plan="P:\n  script_path: x\n")),
                           "Local-Models.m1.P", "no required_devices")

    def test_model_without_plan(self):
        self.assertProblem(seed("  m1:\n    mode: Chat\n    port: 18101\n"),
                           "Local-Models.m1", "no hardware plan")

    def test_memory_for_device_not_required(self):
        self.assertProblem(seed(model(plan="""\
            P:
              required_devices: [cpu]
              script_path: x
              memory_mb: {cpu: 1, "rtx 4090": 100}
        """)), "Local-Models.m1.P.memory_mb.rtx 4090", "not in required_devices")

    def test_memory_not_a_mapping(self):
        self.assertProblem(seed(model("Qwen-14B", plan="""\
            Standard-Config:
              required_devices: [gpu]
              script_path: x
              memory_mb: [1, 2]
        """)), "Local-Models.Qwen-14B.Standard-Config.memory_mb",
            "expected a mapping of device name to MB, got a list")

    def test_the_old_name_of_queue_timeout_is_read_with_a_warning(self):
        config = self.load(seed(model(), program="""\
            placement_wait: 45
        """))
        self.assertEqual(config.program.queue_timeout, 45.0)
        self.assertEqual(config.warnings, (
            "program.placement_wait: renamed to queue_timeout; read as queue_timeout",))

    def test_bad_sizes(self):
        found = self.problems(seed(model(extra="""\
            alive_time: -1
            start_timeout: "10"
            stop_timeout: -0.5
            max_concurrency: 0
            max_queue: -1
        """, plan="""\
            P:
              required_devices: [cpu]
              script_path: x
              memory_mb: {cpu: -5}
        """), program="""\
            alive_time: soon
            health_interval: 0
            stream_idle_timeout: -1
            backend_header_timeout: .inf
            max_body_mb: true
            queue_timeout: -3
            connect_burst: 0
        """))
        for path in ("Local-Models.m1.alive_time", "Local-Models.m1.start_timeout",
                     "Local-Models.m1.stop_timeout", "Local-Models.m1.max_concurrency",
                     "Local-Models.m1.max_queue", "Local-Models.m1.P.memory_mb.cpu",
                     "program.alive_time", "program.health_interval",
                     "program.stream_idle_timeout", "program.backend_header_timeout",
                     "program.max_body_mb", "program.queue_timeout",
                     "program.connect_burst"):
            self.assertTrue(any(line.startswith(path + ": ") for line in found), path)
        self.assertIn("Local-Models.m1.start_timeout: expected a number, got a string ('10')",
                      found)
        self.assertIn("program.max_body_mb: expected a number, got a boolean (True)", found)

    def test_health_interval_upper_bound(self):
        self.assertProblem(seed(model(), program="health_interval: 1.5\n"),
                           "program.health_interval", "at most 1")

    def test_ports(self):
        for value, fragment in (("0", "1-65535"), ("65536", "1-65535"), ("-1", "1-65535"),
                                ("true", "got a boolean"), ("80.5", "whole number"),
                                ('"80"', "got a string")):
            self.assertProblem(seed(model(port=value)), "Local-Models.m1.port", fragment)
            self.assertProblem(seed(model(), program=f"port: {value}\n"), "program.port",
                               fragment)

    def test_list_where_mapping_belongs_and_vice_versa(self):
        found = self.problems(seed(model(extra="aliases: gpt-4\n", plan="""\
            P:
              required_devices: cpu
              script_path: [a, b]
              env: [A=1]
            Q:
              required_devices: []
              script_path: x
        """), program="api_keys: just-one\n"))
        self.assertIn("Local-Models.m1.aliases: expected a list of strings, "
                      "got a string ('gpt-4')", found)
        self.assertIn("Local-Models.m1.P.required_devices: expected a non-empty list of "
                      "device names, got a string ('cpu')", found)
        self.assertIn("Local-Models.m1.P.script_path: expected a string, got a list", found)
        self.assertIn("Local-Models.m1.P.env: expected a mapping of variable name to value, "
                      "got a list", found)
        self.assertIn("Local-Models.m1.Q.required_devices: expected a non-empty list of "
                      "device names, got an empty list", found)
        self.assertIn("program.api_keys: expected a list of strings, got a string "
                      "('just-one')", found)

    def test_list_items_and_env_values(self):
        found = self.problems(seed(model(extra="aliases: [ok, 3]\n", plan="""\
            P:
              required_devices: [cpu, {a: 1}]
              script_path: x
              env: {A: [1], B: null}
        """)))
        self.assertIn("Local-Models.m1.aliases[1]: expected a string, got a number (3)", found)
        self.assertIn("Local-Models.m1.P.required_devices[1]: expected a string, "
                      "got a mapping", found)
        self.assertIn("Local-Models.m1.P.env.A: expected a string, number or boolean, "
                      "got a list", found)
        self.assertIn("Local-Models.m1.P.env.B: expected a string, number or boolean, "
                      "got null", found)

    def test_names(self):
        self.assertProblem(seed(model("a/b")), "Local-Models.a/b", "must not contain '/'")
        self.assertProblem(seed(model(extra="aliases: [x/y]\n")),
                           "Local-Models.m1.aliases[0]", "must not contain '/'")
        self.assertProblem(seed(model(extra="aliases: ['']\n")),
                           "Local-Models.m1.aliases[0]", "must not be empty")
        self.assertProblem(seed(model("123")), "Local-Models.123",
                           "model id must be a string, got a number")

    def test_health_path_must_start_with_slash(self):
        self.assertProblem(seed(model(extra="health_path: health\n")),
                           "Local-Models.m1.health_path", "start with '/'")

    def test_booleans_and_choices(self):
        found = self.problems(seed(model(extra="auto_start: yes please\n"),
                                   program="log_level: loud\nlog_format: xml\n"
                                           "open_health: 1\n"))
        self.assertIn("Local-Models.m1.auto_start: expected true or false, got a string "
                      "('yes please')", found)
        self.assertIn("program.open_health: expected true or false, got a number (1)", found)
        self.assertTrue(any(line.startswith("program.log_level: expected one of DEBUG, INFO")
                            for line in found), found)
        self.assertTrue(any(line.startswith("program.log_format: expected one of text, json")
                            for line in found), found)

    def test_missing_environment_variable(self):
        found = self.problems(seed(model(plan="""\
            P:
              required_devices: [cpu]
              script_path: x
              env: {T: "${env:NO_SUCH_TOKEN}"}
        """), program='admin_api_keys: ["${env:NO_ADMIN}"]\napi_keys: ["${env:EMPTY}"]\n'),
            environ={"EMPTY": ""})
        self.assertIn("Local-Models.m1.P.env.T: environment variable 'NO_SUCH_TOKEN' is not "
                      "set", found)
        self.assertIn("program.admin_api_keys[0]: environment variable 'NO_ADMIN' is not set",
                      found)
        self.assertIn("program.api_keys[0]: is empty after ${env:} substitution", found)

    def test_every_problem_at_once(self):
        found = self.problems(seed(model("a", 0), model("b", 18102).replace("Chat", "x"),
                                   program="port: -1\n"))
        self.assertEqual(sorted(line.split(":")[0] for line in found),
                         ["Local-Models.a.port", "Local-Models.b.mode", "program.port"])

    def test_load_config_unreadable(self):
        self.assertRaises(OSError, load_config, self.mktemp())

    def test_load_config_not_utf8(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"program: {host: \xff}\n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertIn("not UTF-8", str(caught.exception))


def readme_table(title: str) -> list[tuple[str, str]]:
    """The (key, default) rows of the table in README's section C{title}; a row's first
    cell as written (C{``key``}), its default column's first line."""
    with open(os.path.join(os.path.dirname(os.path.dirname(llmnode.__file__)),
                           "README.rst"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines[:-1])
                 if line == title and set(lines[i + 1]) == {"-"})
    top, head, bottom = [i for i in range(start, len(lines))
                         if lines[i] and set(lines[i]) == {"=", " "}][:3]
    columns = [match.start() for match in re.finditer(r"=+", lines[top])]
    return [(line[:columns[1]].strip(), line[columns[1]:columns[2]].strip())
            for line in lines[head + 1:bottom] if line and not line[0].isspace()]


class ReadmeTableTests(SynchronousTestCase):
    """README's configuration tables are the reference users read: they must name exactly
    the declared keys, with the declared defaults."""

    def test_readme_tables_match_declared_keys(self):
        for title, keys, others in (
                ("``program``", PROGRAM_KEYS, []),
                ("A model (under ``Local-Models``)", MODEL_KEYS, [("*any other name*", "")]),
                ("A hardware plan", PLAN_KEYS, [])):
            rows = readme_table(title)
            self.assertEqual(sorted(rows), sorted(
                [(f"``{key}``", doc.shown) for key, doc in keys.items()] + others), title)


class CheckCommandTests(SynchronousTestCase):

    def write(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def run_main(self, argv):
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        return main(argv), out.getvalue(), err.getvalue()

    def test_valid(self):
        path = self.write(EXAMPLE)
        self.assertEqual(self.run_main(["check", path]), (0, f"{path}: OK (1 model)\n", ""))

    def test_learned_costs_are_shown_beside_the_declared_figures(self):
        from llmnode.config import load_config
        from llmnode.costs import CostBook, costs_path
        path = self.write(EXAMPLE)
        config = load_config(path)
        book = CostBook(costs_path(config.program.runtime_dir))
        model = config.models[0]
        book.record_usage(model.id, model.plans[0], "cpu", 412.4)
        book.record_load(model.id, model.plans[0], 2.04)
        book.save()
        self.addCleanup(os.remove, book.path)
        code, out, _ = self.run_main(["check", path])
        self.assertEqual(code, 0)
        self.assertEqual(out.splitlines()[1:], [
            f"learned costs ({book.path}):",
            f"  {model.id} / {model.plans[0].name}: cpu: declared "
            f"{model.plans[0].memory_mb['cpu']:.0f} MB, learned 412 MB; load 2.0 s"])

    def test_valid_with_warnings(self):
        path = self.write(EXAMPLE.replace("alive_time", "alive_tme"))
        code, out, err = self.run_main(["check", path])
        self.assertEqual((code, out), (0, f"{path}: OK (1 model)\n"))
        self.assertEqual(err, f"{path}:1: warning: program.alive_tme: unknown key "
                              "(did you mean 'alive_time'?)\n")

    def test_invalid(self):
        path = self.write(EXAMPLE.replace("18101", "8080").replace("Chat", "Chit")
                          + "extra: 1\n")
        code, out, err = self.run_main(["check", path])
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(sorted(err.splitlines()), [
            f"{path}:11: warning: extra: unknown key",
            f"{path}:5: error: Local-Models.demo-chat.mode: unknown mode 'Chit' (expected one "
            "of Chat, Base, Embedding, Reranker, Audio, Speech, Image)",
        ])

    def test_every_message_names_its_line(self):
        path = self.write(textwrap.dedent("""\
            program:
              port: 8080
              alive_tme: 5
            Local-Models:
              chat:
                mode: Chat
                port: 18101
                aliases: [ok, 3]
                CPU:
                  required_devices: [cpu]
                  script_path: '"$LLMNODE_PYTHON" -m llmnode.demo.backend'
                  memory_mb: {gpu0: 5}
              other:
                mode: Chat
                port: 18102
            """))
        code, _, err = self.run_main(["check", path])
        self.assertEqual(code, 1)
        self.assertEqual(sorted(err.splitlines()), sorted([
            f"{path}:3: warning: program.alive_tme: unknown key (did you mean 'alive_time'?)",
            f"{path}:8: error: Local-Models.chat.aliases[1]: expected a string, got a number (3)",
            f"{path}:12: error: Local-Models.chat.CPU.memory_mb.gpu0: device 'gpu0' is not in "
            "required_devices ['cpu']",
            f"{path}:13: error: Local-Models.other: no hardware plan (a mapping with "
            "required_devices and script_path)",
        ]))
        code, _, err = self.run_main(["check", self.write("program:\n  port: [\n")])
        self.assertEqual(code, 1)
        self.assertRegex(err, r"^\S+:3: error: line 3, column \d+: YAML syntax error")

    def test_strict_makes_warnings_errors(self):
        path = self.write(EXAMPLE.replace("alive_time", "alive_tme"))
        code, out, err = self.run_main(["check", "--strict", path])
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, f"{path}:1: error: program.alive_tme: unknown key "
                              "(did you mean 'alive_time'?)\n")
        clean = self.write(EXAMPLE)
        self.assertEqual(self.run_main(["check", "--strict", clean]),
                         (0, f"{clean}: OK (1 model)\n", ""))

    def test_script_programs_that_cannot_run(self):
        """A plan's program that is missing, not executable or not on PATH is a warning (an
        error with --strict); a program that runs, or one the check cannot tell, is not."""
        folder = self.mktemp()
        os.makedirs(os.path.join(folder, "bin"))
        for name, mode in (("ok.sh", 0o755), ("plain.sh", 0o644), ("bin/on-path", 0o755)):
            with open(os.path.join(folder, name), "w") as f:
                f.write("#!/bin/sh\n")
            os.chmod(os.path.join(folder, name), mode)
        plans = {
            "Missing": "./nowhere.sh --port $LLMNODE_PORT",
            "Plain": "cd /tmp && LOG=1 " + os.path.join(os.path.abspath(folder), "plain.sh"),
            "Unknown": "no-such-llama-server -m x.gguf",
            "Fine": "./ok.sh",
            "Python": '"$LLMNODE_PYTHON" -m llmnode.demo.backend',
            "OnPlanPath": "on-path",
            "Piped": "./nowhere.sh | cat",
            "Unset": "$NOT_SET_ANYWHERE/serve",
        }
        text = "Local-Models:\n  m:\n    mode: Chat\n    port: 18101\n" + "".join(
            f"    {name}:\n      required_devices: [cpu]\n      script_path: {script!r}\n"
            + ("      env: {PATH: bin}\n" if name == "OnPlanPath" else "")
            for name, script in plans.items())
        path = os.path.join(folder, "config.yaml")
        with open(path, "w") as f:
            f.write(text.replace("env: {PATH: bin}",
                                 f"env: {{PATH: {os.path.join(os.path.abspath(folder), 'bin')}}}"))
        code, _, err = self.run_main(["check", path])
        self.assertEqual(code, 0, err)
        plain = os.path.join(os.path.abspath(folder), "plain.sh")
        expected = [
            f"{path}:7: warning: Local-Models.m.Missing.script_path: program './nowhere.sh' "
            f"does not exist ({os.path.join(os.path.abspath(folder), 'nowhere.sh')})",
            f"{path}:10: warning: Local-Models.m.Plain.script_path: program {plain!r} is not "
            f"executable ({plain})",
            f"{path}:13: warning: Local-Models.m.Unknown.script_path: program "
            "'no-such-llama-server' is not on PATH",
        ]
        self.assertEqual(err.splitlines(), expected)
        code, _, err = self.run_main(["check", "--strict", path])
        self.assertEqual(code, 1)
        self.assertEqual(err.splitlines(), [line.replace(": warning: ", ": error: ")
                                            for line in expected])

    def test_unreadable(self):
        path = self.mktemp()
        code, out, err = self.run_main(["check", path])
        self.assertEqual((code, out), (2, ""))
        self.assertIn(path, err)
        self.assertTrue(err.startswith("error: cannot read "))

    def test_no_command_prints_help(self):
        code, out, err = self.run_main([])
        self.assertEqual(code, 2)
        self.assertIn("check", err)

    def test_subprocess(self):
        path = self.write(EXAMPLE)
        env = dict(os.environ, PYTHONPATH=os.path.dirname(llmnode.__path__[0]))
        done = subprocess.run([sys.executable, "-m", "llmnode", "check", path],
                              env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual((done.returncode, done.stdout, done.stderr),
                         (0, f"{path}: OK (1 model)\n", ""))
        bad = self.write("program: [\n")
        done = subprocess.run([sys.executable, "-m", "llmnode", "check", bad],
                              env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 1)
        self.assertIn("error: line ", done.stderr)
        helped = subprocess.run([sys.executable, "-m", "llmnode", "--help"],
                                env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(helped.returncode, 0)
        self.assertIn("check", helped.stdout)


class EndpointKeysTests(ConfigTestCase):
    """The modes and keys of the endpoints issue: what a model serves, its body filters, and
    the node's CORS origins."""

    def test_new_modes_serve_their_endpoints(self):
        text = "".join(model(name, port).replace("mode: Chat", f"mode: {mode.lower()}")
                       for name, port, mode in (("w", 18101, "Audio"), ("t", 18102, "Speech"),
                                                ("i", 18103, "Image"), ("c", 18104, "Chat"),
                                                ("b", 18105, "Base")))
        models = {m.id: m for m in self.load(seed(text)).models}
        self.assertEqual(models["w"].served, {"transcriptions", "translations"})
        self.assertEqual(models["t"].served, {"speech"})
        self.assertEqual(models["i"].served, {"image_generations", "image_edits"})
        self.assertTrue(all(models["c"].serves(e) for e in (
            "chat", "completions", "responses", "messages", "completion", "infill",
            "tokenize")))
        self.assertFalse(models["c"].serves("embeddings"))
        self.assertEqual(models["b"].served, {"completions", "completion", "infill",
                                              "tokenize"})

    def test_endpoints_list_replaces_the_modes_set(self):
        config = self.load(seed(model(extra="endpoints: [chat, speech]\n")))
        self.assertEqual(config.models[0].served, {"chat", "speech"})
        self.assertFalse(config.models[0].serves("completions"))
        self.assertProblem(seed(model(extra="endpoints: [chat, images]\n")),
                           "Local-Models.m1.endpoints", "unknown endpoint 'images'",
                           "image_generations")
        self.assertProblem(seed(model(extra="endpoints: []\n")),
                           "Local-Models.m1.endpoints", "non-empty")

    def test_filters(self):
        config = self.load(seed(model(extra="""\
            strip_params: [top_k]
            set_params: {stop: ["</s>"], temperature: 0.2}
            default_params: {max_tokens: 10}
            """)))
        m = config.models[0]
        self.assertEqual(m.edit_body({"model": "m1", "top_k": 1, "temperature": 1}),
                         {"model": "m1", "temperature": 0.2, "stop": ["</s>"],
                          "max_tokens": 10})
        self.assertTrue(m.edits_body)
        self.assertFalse(self.load(seed(model())).models[0].edits_body)
        self.assertEqual(hash(m), hash(m))
        self.assertProblem(seed(model(extra="strip_params: [model]\n")),
                           "Local-Models.m1.strip_params[0]", "'model' routes the request")
        self.assertProblem(seed(model(extra="set_params: [a]\n")),
                           "Local-Models.m1.set_params", "expected a mapping")
        self.assertProblem(seed(model(extra="default_params: {model: x}\n")),
                           "Local-Models.m1.default_params.model", "'model'")

    def test_cors_origins(self):
        config = self.load(seed(model(), program='cors_origins: ["HTTP://Example.com:3000", '
                                                  '"*"]\n'))
        self.assertEqual(config.program.cors_origins, ("http://example.com:3000", "*"))
        self.assertEqual(self.load(seed(model())).program.cors_origins, ())
        self.assertProblem(seed(model(), program='cors_origins: ["example.com/app"]\n'),
                           "program.cors_origins[0]", "expected '*' or an origin")
