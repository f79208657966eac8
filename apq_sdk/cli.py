"""The `apq-sdk` command line: a thin layer over the pipeline modules.

Exit codes: 0 ok, 1 failure (bad input file, impossible budget, failed check), 2 usage error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import ApqError, UsageError
from .plan_file import ACT_INT8, ACT_INT8_ASYM, ACT_INT8_BLOCK, ACT_NONE

log = logging.getLogger("apq_sdk")


def _terminate(signum, _frame):
    # SystemExit unwinds like an exception, so temporary outputs are removed before exiting; the
    # signal is also noted, in case the exception is raised inside a finalizer and dropped
    from .fsutil import note_signal

    note_signal(signum)
    sys.exit(128 + signum)


def _interrupt(signum, _frame):
    from .fsutil import note_signal

    note_signal(signum)
    raise KeyboardInterrupt


def _setup() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.WARNING, format="apq-sdk: %(levelname)s: %(message)s")


def _device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (torch "
                         f"{torch.__version__}); use --device cpu")
    return device


def _write_json_atomic(path: Path, data: dict) -> None:
    from .fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


model_option = click.option("--model", "-m", default="demo", show_default=True,
                            help="'demo' (SmolLM2-135M-Instruct), a .gguf file, or a Hugging Face "
                                 "directory with config.json and safetensors.")
device_option = click.option("--device", default="cpu", show_default=True,
                             help="Where to compute: cpu, cuda or cuda:N.")
unknown_arch_option = click.option(
    "--allow-unknown-arch", is_flag=True,
    help="Run on a causal LM whose family apq-sdk does not describe (decoder blocks of nn.Linear "
         "layers found generically); targets still lower only the families they list.")
placement_options = [
    click.option("--device-map", default=None,
                 help="Spread the model over several GPUs with accelerate: 'auto', 'balanced', "
                      "'balanced_low_0', 'sequential', or a JSON file mapping module names to "
                      "devices. Every block runs where its weights are; offloading to CPU or disk "
                      "is refused. Replaces --device."),
    click.option("--max-memory", default=None,
                 help="Memory per device for --device-map strategies, e.g. '0=20GiB,1=20GiB'."),
]
calib_options = [
    click.option("--calib", type=click.Path(dir_okay=False), default=None,
                 help="Calibration text (.txt, or .jsonl with 'text'). Default: wikitext2-valid "
                      "from $APQ_DATA or ../shared/data, else built-in stdlib docstrings."),
    click.option("--samples", "-n", type=click.IntRange(1), default=128, show_default=True,
                 help="Number of calibration sequences."),
    click.option("--seq-len", "-L", type=click.IntRange(2), default=512, show_default=True,
                 help="Tokens per calibration sequence."),
    click.option("--seed", type=int, default=0, show_default=True,
                 help="Seed of the calibration sampling (same seed, same samples, same plan)."),
]
budget_options = [
    click.option("--bits-per-weight", type=float, default=None,
                 help="Memory budget for the whole model: every stored weight byte (linears, "
                      "head, embeddings, norms; scales and zero points included) over every "
                      "parameter, as llama.cpp reports it; e.g. 4.0."),
    click.option("--linear-bits-per-weight", type=float, default=None,
                 help="Memory budget for the decoder linear layers only (the figure GPTQ papers "
                      "compare); the head is fixed by --head-bits."),
    click.option("--memory-reduction", type=float, default=None,
                 help="Memory budget: fraction of the whole model's float16 size saved, e.g. 0.7."),
    click.option("--max-loss", type=str, default=None,
                 help="Accuracy budget: relative perplexity increase, e.g. '0.5%'. Minimizes memory."),
    click.option("--activations",
                 type=click.Choice([ACT_NONE, ACT_INT8, ACT_INT8_BLOCK, ACT_INT8_ASYM]),
                 default=None,
                 help="Activation mode of the linear layers: 'none' (float activations, "
                      "weight-only), 'int8-per-token-dynamic' (one int8 scale per token, calibrated "
                      "clip), or 'int8-per-block-dynamic' (one scale per token and weight group, "
                      "what int8 kernels such as MatMulNBits accuracy_level 4 compute), or "
                      "'int8-per-token-asym-dynamic' (an affine int8 grid per token, what "
                      "XNNPACK's dynamically quantized linears compute). Default: "
                      "'none' for `plan`; the target's own default for `build` (see `targets`)."),
    click.option("--head-bits", type=click.Choice(["auto", "4", "8", "16"]), default="auto",
                 show_default=True,
                 help="Bits of the output head (and a tied embedding); 'auto' lets the optimizer "
                      "choose within the budget."),
]


def _target_options(values) -> dict:
    """--target-option NAME=VALUE pairs as a dict (each name once)."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, setting = value.partition("=")
        if not sep or not name.strip() or not setting.strip():
            raise UsageError(f"--target-option {value!r}: expected NAME=VALUE, e.g. "
                             f"artifacts=coreml")
        if name.strip() in out:
            raise UsageError(f"--target-option {name.strip()} given twice")
        out[name.strip()] = setting.strip()
    return out


def _apply(options):
    def decorator(func):
        for option in reversed(options):
            func = option(func)
        return func
    return decorator


class ApqGroup(click.Group):
    """Errors become one message and an exit code: 2 for usage, 1 for failures (a file system
    error included, with the file it concerns), 130 for Ctrl-C. Never a traceback."""

    def invoke(self, ctx):
        from .fsutil import raise_if_interrupted

        try:
            result = super().invoke(ctx)
            raise_if_interrupted()  # a signal whose exception was dropped still ends in failure
            return result
        except UsageError as exc:
            click.echo(f"apq-sdk: error: {exc}", err=True)
            sys.exit(2)
        except ApqError as exc:
            click.echo(f"apq-sdk: error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("apq-sdk: interrupted; nothing half-written was left behind", err=True)
            sys.exit(130)
        except OSError as exc:
            click.echo(f"apq-sdk: error: {_os_error(exc)}", err=True)
            sys.exit(1)


def _os_error(exc: OSError) -> str:
    import errno

    where = " and ".join(str(f) for f in (exc.filename, exc.filename2) if f)
    text = f"{exc.strerror or exc}" + (f": {where}" if where else "")
    if exc.errno == errno.ENOSPC:
        return text + "; free some space, or write elsewhere (--output, APQ_CACHE_DIR)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return text + "; write elsewhere (--output, APQ_CACHE_DIR) or fix the permissions"
    return text


@click.group(cls=ApqGroup)
@click.version_option(__version__, prog_name="apq-sdk")
def main() -> None:
    """Adaptive Precision Quantization: profile -> plan -> quantize -> eval (-> build)."""
    _setup()


def _load(model: str, device: str, device_map: str | None = None, max_memory: str | None = None,
          allow_unknown: bool = False):
    """(model, tokenizer, info, device of the inputs)."""
    from .model_io import load_model
    from .placement import input_device, parse_max_memory

    if device_map:
        source = click.get_current_context().get_parameter_source("device")
        if source == click.core.ParameterSource.COMMANDLINE:
            raise UsageError("pass either --device or --device-map, not both")
        m, tok, info = load_model(model, device_map=device_map, allow_unknown=allow_unknown,
                                  max_memory=parse_max_memory(max_memory))
        return m, tok, info, input_device(m)
    if max_memory:
        raise UsageError("--max-memory only applies with --device-map")
    device = _device(device)
    return (*load_model(model, device=device, allow_unknown=allow_unknown), device)


def _parse_groups(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        groups = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--group-sizes: expected comma-separated integers like 64,128, "
                         f"found {text!r}") from None
    if not groups or any(g < 8 or g % 8 for g in groups):
        raise UsageError(f"--group-sizes: expected positive multiples of 8, found {text!r}")
    return groups


@main.command()
@model_option
@unknown_arch_option
@_apply(calib_options)
@device_option
@_apply(placement_options)
@click.option("--target", "-t", default=None,
              help="Profile the candidates this target runs (its group sizes and symmetry); "
                   "default: the generic set, groups of 64 and 128, asymmetric.")
@click.option("--group-sizes", default=None,
              help="Group sizes to profile, e.g. 64,128 (overrides the target's).")
@click.option("--symmetric/--asymmetric", default=None,
              help="Profile symmetric groups (no zero points) or asymmetric ones (default: the "
                   "target's).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="sensitivity.json",
              show_default=True, help="Sensitivity map (JSON); a heatmap PNG is written beside it.")
def profile(model, allow_unknown_arch, calib, samples, seq_len, seed, device, device_map,
            max_memory, target, group_sizes, symmetric, output):
    """Stage 1: measure each layer's (and head's) sensitivity to every candidate bit-width."""
    from . import api
    from .fsutil import check_cache_writable, check_output_file
    from .report import sensitivity_heatmap

    groups = _parse_groups(group_sizes)
    check_output_file(output, what="--output")
    check_cache_writable()
    m, tok, info, device = _load(model, device, device_map, max_memory, allow_unknown_arch)
    start = time.time()
    sens = api.profile(model, calib=calib, samples=samples, seq_len=seq_len, seed=seed,
                       target=target, group_sizes=groups, symmetric=symmetric, device=device,
                       loaded=(m, tok, info))
    out = Path(output)
    _write_json_atomic(out, sens.to_dict())
    png = sensitivity_heatmap(sens, out.with_suffix(".png"))
    click.echo(f"wrote {out} and {png} ({time.time() - start:.0f} s)")


@main.group(invoke_without_command=True, cls=ApqGroup)
@click.option("--sensitivity", "-s", type=click.Path(dir_okay=False), default="sensitivity.json",
              show_default=True, help="Sensitivity map from apq-sdk profile.")
@_apply(budget_options)
@click.option("--target", "-t", default=None,
              help="Plan within this target's capability table (see apq-sdk targets); default: "
                   "the generic core set.")
@click.option("--share-fused/--no-share-fused", default=True, show_default=True,
              help="Force layers that runtimes fuse (q/k/v, gate/up) to share bits and group size.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="plan.json",
              show_default=True, help="Plan file to write.")
@click.pass_context
def plan(ctx, sensitivity, bits_per_weight, linear_bits_per_weight, memory_reduction, max_loss,
         activations, head_bits, target, share_fused, output):
    """Stage 2: choose bits per layer (exact DP) under a memory or accuracy budget.

    `apq-sdk plan show PLAN` prints a plan as a table.
    """
    if ctx.invoked_subcommand is not None:
        return
    from . import api
    from .fsutil import check_output_file
    from .plan_file import save_plan

    check_output_file(output, what="--output")
    start = time.time()
    result = api.plan(sensitivity, bits_per_weight=bits_per_weight,
                      linear_bits_per_weight=linear_bits_per_weight,
                      memory_reduction=memory_reduction, max_loss=max_loss, target=target,
                      activations=activations, head_bits=head_bits, share_fused=share_fused)
    save_plan(result, Path(output))
    t = result.totals
    click.echo(f"wrote {output}: whole model {t.model_bytes / 1e6:.2f} MB = "
               f"{t.model_bits_per_weight:.3f} bits/weight, decoder linears "
               f"{t.linear_bits_per_weight:.3f} bits/weight, head {result.modules['lm_head'].bits}-"
               f"bit, predicted KL {t.predicted_loss:.4f} (solved in {time.time() - start:.2f} s)")


@plan.command("show")
@click.argument("plan_file", type=click.Path(dir_okay=False))
def plan_show(plan_file):
    """Print a plan file as a table."""
    from rich.console import Console

    from .plan_file import PlanError, load_plan, render_plan_table

    try:
        loaded = load_plan(Path(plan_file))
    except PlanError as exc:
        raise ApqError(str(exc)) from exc
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(render_plan_table(loaded))


@main.command()
@model_option
@unknown_arch_option
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False), required=True,
              help="Plan file from apq-sdk plan.")
@_apply(calib_options)
@device_option
@_apply(placement_options)
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
              help="GPTQ error compensation, or round-to-nearest (a baseline).")
@click.option("--output", "-o", type=click.Path(file_okay=False), default="quantized",
              show_default=True, help="Directory of the quantized model (written atomically).")
@click.option("--overwrite", is_flag=True,
              help="Replace --output even when it holds files that are not an earlier checkpoint.")
def quantize(model, allow_unknown_arch, plan_file, calib, samples, seq_len, seed, device,
             device_map, max_memory, method, output, overwrite):
    """Stage 3: apply a plan (GPTQ at the planned bits) and write packed low-bit weights."""
    from . import api
    from .checkpoint import is_checkpoint_dir
    from .fsutil import check_cache_writable, check_output_dir

    loaded = api._plan(plan_file)
    check_output_dir(output, what="--output", replaceable=is_checkpoint_dir, overwrite=overwrite)
    check_cache_writable()
    m, tok, info, device = _load(model, device, device_map, max_memory, allow_unknown_arch)
    out = api.quantize(model, loaded, Path(output), calib=calib, samples=samples, seq_len=seq_len,
                       seed=seed, method=method, device=device, loaded=(m, tok, info))
    click.echo(f"wrote {out}")


@main.command("eval")
@click.option("--quantized", "-q", type=click.Path(file_okay=False), required=True,
              help="Quantized model directory from apq-sdk quantize.")
@model_option
@unknown_arch_option
@click.option("--text", type=click.Path(dir_okay=False), default=None,
              help="Evaluation text. Default: wikitext2-test from $APQ_DATA or ../shared/data.")
@click.option("--windows", type=click.IntRange(1), default=None,
              help="Evaluate only the first N windows (default: all).")
@click.option("--window-len", type=click.IntRange(2), default=512, show_default=True)
@device_option
@_apply(placement_options)
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Write the result as JSON here.")
def eval_cmd(quantized, model, allow_unknown_arch, text, windows, window_len, device, device_map,
             max_memory, output):
    """Perplexity, KL divergence and top-1 agreement against the unquantized model."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .calibration import eval_text_path, eval_windows
    from .evaluate import evaluate
    from .checkpoint import load_quantized
    from .placement import parse_max_memory

    if output:
        from .fsutil import check_output_file

        check_output_file(output, what="--output")
    ref, tok, _, device = _load(model, device, device_map, max_memory, allow_unknown_arch)
    qmodel = load_quantized(quantized, device, device_map=device_map,
                            max_memory=parse_max_memory(max_memory))
    ids = eval_windows(tok, Path(text) if text else eval_text_path(), window_len, windows)
    result = evaluate(qmodel, ids, reference=ref, device=device)
    totals = qmodel.apq_plan.totals
    data = {**result.to_dict(), "model_bytes": totals.model_bytes,
            "model_bits_per_weight": totals.model_bits_per_weight,
            "linear_bits_per_weight": totals.linear_bits_per_weight,
            "planned_bits_per_weight": totals.bits_per_weight}
    table = Table(title=Text(f"eval of {quantized}"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in data.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else Text(str(value)))
    Console().print(table)
    if output:
        _write_json_atomic(Path(output), data)


@main.command()
def targets():
    """List every target with its capabilities and whether its tools are present here."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .targets.base import load_builtin_targets

    table = Table(title="apq-sdk targets")
    for column in ("target", "description", "weight bits", "groups", "symmetric", "activations",
                   "fused", "head bits", "max ctx", "families", "tools"):
        table.add_column(column, overflow="fold")
    for name, cls in sorted(load_builtin_targets().items()):
        caps = cls.capabilities
        tools = ", ".join(f"{t.name} {'ok' if t.present() else 'MISSING: ' + t.how_to_get}"
                          for t in cls.tools) or "-"
        cells = (name, cls.description, ",".join(map(str, caps.weight_bits)),
                 ",".join(map(str, caps.group_sizes))
                 + (" (dividing the layer)" if caps.whole_groups else ""),
                 "only" if caps.symmetric_only else "or asymmetric",
                 ", ".join(f"{m} (default)" if m == caps.default_activation else m
                           for m in caps.activation_modes),
                 ", ".join(caps.fused), ",".join(map(str, caps.head_bits)),
                 str(caps.max_context),
                 "any" if caps.families is None else ", ".join(caps.families), tools)
        table.add_row(*(Text(cell) for cell in cells))  # Text: no rich markup in names
        if caps.notes:
            table.add_row("", Text(caps.notes), *[""] * 9, style="dim")
        for option in cls.build_options:
            table.add_row("", Text(f"--target-option {option.name}={'|'.join(option.choices)} "
                                   f"(default {option.default}): {option.help}"),
                          *[""] * 9, style="dim")
    Console(width=200).print(table)


@main.command("build")
@click.option("--target", "-t", required=True,
              help="Target name (see apq-sdk targets), or 'all' for every target whose tools are present "
                   "(device presets of another target excepted).")
@model_option
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False), default=None,
              help="Use this plan instead of profiling and planning (checked against the target).")
@_apply(budget_options)
@click.option("--replan", is_flag=True,
              help="If the plan asks for what the target cannot run, re-plan for it under the same budget.")
@click.option("--output", "-o", type=click.Path(file_okay=False), default="apq-out", show_default=True,
              help="Packages are written to OUTPUT/<model>-<target>/.")
@click.option("--no-verify", is_flag=True, help="Skip running the package against the torch reference.")
@click.option("--verify-windows", type=click.IntRange(1), default=8, show_default=True,
              help="Windows of the verification text that verification runs.")
@click.option("--verify-text", type=click.Path(dir_okay=False), default=None,
              help="Text to verify on (default: the WikiText-2 excerpt shipped with apq-sdk).")
@click.option("--overwrite", is_flag=True,
              help="Replace OUTPUT/<model>-<target> even when it is not an earlier package.")
@click.option("--target-option", "-X", "target_options", multiple=True, metavar="NAME=VALUE",
              help="A target's own build option (see apq-sdk targets), e.g. -X artifacts=coreml "
                   "for macos/ios; repeatable.")
@_apply(calib_options)
@device_option
def build_cmd(target, model, plan_file, bits_per_weight, linear_bits_per_weight, memory_reduction,
              max_loss, activations, head_bits, replan, output, no_verify, verify_windows,
              verify_text, overwrite, target_options, calib, samples, seq_len, seed, device):
    """Build a device package: profile (cached), plan for the target, quantize, lower, verify.

    Without a budget or plan the default is --bits-per-weight 4.0 (the whole model).
    """
    from .builder import BuildRequest, build
    from .targets.base import load_builtin_targets

    names = [target]
    if target == "all":
        names = []
        for name, cls in sorted(load_builtin_targets().items()):
            missing = cls.missing_tools("build")
            if cls.preset_of is not None:
                click.echo(f"skipping {name}: a device preset of {cls.preset_of} (the same graph and "
                           f"weights); build it with --target {name}")
            elif missing:
                click.echo(f"skipping {name}: missing " + "; ".join(
                    f"{t.name} ({t.how_to_get})" for t in missing))
            elif cls.build_refusal():
                click.echo(f"skipping {name}: {cls.build_refusal()}")
            else:
                names.append(name)
    given = _target_options(target_options)
    if given and target == "all":
        raise UsageError("--target-option applies to one target's build: name it with --target")
    for name in names:
        req = BuildRequest(target=name, model=model, plan_path=Path(plan_file) if plan_file else None,
                           bits_per_weight=bits_per_weight,
                           linear_bits_per_weight=linear_bits_per_weight,
                           memory_reduction=memory_reduction, max_loss=max_loss,
                           activations=activations, head_bits=head_bits, output=Path(output),
                           replan=replan, verify=not no_verify,
                           verify_text=Path(verify_text) if verify_text else None,
                           overwrite=overwrite, calib=calib, samples=samples, seq_len=seq_len, seed=seed,
                           device=_device(device), verify_windows=verify_windows,
                           target_options=given)
        build(req, log=lambda msg: click.echo(msg, err=True))


@main.command("verify")
@click.argument("package", type=click.Path(file_okay=False, exists=True))
@click.option("--reference", type=click.Path(file_okay=False), default=None,
              help="Quantized model directory of the same plan (default: the build cache).")
@click.option("--windows", type=click.IntRange(1), default=8, show_default=True)
@click.option("--verify-text", type=click.Path(dir_okay=False), default=None,
              help="Text to verify on (default: the WikiText-2 excerpt shipped with apq-sdk).")
@click.option("--model", "-m", default=None,
              help="The unquantized model, for the accuracy checks of int8 packages (default: "
                   "the one the manifest names).")
def verify_cmd(package, reference, windows, verify_text, model):
    """Check every hash in the manifest, run the package here, compare with the torch reference."""
    from .verification import verify_package

    result = verify_package(Path(package), Path(reference) if reference else None, windows,
                            Path(verify_text) if verify_text else None, model,
                            log=lambda msg: click.echo(msg, err=True))
    click.echo(result.table())
    click.echo(f"passed; full report: {Path(package) / 'verify.json'}")


def run() -> None:
    main()


if __name__ == "__main__":
    main()
