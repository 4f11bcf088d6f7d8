"""The commands the documentation shows, read out of it and checked against the parsers of the scripts they run.

A documented command is a line of a shell block (```bash, ```sh, ```shell, ```console) in README.md or docs/*.md, an
example line of a script's docstring (its --help), or a command in a config file's comments. Line continuations are
joined, `NAME=value` lines of a block define variables for the lines after them, and each simple command (split at
`&&`, `||`, `;` and `|`) loses its environment prefixes (`OMP_NUM_THREADS=1`) and wrappers (`nice`, `time`). What
runs a script of this repository is then checked:

- `python PATH.py ARGS`, `torchrun ... PATH.py ARGS`, `accelerate launch ... PATH.py ARGS`: PATH exists; for the
  project's scripts (scripts/*.py, demo/app.py) every `--flag` of ARGS is one of the script's own options, by its
  exact name (argparse would accept an unambiguous prefix, so a renamed flag could still parse), and ARGS parse with
  the script's parser: a config file given first exists and holds only known options, values have the right type
  and choices. The launchers' own flags parse with torchrun's and accelerate's parsers;
- `bash PATH.sh`: PATH exists; `python -c CODE`: CODE compiles;
- every `configs/...` file a command names exists;
- `scripts/reproduce.py`: also the command line of each of its steps (with the flags of `--pretrain_args` and the
  like), as it would run them.

The parser is the script's own: its `main(argv)` runs with argparse's `parse_known_args` (and HfArgumentParser's
`parse_args_into_dataclasses`) wrapped so that the real parse happens, the argument dataclasses included (their value
checks run), and then the script stops before it does anything else. Paths are not checked: a documented run folder
need not exist.
"""

import argparse
import ast
import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<info>[^`\n]*)$")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
CONTROL = {"&&", "||", ";", "|", "&"}
REDIRECTIONS = {">", ">>", "<", ">&", "&>"}
WRAPPERS = {"nice": {"-n"}, "time": set(), "/usr/bin/time": set(), "env": set(), "nohup": set()}
LAUNCHERS = ("torchrun", "accelerate")
# `python app.py` runs the demo inside a folder made by `publish.py --space true`, which copies demo/app.py there.
ALIASES = {"app.py": "demo/app.py"}


def project_scripts() -> list[str]:
    """The Python entry points of the repository, as documented commands name them."""
    return sorted(f"scripts/{path.name}" for path in (ROOT / "scripts").glob("*.py")) + ["demo/app.py"]


@dataclasses.dataclass
class Command:
    """One documented command: where it is written, its words after variable expansion and its environment."""

    source: str  # "README.md:42"
    text: str  # as written (continuations joined)
    words: list[str]
    env: dict[str, str]

    def __str__(self):
        return f"{self.source}: {self.text}"


@dataclasses.dataclass
class Block:
    source: str  # "README.md:40": the file and the line of the opening fence
    language: str
    text: str
    first_line: int  # the line number of the block's first line


def fenced_blocks(text: str, name: str) -> list[Block]:
    """Every fenced code block of a Markdown text (indented fences of list items included)."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body, end = [], index + 1
        while end < len(lines) and lines[end].strip() != fence:
            body.append(lines[end][indent:] if lines[end][:indent].strip() == "" else lines[end])
            end += 1
        if end == len(lines):
            raise ValueError(f"{name}:{index + 1}: a code fence that is never closed")
        blocks.append(Block(f"{name}:{index + 1}", opening["info"].strip().split(" ")[0].lower(), "\n".join(body),
                            index + 2))
        index = end + 1
    return blocks


def logical_lines(text: str, first_line: int) -> list[tuple[int, str]]:
    """(line number, line) with backslash continuations joined, numbered by the line they start on."""
    joined, start, parts = [], None, []
    for number, line in enumerate(text.splitlines(), first_line):
        start = number if start is None else start
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        joined.append((start, " ".join(part.strip() for part in parts)))
        start, parts = None, []
    if parts:
        joined.append((start, " ".join(part.strip() for part in parts)))
    return joined


def expand(text: str, variables: dict[str, str]) -> str:
    """`$NAME` / `${NAME}` replaced by the block's variables; unknown ones stay as written (paths need not exist)."""
    return VARIABLE.sub(lambda match: variables.get(match[1] or match[2], match[0]), text)


def split_words(text: str) -> list[str]:
    """Shell words with comments removed and control operators (`&&`, `|`, ...) as words of their own."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def simple_commands(words: list[str]) -> list[list[str]]:
    """`a && b | c > file` -> [a, b, c]: split at control operators, redirections (and their targets) dropped."""
    commands, current, skip = [], [], False
    for word in words:
        if skip:
            skip = False
        elif word in CONTROL:
            commands.append(current)
            current = []
        elif word in REDIRECTIONS:
            skip = True
        else:
            current.append(word)
    return [command for command in commands + [current] if command]


def commands_of_shell(text: str, source_name: str, first_line: int, variables: dict[str, str] | None = None,
                      overrides: dict[str, str] | None = None) -> list[Command]:
    """The commands of shell text. `variables` start the block's variables; `overrides` win over the block's own
    assignments (a test points `D` at its own data)."""
    variables, overrides = dict(variables or {}), dict(overrides or {})
    variables.update(overrides)
    found = []
    for number, line in logical_lines(text, first_line):
        words = split_words(expand(line, variables))
        for command in simple_commands(words):
            env = {}
            while command and ASSIGNMENT.match(command[0]):
                key, value = command.pop(0).split("=", 1)
                env[key] = value
            if not command:  # a line of assignments only: variables for the lines below
                for key, value in env.items():
                    if key not in overrides:
                        variables[key] = value
                continue
            while command and command[0] in WRAPPERS:
                options = WRAPPERS[command.pop(0)]
                while command and command[0].startswith("-"):
                    flag = command.pop(0)
                    if flag in options and command:
                        command.pop(0)
                while command and ASSIGNMENT.match(command[0]):  # env NAME=value ...
                    key, value = command.pop(0).split("=", 1)
                    env[key] = value
            if command:
                found.append(Command(f"{source_name}:{number}", line.strip(), command, env))
    return found


def markdown_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def documented_commands(overrides: dict[str, str] | None = None) -> list[Command]:
    """Every command of every shell block of README.md and docs/*.md, of the scripts' docstrings and of the
    config files' comments."""
    found = []
    for path in markdown_files():
        for block in fenced_blocks(path.read_text(), relative(path)):
            if block.language in SHELL_LANGUAGES:
                found += commands_of_shell(block.text, relative(path), block.first_line, overrides=overrides)
    for path in project_scripts() + ["mae_hf/benchmark.py"]:  # the --help texts
        found += docstring_commands(path)
    for path in sorted((ROOT / "configs").glob("*.y*ml")):
        comments = [line.lstrip("#").strip() if line.startswith("#") else "" for line in path.read_text().splitlines()]
        for number, line in example_lines(comments):
            found += commands_of_shell(line, relative(path), number)
    return found


EXAMPLE = re.compile(r"^([A-Z_]+=\S+ )*(python3?|torchrun|accelerate|bash) ")


def example_lines(lines: list[str]) -> list[tuple[int, str]]:
    """(line number, command) of the lines of prose (a docstring, comments) that start with a command, with their
    backslash continuations joined."""
    examples, index = [], 0
    while index < len(lines):
        if EXAMPLE.match(lines[index]):
            start, command = index, lines[index]
            while command.endswith("\\") and index + 1 < len(lines):
                index += 1
                command = command[:-1] + " " + lines[index]
            examples.append((start + 1, command))
        index += 1
    return examples


def docstring(path: str) -> str:
    """The module docstring of a Python file of the repository (read, not imported)."""
    return ast.get_docstring(ast.parse((ROOT / path).read_text()), clean=False) or ""


def help_text(script: str) -> str:
    """The description --help shows: the module docstring the script's parser uses."""
    return docstring("mae_hf/benchmark.py" if script == "scripts/benchmark.py" else script)  # a thin entry point


def docstring_commands(path: str) -> list[Command]:
    """The example command lines of a file's docstring (lines starting with `python`, `torchrun`, ...)."""
    found = []
    for number, line in example_lines([line.strip() for line in docstring(path).splitlines()]):
        found += commands_of_shell(line, f"{path} docstring", number)
    return found


# --- running a script's parser ------------------------------------------------------------------------------


class Parsed(Exception):
    """Raised right after a script's parser parsed its arguments: stops the script there."""

    def __init__(self, parser, namespace, extras):
        super().__init__("parsed")
        self.parser, self.namespace, self.extras = parser, namespace, extras


_MODULES = {}


def load(script: str):
    """A project script as a module (not run: its `if __name__ == "__main__"` part stays out)."""
    if script not in _MODULES:
        folder = str((ROOT / script).parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)  # knn.py imports linear_probe.py, as when run directly
        spec = importlib.util.spec_from_file_location(f"docs_{script.replace('/', '_')[:-3]}", ROOT / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _MODULES[script] = module
    return _MODULES[script]


@contextlib.contextmanager
def environment(env: dict[str, str]):
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def parse_with_script(script: str, argv: list[str], env: dict[str, str] | None = None) -> Parsed | None:
    """Parse `argv` with the parser `script` builds, without running the script: returns what was parsed, or None
    for `--help` (the parser printed it and exited 0). A flag the parser does not have by its exact name, or any usage
    error of the parser (a value of the wrong type or choice, a config file that is missing or holds unknown options,
    a value an argument dataclass refuses) raises ValueError with the message."""
    from transformers import HfArgumentParser

    from mae_hf.cli import strip_debug_flag

    module = load(script)
    argv, _ = strip_debug_flag(argv)  # --debug is run_script's flag, taken out before the parser sees the rest
    parse_known_args = argparse.ArgumentParser.parse_known_args
    into_dataclasses = HfArgumentParser.parse_args_into_dataclasses
    parsed = {}

    def parse_then_stop(parser, args=None, namespace=None):
        unknown = unknown_flags(parser, list(args or []))
        if unknown:
            raise UnknownFlags(f"{script} has no option {', '.join(unknown)}")
        namespace, extras = parse_known_args(parser, args, namespace)
        parsed[id(parser)] = Parsed(parser, namespace, extras)
        if not isinstance(parser, HfArgumentParser):
            raise parsed[id(parser)]
        return namespace, extras  # HfArgumentParser goes on to build (and so check) its dataclasses

    def dataclasses_then_stop(parser, *args, **kwargs):
        into_dataclasses(parser, *args, **kwargs)
        raise parsed[id(parser)]

    printed = io.StringIO()
    argparse.ArgumentParser.parse_known_args = parse_then_stop
    HfArgumentParser.parse_args_into_dataclasses = dataclasses_then_stop
    try:
        with environment(env or {}), contextlib.redirect_stderr(printed), contextlib.redirect_stdout(printed):
            module.main(list(argv))
    except Parsed as result:
        return result
    except UnknownFlags as error:
        raise ValueError(str(error)) from None
    except SystemExit as exit:
        if exit.code in (0, None) and ("--help" in argv or "-h" in argv):
            return None
        message = printed.getvalue().strip() or str(exit.code)
        raise ValueError(f"{script} refuses the arguments: {message}") from None
    finally:
        argparse.ArgumentParser.parse_known_args = parse_known_args
        HfArgumentParser.parse_args_into_dataclasses = into_dataclasses
    raise AssertionError(f"{script}'s main returned without parsing its arguments")


class UnknownFlags(Exception):
    """A flag that is none of the parser's options by its exact name (argparse would take a unique prefix)."""


def unknown_flags(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The `--flag` words of `argv` that are none of the parser's option strings, compared by exact name."""
    known = set(parser._option_string_actions)
    unknown = []
    for word in argv:
        if not word.startswith("-") or word == "-" or " " in word or re.match(r"^-\d", word):
            continue  # a value, a negative number, or a quoted value holding several words
        if word == "--":
            break
        if word.split("=", 1)[0] not in known:
            unknown.append(word)
    return unknown


def check_script_arguments(script: str, argv: list[str], env: dict[str, str] | None = None) -> None:
    """`argv` is a valid command line of `script` (a project script): ValueError naming what is wrong."""
    parsed = parse_with_script(script, argv, env)
    if parsed is None:
        return
    if parsed.extras:
        raise ValueError(f"{script} does not accept {' '.join(parsed.extras)}")
    if script == "scripts/reproduce.py":  # each step's command line, --*_args included, as reproduce.py builds it
        for step in load(script).plan(parsed.namespace):
            check_script_arguments(f"scripts/{step.script}.py", step.argv, env)


def check_launcher(launcher: str, words: list[str]) -> tuple[str, list[str]]:
    """Parse a torchrun / accelerate launch command line with the launcher's own parser; returns (script, its
    arguments)."""
    if launcher == "torchrun":
        from torch.distributed.run import get_args_parser

        parser, arguments = get_args_parser(), words[1:]
    else:
        if words[1:2] != ["launch"]:
            raise ValueError(f"only `accelerate launch` runs a script, not: {' '.join(words[:2])}")
        from accelerate.commands.launch import launch_command_parser

        parser, arguments = launch_command_parser(), words[2:]
    script_index = next((i for i, word in enumerate(arguments) if word.endswith(".py")), None)
    if script_index is None:
        raise ValueError(f"{launcher} runs no .py script here")
    unknown = unknown_flags(parser, arguments[:script_index])
    if unknown:
        raise ValueError(f"{launcher} has no option {', '.join(unknown)}")
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            parsed = parser.parse_args(arguments)
    except SystemExit:
        raise ValueError(f"{launcher} refuses its arguments: {printed.getvalue().strip()}") from None
    return parsed.training_script, list(parsed.training_script_args)


def check_command(command: Command) -> None:
    """Raise ValueError if `command` would not start as documented (see the module docstring)."""
    words = list(command.words)
    for word in words:
        for path in re.findall(r"(?:^|[\s=])(configs/[\w./-]+\.(?:ya?ml|json))", " " + word):
            if not (ROOT / path).is_file():
                raise ValueError(f"config file {path} does not exist")
    program = os.path.basename(words[0])
    if program in LAUNCHERS:
        script, arguments = check_launcher(program, words)
    elif re.fullmatch(r"python3?", program):
        if words[1:2] == ["-c"]:
            compile(words[2], f"{command.source} (python -c)", "exec")
            return
        if len(words) < 2 or words[1].startswith("-"):
            return  # python -m pytest, python --version: nothing of ours to parse
        script, arguments = words[1], words[2:]
    elif program in ("bash", "sh") and len(words) > 1:
        if not (ROOT / words[1]).is_file():
            raise ValueError(f"{words[1]} does not exist")
        return
    else:
        return  # pip, hf, apt-get, tensorboard, ...: not this repository's
    script = os.path.normpath(script)
    script = ALIASES.get(script, script)
    if not (ROOT / script).is_file():
        raise ValueError(f"{script} does not exist")
    if script in project_scripts():
        check_script_arguments(script, arguments, command.env)


def scripts_run(commands: list[Command]) -> set[str]:
    """The project scripts that the commands run (directly or through a launcher)."""
    ran = set()
    for command in commands:
        for word in command.words[:6]:
            if word in project_scripts():
                ran.add(word)
                break
    return ran
