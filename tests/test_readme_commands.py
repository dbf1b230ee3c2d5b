"""The README's command lines stay true: every `python jobs/<x>.py ...`, `python -m jobs.<x> ...`, `python -m
avatars.base_model ...`, `python benchmarks/<x>.py ...` it shows (fenced and indented code blocks, backslash-continued
lines, inline code spans) is parsed by that program's own parser, in this process and without running it, and the
dotted options its prose names (`--train.steps`, `--renderer.device`) exist in the program whose option group they
name. A renamed or removed flag, or a value the parser refuses, fails here naming the README line and the command.

Placeholders become values of their kind (`<person>`, `P`: a person id; `<it>`, `PATH`: a path; `D`: a date; `N`:
a number); `[optional parts]` are included (`[a | b]`: each alternative once); `...` is left out. A command line
that cannot be checked that way is in ALLOWED with the reason, and every entry must still match the README."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import io
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmarks import their siblings by plain name

#: a program named as a command: `-m jobs.x`, `jobs/x.py`, `/abs/checkout/jobs/x.py`, `benchmarks/x.py`
PROGRAM = re.compile(
    r"(?P<python>(?:\S*/)?python3?\s+)?"
    r"(?P<program>-m\s+(?:jobs|avatars|cluster|benchmarks)(?:\.\w+)+"
    r"|(?<![\w./-])(?:(?:/[\w.-]+)+/)?(?:jobs|benchmarks)/\w+\.py)(?![\w/])")
#: a code span that begins with a program's bare name and its options: `launch_all --persons all`,
#: `bench_gpu.py --only compile`
BARE_PROGRAMS = {**{p.stem: f"jobs.{p.stem}" for p in (REPO / "jobs").glob("[a-z]*.py")},
                 **{p.stem: f"benchmarks.{p.stem}" for p in (REPO / "benchmarks").glob("bench_*.py")}}
BARE = re.compile(rf"^(?P<python>)(?P<program>(?:{'|'.join(sorted(BARE_PROGRAMS))})(?:\.py)?)(?=\s+--)")
PLACEHOLDER_VALUES = {"P": "000", "D": "2026-11-28", "N": "2"}  # any other (PATH, DIR, RUN, BASE): a path
PLACEHOLDER_PATH = "/tmp/readme-placeholder"
SHELL_OPERATORS = ";&|<>"

#: README command lines that are not checked, each with the reason why, keyed by the command as the README writes it
#: (from the program on, placeholders and all). Every entry must still be in the README (a test says so).
ALLOWED: dict[str, str] = {
    "-m cluster.run_person": "names the module the SLURM templates run (their arguments: slurm/*.sbatch, checked by "
                             "tests/cluster/test_slurm_templates.py), not a command line",
    "bench_ablations.py --workdir <first run> --persons 000,...,007 --seeds 0,1 --variants full planes64":
        "ran, as the text says, on a copy of the script with one more variant ('planes64'), which the script lacks",
}


@dataclasses.dataclass(frozen=True)
class Command:
    line: int  # the README line the program's name is on
    program: str  # "jobs.launch_all", "benchmarks.bench_fidelity", "avatars.base_model"
    written: str  # as the README writes it, from the program on (one line; continuations joined)
    args: tuple[tuple[str, ...], ...]  # the argument lists to parse: one per alternative of `[a | b]`
    bare: bool = False  # a code span that begins with the program's name (`launch_all --ray-address`)


@dataclasses.dataclass(frozen=True)
class ProseFlag:
    line: int
    flag: str  # "--train.steps"
    program: str | None  # "jobs.train_person" when the README says "`--flag` in `jobs/train_person.py`"


# --- reading the README ----------------------------------------------------------------------------------------------

def code_pieces(text: str) -> list[tuple[int, str, str, str]]:
    """(line, code, kind, after) of every fenced or indented code line (backslash continuations joined) and every
    inline code span (a span that runs over a line break is one piece) of a Markdown text; kind is 'code' or
    'inline', after the text that follows an inline span in its paragraph (a few words)."""
    lines = text.splitlines()
    pieces: list[tuple[int, str, str, str]] = []
    paragraph: list[tuple[int, str]] = []

    def spans() -> None:
        joined = "\n".join(line for _, line in paragraph)
        for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", joined, re.S):
            pieces.append((paragraph[0][0] + joined.count("\n", 0, m.start(2)), m.group(2), "inline",
                           joined[m.end():m.end() + 40]))
        paragraph.clear()

    fence, blank_before, i = None, True, 0
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        if fence is not None:  # inside ``` ... ```
            fence = None if stripped.startswith("```") else fence
            if fence is not None:
                pieces.append((i + 1, line, "code", ""))
        elif stripped.startswith("```"):
            spans()
            fence = "```"
        elif blank_before and line.startswith("    ") and stripped:  # an indented code block
            spans()
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                if lines[i].strip():
                    pieces.append((i + 1, lines[i], "code", ""))
                i += 1
            blank_before = False
            continue
        elif not stripped or stripped.startswith(("|", "#")):  # a table row or heading is a paragraph of its own
            spans()
            if stripped:
                paragraph.append((i + 1, line))
                spans()
        else:
            paragraph.append((i + 1, line))
        blank_before = not stripped
        i += 1
    spans()
    joined: list[tuple[int, str, str, str]] = []
    for line, code, kind, after in pieces:  # one logical line per backslash-continued command
        if kind == "code" and joined and joined[-1][2] == "code" and joined[-1][1].rstrip().endswith("\\"):
            first, previous, _, _ = joined[-1]
            joined[-1] = (first, previous.rstrip()[:-1].rstrip() + " " + code.strip(), kind, after)
        else:
            joined.append((line, code, kind, after))
    return joined


def _program_key(program: str) -> str:
    if program.startswith("-m"):
        return program[2:].strip()
    if program.removesuffix(".py") in BARE_PROGRAMS:
        return BARE_PROGRAMS[program.removesuffix(".py")]
    parts = Path(program).with_suffix("").parts
    return f"{parts[-2]}.{parts[-1]}"


def _placeholder(name: str) -> str:
    name = name.strip("<>${}() ").lower()
    return "000" if re.search(r"\bperson\b|^p$", name) else PLACEHOLDER_PATH


def _substitute(text: str) -> str:
    """Placeholders written in the text (`<first run>`, `$p`, `${X}`) as values, before the shell splitting."""
    text = re.sub(r"<[a-zA-Z][^<>]*>", lambda m: _placeholder(m.group()), text)
    return re.sub(r"\$\{?\w+\}?", lambda m: _placeholder(m.group()), text)


def _alternatives(text: str) -> list[str]:
    """Every reading of the optional parts: `[x]` included, `[a | b]` once as a and once as b (innermost first)."""
    m = re.search(r"(?:(?<=\s)|^)\[([^\[\]]*)\]", text)
    if m is None:
        return [text]
    choices = [c.strip() for c in m.group(1).split(" | ")] if " | " in m.group(1) else [m.group(1)]
    return [t for c in choices for t in _alternatives(text[:m.start()] + c + text[m.end():])]


def _split(text: str) -> tuple[str, ...]:
    """The arguments up to the first shell operator or comment; a token that is a placeholder becomes its value."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=SHELL_OPERATORS)
    lexer.whitespace_split = True
    args: list[str] = []
    for token in lexer:
        if token and all(c in SHELL_OPERATORS for c in token):
            break
        if token in ("...", "…"):
            continue
        args.append(re.sub(r"(?:(?<==)|^)([A-Z][A-Z_]*)$",
                           lambda m: PLACEHOLDER_VALUES.get(m.group(1), PLACEHOLDER_PATH), token))
    return tuple(args)


def readme_commands(path: Path = README) -> list[Command]:
    """Every command line of the README at ``path``: a program named after `python` (or a path to it), or named
    with arguments after it (`jobs/ingest.py --force`); a bare mention of a file (`benchmarks/bench_gpu.py`) is none."""
    commands = []
    for line, code, kind, _ in code_pieces(path.read_text()):
        bare = BARE.match(code) if kind == "inline" else None
        for m in [bare] if bare else PROGRAM.finditer(code):
            rest = code[m.end("program"):]
            written = " ".join(code[m.start("program"):].split())
            if m.group("python") is None and not rest.strip():
                continue
            try:
                args = tuple(_split(_substitute(text)) for text in _alternatives(rest))
            except ValueError as e:  # shlex: an unbalanced quote
                args = ((f"<cannot split the arguments: {e}>",),)
            commands.append(Command(line + code.count("\n", 0, m.start("program")), _program_key(m.group("program")),
                                    written, args, bare=m.re is BARE))
    return commands


def prose_flags(path: Path = README) -> list[ProseFlag]:
    """The dotted options (`--train.steps`, a group: `--train.model.*`) of every code span that begins with an option
    (`--train.model.train-unet --train.model.no-use-ldm-prior`); with the program, and then every option of the
    span, when the text names it right after the span (`--model.conditioning-scale` in `jobs/train_person.py`)."""
    found = []
    for line, code, kind, after in code_pieces(path.read_text()):
        if kind != "inline" or not code.startswith("--"):
            continue
        says = re.match(r"\s+(?:in|of)\s+`([\w./]+)`", after)
        program = _program_key(says.group(1)) if says else None
        for token in code.split():
            flag = re.sub(r"(?:\*|<[^<>]*>)$", "", token.split("=")[0])  # `--train.*`, `--synthetic.<option>`: groups
            if re.fullmatch(r"--[a-z][\w-]*(?:\.[\w-]+)+\.?" if program is None else r"--[a-z][\w.-]*", flag):
                found.append(ProseFlag(line, flag, program))
    return found


# --- the programs' own parsers -------------------------------------------------------------------------------------

class _Parsed(Exception):
    """Raised by the patched ``parse_args`` once a program's ``main`` has parsed its command line."""


def _parsed_by_main(main: Callable[[list[str]], object], args: list[str]) -> None:
    """Parses ``args`` with the parser ``main`` builds, stopping right after it parsed (avatars.base_model and
    cluster.run_person build it inside main(argv), and this test may not change them)."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        with contextlib.suppress(_Parsed):
            main(args)


def _tyro(module: str, name: str, **kwargs) -> tuple[Callable[[list[str]], object], type]:
    import tyro

    cls = getattr(importlib.import_module(module), name)
    return (lambda args: tyro.cli(cls, args=args, **kwargs)), cls


@functools.cache
def program_parser(program: str) -> tuple[Callable[[list[str]], object], type | None]:
    """(parse ``args`` as ``program`` does, its tyro config class or None); a KeyError for an unknown program."""
    from jobs._presets import preset_cli

    if program == "jobs.launch_all":
        from jobs import launch_all

        return (lambda args: preset_cli(launch_all.PRESETS, "tiny", launch_all.__doc__, args)), launch_all.LaunchAllArgs
    if program == "jobs.train_person":
        from avatars.training import TrainConfig
        from jobs import train_person

        return train_person.parse_args, TrainConfig
    if program == "jobs.pretrain_base":
        return _tyro("avatars.training.base_pretraining", "BasePretrainConfig")
    if program == "jobs.render_eval":
        return _tyro("cluster.eval_driver", "EvalDriverConfig")
    tyro_jobs = {"jobs.convert_nersemble": "ConvertArgs", "jobs.ingest": "IngestArgs", "jobs.preprocess":
                 "PreprocessArgs", "jobs.make_synthetic": "MakeSyntheticArgs", "jobs.status": "StatusArgs",
                 "benchmarks.bench_gpu": "BenchGpuArgs", "benchmarks.bench_serve": "BenchServeArgs"}
    if program in tyro_jobs:
        return _tyro(program.removeprefix("benchmarks."), tyro_jobs[program])
    if program == "jobs.nightly_report":
        from jobs import nightly_report

        return nightly_report.parse_args, None
    if program in ("avatars.base_model", "cluster.run_person"):
        main = importlib.import_module(program).main
        return (lambda args: _parsed_by_main(main, args)), None
    if program.startswith("benchmarks.bench_"):  # argparse benchmarks: parse_args(argv), as their main() parses
        module = importlib.import_module(program.removeprefix("benchmarks."))
        if not hasattr(module, "parse_args"):
            raise KeyError(f"{program} has no parse_args(argv) for this test to call")
        return module.parse_args, None
    raise KeyError(f"no parser known for {program}")


def refusal(program: str, args: Sequence[str]) -> str | None:
    """None when ``program`` accepts ``args`` (or prints its help), else the parser's message, on one line."""
    out = io.StringIO()
    try:
        parse, _ = program_parser(program)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parse(list(args))
    except SystemExit as e:
        if e.code in (0, None):
            return None
        said = out.getvalue()
        if argparse_error := re.search(r"^\S*: error: .*", said, re.M | re.S):  # after argparse's usage lines
            said = argparse_error.group()
        return " ".join(re.sub(r"[─━│┃╭╮╰╯┌┐└┘]+|-{4,}", " ", said).split())[:600] or f"exit code {e.code}"
    except Exception as e:  # an unknown program, an unbalanced quote, a check that raises instead of exiting
        return f"{type(e).__name__}: {e}"
    return None


def _names_option(command: Command, args: Sequence[str], why: str) -> bool:
    """Whether ``why`` only says that the last option has no value, in a span like `launch_all --ray-address`
    (the prose naming one of the program's options: that it exists is what counts)."""
    if not command.bare or not args or not args[-1].startswith("--"):
        return False
    flag = re.escape(args[-1])
    return re.search(rf"Missing value for argument '{flag}'|argument {flag}(?:/\S+)?: expected (?:one|at least "
                     r"one|\d+) arguments?", why) is not None


def command_problems(path: Path = README) -> list[str]:
    """One line per README command that its program refuses: the README line, the command, the parser's message."""
    problems = []
    for command in readme_commands(path):
        if command.written in ALLOWED:
            continue
        for args in command.args:
            if (why := refusal(command.program, args)) is not None and not _names_option(command, args, why):
                problems.append(f"{path.name}:{command.line}: `{command.written}` ({command.program} "
                                f"{shlex.join(args)}): {why}")
    return problems


#: the benchmarks' override specs, 'name:key=value,...': the option holding them, per program
SPEC_OPTIONS = {"benchmarks.bench_fidelity": "variants", "benchmarks.bench_ablations": "train",
                "benchmarks.bench_base_vae": "variants"}


def spec_problems(path: Path = README) -> list[str]:
    """One line per override spec of a README benchmark command that names no option, or a value the option refuses,
    read and applied as the benchmark does (heldout.Variant / bench_base_vae.parse_variant, then the configs),
    which the benchmark itself does only when it gets to that variant's training. `key=value` and `...` are the
    README's template of a spec."""
    from bench_base_vae import parse_variant
    from heldout import Variant, VariantTrainConfig, apply_model_overrides

    from avatars.configs import tiny_config
    from avatars.training.base_pretraining import BasePretrainConfig

    problems = []
    for command in readme_commands(path):
        option = SPEC_OPTIONS.get(command.program)
        if option is None or command.written in ALLOWED:
            continue
        for args in command.args:
            if refusal(command.program, args) is not None:
                continue  # said by command_problems
            with contextlib.redirect_stderr(io.StringIO()):
                specs = getattr(program_parser(command.program)[0](list(args)), option)
            for spec in [specs] if isinstance(specs, str) else specs:
                spec = re.sub(r",?(?:\.\.\.|\bkey=value)(?=,|$)", "", spec)
                try:
                    if command.program == "benchmarks.bench_base_vae":
                        _, pretrain, vae = parse_variant(spec)
                        BasePretrainConfig(shard_root=Path(PLACEHOLDER_PATH), log_every=0, **pretrain)
                        dataclasses.replace(tiny_config().vae, **vae)
                    elif spec:
                        variant = Variant.parse(spec)
                        VariantTrainConfig(validate_every=0, num_workers=0, **variant.train)
                        apply_model_overrides(tiny_config(expression_dim=16), variant.model)
                except (TypeError, ValueError) as e:
                    problems.append(f"{path.name}:{command.line}: `{command.written}`: {option} spec {spec!r}: "
                                    f"{type(e).__name__}: {e}")
    return problems


@functools.cache
def program_options(program: str) -> frozenset[str]:
    """Every option string of a program's parser (tyro's: each preset has the same fields)."""
    parse, cls = program_parser(program)
    if cls is not None:
        import tyro.extras

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # get_parser is deprecated in tyro 1.x; the parse itself is tyro.cli's
            parser = tyro.extras.get_parser(cls)
    else:  # the argparse parser the program builds, caught when it parses
        caught = []

        def catch(self, args=None, namespace=None):
            caught.append(self)
            raise _Parsed

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(argparse.ArgumentParser, "parse_args", catch)
            with contextlib.suppress(_Parsed):
                parse([])
        parser = caught[0]

    def options(p: argparse.ArgumentParser) -> set[str]:
        found = {o for action in p._actions for o in action.option_strings}
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found |= options(sub)
        return found

    return frozenset(options(parser))


TYRO_PROGRAMS = ("jobs.launch_all", "jobs.train_person", "jobs.pretrain_base", "jobs.render_eval",
                 "jobs.convert_nersemble", "jobs.ingest", "jobs.preprocess", "jobs.make_synthetic", "jobs.status")


def flag_problems(path: Path = README) -> list[str]:
    """One line per dotted option of the prose that no program with its option group has (or, when the text names
    the program, that program does not have). A group prefix (`--train.model.`) must begin some option."""
    problems = []
    for mention in prose_flags(path):
        group = mention.flag[2:].split(".")[0].replace("-", "_")
        if mention.program is not None:
            owners = [mention.program]
        else:
            owners = [p for p in TYRO_PROGRAMS
                      if group in {f.name for f in dataclasses.fields(program_parser(p)[1])}]
        if not owners:
            problems.append(f"{path.name}:{mention.line}: `{mention.flag}`: no program has an option group "
                            f"`--{group.replace('_', '-')}.`")
            continue
        if mention.flag.endswith("."):  # a group: `--train.model.`
            known = any(o.startswith(mention.flag) for p in owners for o in program_options(p))
        else:
            known = any(mention.flag in program_options(p) for p in owners)
        if not known:
            problems.append(f"{path.name}:{mention.line}: `{mention.flag}` is no option of {' or '.join(owners)}")
    return problems


# --- the tests -----------------------------------------------------------------------------------------------------

def test_the_readme_commands_parse():
    commands = readme_commands()
    assert len(commands) > 80, f"found only {len(commands)} command lines in README.md: the extraction broke"
    problems = command_problems()
    assert not problems, ("README.md shows command lines their programs refuse (fix the README, or the program):\n"
                          + "\n".join(problems))


def test_the_readme_benchmark_specs_name_existing_options():
    problems = spec_problems()
    assert not problems, "README.md shows benchmark override specs their benchmark would refuse:\n" + "\n".join(
        problems)


def test_the_readme_names_only_options_that_exist():
    problems = flag_problems()
    assert not problems, "README.md names options no program has:\n" + "\n".join(problems)


def test_every_allowed_entry_is_still_in_the_readme():
    written = {command.written for command in readme_commands()}
    assert not set(ALLOWED) - written, f"ALLOWED names command lines the README no longer has: {set(ALLOWED) - written}"


def test_the_extraction_reads_every_form(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "Intro `python jobs/status.py --workdir data [--watch 5]` and\n"
        "`python -m jobs.nightly_report --reports-root\n"
        "data/reports [--run-date D]`, `jobs/ingest.py --force`, not `benchmarks/bench_gpu.py`.\n"
        "\n"
        "```bash\n"
        "python jobs/launch_all.py paper --persons <person> \\\n"
        "    --train.base-model <its base>  # a comment\n"
        "```\n"
        "\n"
        "    OMP_NUM_THREADS=1 python benchmarks/bench_ablations.py --workdir <first run> --persons 000,...,007 \\\n"
        "        --variants full ... [--train train_unet=true | --steps 1800]\n")
    found = [(c.line, c.program, c.args) for c in readme_commands(readme)]
    assert found == [
        (1, "jobs.status", (("--workdir", "data", "--watch", "5"),)),
        (2, "jobs.nightly_report", (("--reports-root", "data/reports", "--run-date", "2026-11-28"),)),
        (3, "jobs.ingest", (("--force",),)),
        (6, "jobs.launch_all", (("paper", "--persons", "000", "--train.base-model", PLACEHOLDER_PATH),)),
        (10, "benchmarks.bench_ablations", (
            ("--workdir", PLACEHOLDER_PATH, "--persons", "000,...,007", "--variants", "full", "--train",
             "train_unet=true"),
            ("--workdir", PLACEHOLDER_PATH, "--persons", "000,...,007", "--variants", "full", "--steps", "1800")))]
    assert command_problems(readme) == []


def test_a_made_up_flag_or_a_bad_value_fails(tmp_path):
    """The checks fail on a copy of the README with a flag no program has and a value its parser refuses."""
    text = README.read_text()
    lines = text.splitlines()
    number = next(i for i, line in enumerate(lines, 1) if "python jobs/launch_all.py paper --captures" in line)
    lines[number - 1] = lines[number - 1].replace("--persons 017,018", "--persons 017,018 --train.stepz 5")
    lines.append("Then `python benchmarks/bench_fidelity.py --workdir data --seed one`, `--train.no-such-option`, "
                 "`launch_all --no-such-option`, `--seedz` in `benchmarks/bench_fidelity.py`, "
                 "`bench_base_vae.py --variants 'a:vae_lrr=1e-3' 'b:vae_lr=-1'`, "
                 "`bench_ablations.py --train lr_networkz=1`.")
    readme = tmp_path / "README.md"
    readme.write_text("\n".join(lines) + "\n")

    problems = command_problems(readme)
    made_up = [p for p in problems if p.startswith(f"README.md:{number}:")]
    assert len(made_up) == 1 and "--train.stepz" in made_up[0] and "Unrecognized" in made_up[0], problems
    last = [p for p in problems if p.startswith(f"README.md:{len(lines)}:")]
    assert len(last) == 2, problems
    assert "--seed" in last[0] and "invalid int value" in last[0], problems
    assert "`launch_all --no-such-option`" in last[1] and "Unrecognized options" in last[1], problems
    assert [p for p in flag_problems(readme) if p.startswith(f"README.md:{len(lines)}:")] == [
        f"README.md:{len(lines)}: `--train.no-such-option` is no option of jobs.launch_all",
        f"README.md:{len(lines)}: `--seedz` is no option of benchmarks.bench_fidelity"]
    specs = [p for p in spec_problems(readme) if p.startswith(f"README.md:{len(lines)}:")]
    assert len(specs) == 3, specs
    assert "'a:vae_lrr=1e-3'" in specs[0] and "vae_lrr" in specs[0].split(": ", 3)[-1], specs
    assert "'b:vae_lr=-1'" in specs[1] and "vae_lr" in specs[1].split(": ", 3)[-1], specs
    assert "lr_networkz" in specs[2].split(": ", 3)[-1], specs
