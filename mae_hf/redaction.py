"""Hub tokens never reach a file, a card, a log line or the Hub: every command line and setting the project records
goes through `redact` / `redact_argv` / `recorded_command` first, which drop them by one rule: token flags' values
(also inside a string holding a command line), token settings' values and anything token-shaped
(docs/publishing.md#tokens-stay-out-of-every-record).
"""

import re
import shlex
import sys

REDACTED = "<redacted>"
TOKEN_VALUE = re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}(?![A-Za-z0-9])")  # what the Hub issues: hf_ + 34
_TOKEN_NAME = re.compile(r"(?:^|[_-])token$", re.IGNORECASE)
# A token flag and its value inside free text: `--hub_token X`, `--hub_token=X`, `--token 'X'`.
_FLAG_IN_TEXT = re.compile(r"""(?<![^\s'"])(--?(?:[A-Za-z0-9_-]*[_-])?token)(=|\s+)(?!-)('[^']*'|"[^"]*"|[^\s'"]+)""",
                           re.IGNORECASE)


def is_token_name(name: str) -> bool:
    """`token`, `hub_token`, `--hub-token`, `HF_TOKEN`: names whose value is a secret."""
    return bool(_TOKEN_NAME.search(name.lstrip("-")))


def redact_text(text: str) -> str:
    """`text` with the value of every token flag in it and every token-looking value replaced by REDACTED."""
    text = _FLAG_IN_TEXT.sub(lambda match: f"{match.group(1)}{match.group(2)}{REDACTED}", text)
    return TOKEN_VALUE.sub(REDACTED, text)


def redact_argv(argv: list[str]) -> list[str]:
    """A command line (a list of arguments) with the values of token flags and token-looking values redacted."""
    kept, secret_next = [], False
    for argument in argv:
        argument = str(argument)
        flag, equals, _ = argument.partition("=")
        if secret_next and not argument.startswith("--"):
            kept.append(REDACTED)
        elif argument.startswith("-") and equals and is_token_name(flag):
            kept.append(f"{flag}={REDACTED}")
        else:
            kept.append(redact_text(argument))
        secret_next = argument.startswith("-") and not equals and is_token_name(argument)
    return kept


def redact(value):
    """A recorded value (JSON-like: mappings, lists, strings, numbers) with every token removed: the values of
    token-named keys, token flags inside strings, token-looking strings."""
    if isinstance(value, dict):
        return {key: REDACTED if isinstance(key, str) and is_token_name(key) and isinstance(item, str) and item
                else redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def recorded_command(argv: list[str] | None = None, launcher: tuple[str, ...] = ("python",)) -> str:
    """This process's command line (`argv` defaults to sys.argv) as a shell command, tokens redacted: what summaries
    and records keep and what messages print."""
    return shlex.join([*launcher, *redact_argv(list(sys.argv if argv is None else argv))])
