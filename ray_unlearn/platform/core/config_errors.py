"""Config problems as a person reads them: every problem at once, each naming its key, its
source (the YAML file or the ``key=value`` override that set it), what is allowed, and a
did-you-mean for a misspelt key.

pydantic stops at field errors (a model validator, where cross-section checks live, runs only
on valid fields), so :func:`collect` validates twice: once as given, then with every field
that failed left out (its default takes its place) to find the cross-section problems of the
rest. A second-pass problem that names a field which failed the first pass is dropped: it
would be about the default, not about what the user wrote.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import typing
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A config file or override is invalid; the message lists every problem and
    ``problems`` holds them as :class:`Problem` dicts (the CLI's ``--json`` error)."""

    def __init__(self, message: str, problems: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.problems = problems or []


class Problems(ValueError):
    """Raised by a model validator with several problems ("key: what is wrong" each), so
    they are reported one per line instead of as one joined message."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


@dataclass
class Problem:
    key: str  # dotted path ("partition.shards"), "" for the config as a whole
    message: str
    source: str  # "the file x.yaml", "override 'k=v'", ...
    allowed: list[str] | None = None  # for an unknown key: the keys allowed there
    did_you_mean: str | None = None

    def line(self) -> str:
        where = f"{self.key} " if self.key else ""
        return f"  - {where}({self.source}): {self.message}"


@dataclass(frozen=True)
class Sources:
    """Who set what: the file, and each override with its dotted key."""

    file: str  # how to name the file ("configs/x.yaml"), or "defaults"
    overrides: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (raw "k=v", ("k",))

    @classmethod
    def of(cls, file: str, overrides: list[str] | tuple[str, ...] = ()) -> Sources:
        pairs = []
        for o in overrides:
            key = o.split("=", 1)[0].strip()
            pairs.append((o, tuple(key.split("."))))
        return cls(file, tuple(pairs))

    def blame(self, loc: tuple[str, ...]) -> str:
        """The override that set ``loc`` (or a section holding it, or a key inside it: the
        last such override wins, as in the merge), else the file."""
        hit = None
        for raw, key in self.overrides:
            n = min(len(key), len(loc))
            if n and key[:n] == loc[:n]:
                hit = raw
        return f"override '{hit}'" if hit is not None else self.file


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (through Optional, unions, Annotated,
    lists and dict values)."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out += _models_in(arg)
    return out


def allowed_keys(model: type[BaseModel], path: tuple[Any, ...]) -> list[str] | None:
    """The keys a mapping at ``path`` (a pydantic error location's parent) accepts, or None
    when it cannot be told (a free-form dict)."""
    current = [model]
    for part in path:
        if isinstance(part, int):  # a list index: the element type is already in `current`
            continue
        fields = [m.model_fields[part] for m in current if part in m.model_fields]
        if not fields:
            # a union member's tag (pydantic puts the class name in the location)
            named = [m for m in current if m.__name__ == part]
            if named:
                current = named
                continue
            return None
        current = [m for f in fields for m in _models_in(f.annotation)]
        if not current:
            return None
    keys: list[str] = []
    for m in current:
        keys += [k for k in m.model_fields if k not in keys]
    return keys


def _suggest(word: str, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, choices: list[str]) -> str:
    """The suffix " (did you mean 'x'?)", or "" when nothing is close."""
    hint = _suggest(word, choices)
    return f" (did you mean {hint!r}?)" if hint else ""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(
    err: ValidationError,
    model: type[BaseModel],
    sources: Sources,
    hidden: frozenset[str] = frozenset(),
) -> list[Problem]:
    """One :class:`Problem` per error of ``err`` (a model validator's :class:`Problems`
    become one each). ``hidden``: fields filled by code, never listed as allowed."""
    out: list[Problem] = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, Problems):
            for msg in cause.problems:
                k, sep, rest = msg.partition(": ")
                if sep and " " not in k:  # "key: what is wrong"
                    sub = tuple(loc) + tuple(k.split("."))
                    out.append(Problem(".".join(map(str, sub)), rest, sources.blame(sub)))
                else:
                    out.append(Problem(key, msg, sources.blame(loc)))
            continue
        if e["type"] == "extra_forbidden":
            allowed = allowed_keys(model, loc[:-1])
            allowed = [k for k in allowed if k not in hidden] if allowed is not None else None
            hint = _suggest(str(loc[-1]), allowed or [])
            msg = "unknown key"
            if allowed is not None:
                msg += f"; allowed here: {', '.join(allowed)}"
            if hint:
                msg += f"; did you mean {hint!r}?"
            out.append(Problem(key, msg, sources.blame(loc), allowed, hint))
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {_show(e['input'])})"
        out.append(Problem(key, msg, sources.blame(loc)))
    return out


def _drop(tree: Any, loc: tuple[Any, ...]) -> bool:
    """Remove the value at ``loc`` from ``tree`` (so its default applies); False when the
    path is not in the tree (then the whole top-level key goes)."""
    node = tree
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(node, dict) and loc and loc[-1] in node:
        del node[loc[-1]]
        return True
    return False


def _concerns(p: Problem, key: str) -> bool:
    """Is problem ``p`` about field ``key`` (or a section holding it, or a field in it)?"""
    if p.key and (p.key == key or p.key.startswith(key + ".") or key.startswith(p.key + ".")):
        return True
    return key in p.message


def collect(
    model: type[BaseModel],
    tree: dict[str, Any],
    sources: Sources,
    hidden: frozenset[str] = frozenset(),
    rounds: int = 3,
) -> tuple[Any, list[Problem]]:
    """(validated model or None, every problem). Validates ``tree``; on failure leaves out
    each failing field and validates again (at most ``rounds`` times) to reach the model's
    cross-section checks. With problems, the model returned (if any) is the one with the
    failing fields at their defaults: for further checks, never to be used as the config."""
    problems: list[Problem] = []
    failed: list[str] = []
    work = copy.deepcopy(tree)
    for _ in range(rounds):
        try:
            value = model.model_validate(work)
        except ValidationError as e:
            found = describe(e, model, sources, hidden)
            if failed:  # a later round: only what does not concern a field that failed
                found = [p for p in found if not any(_concerns(p, f) for f in failed)]
            problems += found
            dropped = False
            for err in e.errors():
                loc = tuple(err["loc"])
                if loc:
                    failed.append(".".join(map(str, loc)))
                    dropped |= _drop(work, loc) or _drop(work, loc[:1])
            if not dropped:
                break
            continue
        return value, problems
    return None, problems


def report(header: str, problems: list[Problem]) -> ConfigError:
    lines = [f"{header}: {len(problems)} problem(s)", *(p.line() for p in problems)]
    return ConfigError("\n".join(lines), [asdict(p) for p in problems])
