"""``mlxeff bench``: llama-bench-style speed tables for models and technique combinations."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional

import typer

from .common import DTYPE_HELP, PREFILL_STEP_HELP, check_prefill_step_size, apply_compute_dtype, fail
from .techniques import with_techniques

FORMATS = ("md", "json", "csv")


def register(app: typer.Typer) -> None:
    app.command("bench")(with_techniques(bench))


def parse_sizes(values: List[str], flag: str) -> List[int]:
    """``-p 512 -p 1024`` or ``-p 512,1024``; 0 alone runs no such test (as in llama-bench)."""
    out = []
    for v in values:
        for part in v.split(","):
            try:
                n = int(part)
            except ValueError:
                fail(f"{flag} takes token counts (e.g. 512 or 128,256), got {v!r}", code=2)
            if n < 0:
                fail(f"{flag} sizes must be at least 0, got {n}", code=2)
            if n:
                out.append(n)
    return list(dict.fromkeys(out))


def parse_combo(text: str) -> Dict[str, dict]:
    """Technique flags as ``mlxeff generate`` takes them (``"--lazy --lazy-keep 0.9 0.5"``) ->
    registry specs; ``none`` or ``baseline`` is no technique."""
    from mlxeff.techniques import registry

    if text.strip() in ("none", "baseline", ""):
        return {}
    flags = {}
    for t in registry.techniques():
        flags[t.flag] = (t, t.value)
        for o in t.options:
            flags[o.flag(t.name)] = (t, o)
    words = shlex.split(text)
    specs: Dict[str, dict] = {}
    i = 0
    while i < len(words):
        if words[i] not in flags:
            fail(f"--combo {text!r}: unknown flag {words[i]!r} (techniques: "
                 f"{', '.join(t.flag for t in registry.techniques())})", code=2)
        t, option = flags[words[i]]
        spec = specs.setdefault(t.name, {})
        i += 1
        if option is None:
            continue
        values = words[i:i + option.nargs]
        if len(values) < option.nargs:
            fail(f"--combo {text!r}: {words[i - 1]} takes {option.nargs} value(s)", code=2)
        try:
            parsed = [option.type(v) if option.type is not bool else v.lower() in ("1", "true", "yes")
                      for v in values]
        except ValueError:
            fail(f"--combo {text!r}: {words[i - 1]} got {' '.join(values)!r}", code=2)
        spec[option.name] = tuple(parsed) if option.nargs > 1 else parsed[0]
        i += option.nargs
    try:
        registry.resolve(specs)
    except registry.TechniqueError as e:
        fail(f"--combo {text!r}: {e}", code=2)
    return specs


def combo_label(specs: Dict[str, dict]) -> str:
    """The flags that give ``specs``, as a label (``baseline`` for none)."""
    from mlxeff.techniques import registry

    if not specs:
        return "baseline"
    parts = []
    for name, opts in specs.items():
        t = registry.get(name)
        words = [t.flag]
        for key, v in opts.items():
            value = " ".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
            words.append(value if t.value is not None and key == t.value.name else
                         f"{t.option(key).flag(name)} {value}")
        parts.append(" ".join(words))
    return " ".join(parts)


def bench(
    models: Optional[List[Path]] = typer.Option(
        None, "--model", "-m", help="An mlxeff model directory; repeat for several (default: the "
        "embedded model)."),
    prompt_sizes: List[str] = typer.Option(
        ["512"], "--n-prompt", "-p", help="Prompt-processing tests: prompt lengths in tokens "
        "(repeat or separate with commas; 0 = none). Row name ppN."),
    gen_sizes: List[str] = typer.Option(
        ["128"], "--n-gen", "-n", help="Generation tests: tokens to generate, at least 2 (repeat "
        "or separate with commas; 0 = none). Row name tgN."),
    reps: int = typer.Option(5, "--repetitions", "-r", help="Timed runs per test, after one "
                             "warm-up run; rows give the mean and standard deviation."),
    combos: Optional[List[str]] = typer.Option(
        None, "--combo", "-c", help="A technique combination in the technique flags' syntax, e.g. "
        "\"--lazy --lazy-keep 0.9 0.5\" or \"--lookup\"; repeat for several. The technique flags "
        "below add one more combination."),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Do not run the plain engine "
                                     "(without techniques) first."),
    output: str = typer.Option("md", "--output", "-o", help="What to print: md (a markdown table "
                               "with the machine line), json or csv."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON "
                                             "to this file."),
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="Also write the results as CSV to "
                                            "this file."),
    plot_file: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG plot of time to "
                                             "first token and tokens per second per combination, "
                                             "and the numbers it shows as JSON beside it (same "
                                             "name, .json)."),
    prefill_step_size: Optional[int] = typer.Option(
        None, "--prefill-step-size", help=PREFILL_STEP_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the random prompts (the same for every "
                             "combination)."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    techniques: dict = None,
):
    """Measure prompt processing (ppN: tokens per second and time to first token for an N-token
    random prompt) and generation (tgN: tokens per second over N generated tokens) for each model
    and technique combination, on this machine, through the same engine as mlxeff generate.
    Prints the machine, backend, BLAS and versions with the table."""
    import mlxeff
    from mlxeff import bench as lib
    from mlxeff.errors import MlxeffError
    from mlxeff.io import resolve_model_dir

    if output not in FORMATS:
        fail(f"-o/--output must be md, json or csv, got {output!r}", code=2)
    if reps < 1:
        fail(f"-r/--repetitions must be at least 1, got {reps}", code=2)
    check_prefill_step_size(prefill_step_size)
    pp, tg = parse_sizes(prompt_sizes, "-p"), parse_sizes(gen_sizes, "-n")
    if not pp and not tg:
        fail("nothing to run: -p and -n are both 0", code=2)
    if any(n < 2 for n in tg):
        fail(f"-n sizes must be at least 2 (generation speed is timed between the first and the "
             f"last token), got {tg}", code=2)
    for f in (json_file, csv_file, plot_file):
        if f is not None and not f.parent.is_dir():
            fail(f"{f}: no such directory for the output", code=2)
    specs_list = [] if no_baseline else [{}]
    specs_list += [parse_combo(c) for c in combos or []]
    if techniques:
        specs_list.append(techniques)
    labels = list(dict.fromkeys(combo_label(s) for s in specs_list))
    specs_list = [next(s for s in specs_list if combo_label(s) == lab) for lab in labels]
    if not specs_list:
        fail("--no-baseline leaves nothing to run: add --combo or technique flags", code=2)

    runs = []
    for model in models or [None]:
        path = resolve_model_dir(model)
        net, _ = mlxeff.load(path)
        apply_compute_dtype(net, dtype)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        for specs, label in zip(specs_list, labels):
            if specs:  # a bad option or a missing file fails before anything runs
                from mlxeff.techniques.registry import build_hooks

                build_hooks(net, specs, model_dir=path, step_size=prefill_step_size)
            runs.append(lib.Combination(path.resolve().name, net, specs, label, path,
                                        net.args.num_parameters(), size))
    try:
        result = lib.run_bench(runs, pp, tg, reps=reps, step_size=prefill_step_size, seed=seed,
                               say=lambda line: print(line, file=sys.stderr, flush=True))
    except MlxeffError as e:
        fail(str(e))
    render = {"md": lib.to_markdown, "json": lib.to_json, "csv": lib.to_csv}
    sys.stdout.write(render[output](result))
    if json_file is not None:
        lib.write_atomic(json_file, lib.to_json(result).encode())
    if csv_file is not None:
        lib.write_atomic(csv_file, lib.to_csv(result).encode())
    plot_json = None
    if plot_file is not None:
        lib.plot(result, plot_file)
        plot_json = plot_file.with_suffix(".json")
        if plot_json not in (json_file, plot_file):
            lib.write_atomic(plot_json, lib.to_json(result).encode())
    written = [str(f) for f in dict.fromkeys((json_file, csv_file, plot_file, plot_json)) if f is not None]
    if written:
        print(f"wrote {', '.join(written)}", file=sys.stderr)
