"""The `primis` command line. Every failure ends in one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click

from primis.config import NODE_DEFAULTS
from primis.errors import PrimisError, PrivacyWarning


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="primis")
def cli() -> None:
    """PRIMIS: share medical images as public sparse codes plus small private keys."""


@cli.command()
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--ratios", nargs=3, type=float, default=(0.9, 0.05, 0.05), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--group-by", help="regex on file names; its first group keeps images together")
def split(root: Path, out_dir: Path, ratios, seed: int, group_by: str | None) -> None:
    """Write train.txt, valid.txt and test.txt (paths relative to --out) for ROOT's images."""
    import os

    from primis.data import resolve_sources, split_paths
    from primis.io.files import write_atomic

    paths = resolve_sources(root)
    for name, part in split_paths(paths, ratios, seed, group_by).items():
        lines = "".join(f"{Path(os.path.relpath(p, out_dir)).as_posix()}\n" for p in part)
        write_atomic(out_dir / f"{name}.txt", lines.encode())
        click.echo(f"{name}: {len(part)} images -> {out_dir / f'{name}.txt'}")


@cli.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML or JSON")
@click.option("--data", type=click.Path(path_type=Path), help="folder or list file")
@click.option("--valid", type=click.Path(path_type=Path), help="validation folder or list file")
@click.option("--out", type=click.Path(path_type=Path), help="run directory")
@click.option(
    "--resume",
    "resume",
    is_flag=False,
    flag_value="",
    default=None,
    help="continue the run in RUN (or --out) from its last checkpoint",
)
@click.option("--max-steps", type=int, help="override train.steps")
@click.option("--max-minutes", type=float, help="time budget; the schedule fits it")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--threads", type=int, help="CPU threads for torch")
@click.option("--strict", is_flag=True, help="stop at the first unreadable training image")
def train(
    config_file, data, valid, out, resume, max_steps, max_minutes, device, threads, strict
) -> None:
    """Train a Sparse Ternary AutoEncoder; the run directory then serves as --model."""
    from primis.config import load_run_config, with_overrides
    from primis.train import new_run, resumed_run
    from primis.train import train as run_training

    if resume is not None:
        out = Path(resume) if resume else out
        if out is None:
            raise PrimisError("--resume needs the run directory (--resume RUN or --out RUN)")
        if config_file or data or valid:
            raise PrimisError("--resume takes its config and data from the run directory")
        config, inputs = resumed_run(out)
    else:
        if data is None or out is None:
            raise PrimisError("train needs --data and --out (or --resume RUN)")
        config = load_run_config(config_file)
    overrides = {
        "steps": max_steps,
        "max_minutes": max_minutes,
        "device": device,
        "threads": threads,
    }
    config = with_overrides(config, overrides, "train")
    if resume is None:
        inputs = new_run(out, config, data, valid, strict)
        for problem in inputs.skipped:
            click.echo(f"skipped: {problem}", err=True)
    click.echo(
        f"training on {len(inputs.train)} images, validating on {len(inputs.valid)}; run: {out}"
    )
    result = run_training(config, inputs.train, inputs.valid, out, resume=resume is not None)
    click.echo(
        f"done: step {result.steps} after {result.seconds / 60:.1f} min; best pure-ternary "
        f"validation PSNR {result.best_psnr:.2f} dB; model in {out}"
        + (f"; {len(inputs.skipped)} unreadable file(s) skipped" if inputs.skipped else "")
    )


@cli.command()
@click.option("--model", "model_dir", help="run directory or bundled name (default: 'cxr')")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="training images")
@click.option("--valid", required=True, type=click.Path(path_type=Path), help="validation images")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="model directory")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML or JSON")
@click.option("--max-minutes", type=float, help="time budget of all rounds")
@click.option("--threads", type=int, help="CPU threads for torch")
def finetune(model_dir, data, valid, out, config_file, max_minutes, threads) -> None:
    """Adapt a trained model's decoder to refined codes (see `ambiguate --refine-steps`)."""
    from primis.config import FinetuneConfig, load_config, with_overrides
    from primis.data import resolve_sources
    from primis.finetune import finetune as run_finetune
    from primis.modelstore import load_model

    config = load_config(FinetuneConfig, config_file) if config_file else FinetuneConfig()
    config = with_overrides(config, {"max_minutes": max_minutes, "threads": threads})
    model = load_model(model_dir)
    result = run_finetune(model, resolve_sources(data), resolve_sources(valid), out, config)
    click.echo(
        f"done: {result.steps} decoder steps; refined validation PSNR {result.start_psnr:.2f} -> "
        f"{result.best_psnr:.2f} dB; model in {out}"
    )


def _model_option(func):
    """--model, and --device for where it runs (read by `_load_model`)."""
    func = click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda", "mps"]),
        default="auto",
        show_default=True,
        expose_value=False,
        callback=lambda ctx, _, value: ctx.meta.__setitem__("primis.device", value),
        help="where the model runs (auto: CUDA, then MPS, then CPU)",
    )(func)
    return click.option(
        "--model",
        "model_dir",
        help="trained run directory or bundled model name (default: the bundled 'cxr')",
    )(func)


@contextmanager
def _status(text: str) -> Iterator[None]:
    """On a terminal, ``text`` on stderr while the block runs (then wiped): a long silent
    phase says what it does."""
    shown = sys.stderr.isatty()
    if shown:
        click.echo(f"{text}...", err=True, nl=False)
    try:
        yield
    finally:
        if shown:
            click.echo("\r\x1b[K", err=True, nl=False)


@contextmanager
def _step_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """On a terminal, a progress bar on stderr that ``progress(done, total)`` calls move (each
    step shown: steps are slow)."""
    from tqdm import tqdm

    shown = sys.stderr.isatty()
    options = {"disable": not shown, "file": sys.stderr, "leave": False, "mininterval": 0}
    with tqdm(desc=label, unit="step", **options) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield progress


def _load_model(model_dir):
    """The model of --model on the device of --device."""
    device = click.get_current_context().meta.get("primis.device", "auto")
    with _status("loading the model"):  # importing torch included
        from primis.modelstore import load_model, pick_device

        return load_model(model_dir, pick_device(device))


def _refine_option(func):
    from primis.config import REFINE_STEPS

    return click.option(
        "--refine-steps",
        type=click.IntRange(min=0),
        default=REFINE_STEPS,
        show_default=True,
        help="optimisation steps that improve each image's code (0: the encoder's code, fastest)",
    )(func)


_pad_option = click.option(
    "--pad-size-class/--no-pad-size-class",
    default=None,
    help="strict mode: pad the public grid to a coarse size class (the key alone holds the "
    "image's size; no key bits, a larger public file)",
)


def _sharing_options(func):
    """The options of how an image is shared, as `ambiguate` and `serve` take them (see
    `_share_options`)."""
    for option in reversed(
        [
            click.option("--k", "k", type=int, help="non-zeros per sign (at most the model's k)"),
            _privacy_option,
            click.option("--fill", type=float, help="fraction of zero entries filled with noise"),
            click.option(
                "--mask-signs/--no-mask-signs",
                default=None,
                help="hide the signs of true entries",
            ),
            _pad_option,
            click.option(
                "--maps",
                callback=lambda _ctx, _param, value: _parse_ints(value, "--maps"),
                help="issue keys for these code maps only, e.g. 0 or 0,1",
            ),
            _refine_option,
            *_rate_options,
            click.option(
                "--keep-header", is_flag=True, help="put the original DICOM header in the key"
            ),
        ]
    ):
        func = option(func)
    return func


def _share_options(model, k, fill, mask_signs, pad_size_class, maps, refine_steps, keep_header):
    """The `primis.api.ShareOptions` of `_sharing_options`' values."""
    from primis.api import ShareOptions

    chosen = {"fill": fill, "mask_signs": mask_signs, "pad_size_class": pad_size_class}
    options: ShareOptions = {
        "k": k,
        "maps": maps,
        "refine_steps": refine_steps,
        "obfuscation": {name: v for name, v in chosen.items() if v is not None},
        "privacy": click.get_current_context().meta.get("primis.privacy"),
        "keep_header": keep_header,
        **click.get_current_context().meta.get("primis.rate", {}),
    }
    return options


def _key_protection_options(func):
    """--to, --passphrase and --passphrase-file: who the keys written are wrapped for (see
    `_key_wrapping`)."""
    func = click.option(
        "--passphrase-file",
        type=click.Path(path_type=Path),
        help="wrap keys for the passphrase on this file's first line",
    )(func)
    func = click.option(
        "--passphrase",
        "use_passphrase",
        is_flag=True,
        help="wrap keys for a passphrase (prompt, or PRIMIS_PASSPHRASE)",
    )(func)
    return click.option(
        "--to",
        "recipients",
        multiple=True,
        type=click.Path(path_type=Path),
        help="wrap keys for this recipient's public key NAME.pub (repeatable); keys are then "
        "never written in clear",
    )(func)


def _key_wrapping(recipients, use_passphrase: bool, passphrase_file: Path | None):
    """The `KeyWrapping` of `_key_protection_options`' values, or None (plain keys)."""
    from primis.keywrap import KeyWrapping, read_passphrase_file

    if use_passphrase and passphrase_file:
        raise PrimisError("--passphrase and --passphrase-file: give one")
    passphrase = read_passphrase_file(passphrase_file) if passphrase_file else None
    if use_passphrase:
        passphrase = _passphrase(confirm=True)
    if not recipients and not passphrase:
        return None
    return KeyWrapping(recipients, passphrase)


def _tls_options(side: str):
    """--tls-cert, --tls-key, --tls-ca of `serve` (side "node") and `restore-to` ("client");
    see `_tls_context`."""
    ca_help = {
        "node": "PEM bundle of the authorities whose client certificates are accepted: "
        "mutual TLS, a client without one is refused",
        "client": "PEM bundle of the authorities trusted to sign the node's certificate "
        "(default with --tls: the system's)",
    }[side]

    def decorate(func):
        path = click.Path(path_type=Path)
        for name, text in reversed(
            [
                ("--tls-cert", f"this {side}'s certificate chain (PEM); with --tls-key: TLS"),
                ("--tls-key", f"this {side}'s private key (PEM)"),
                ("--tls-ca", ca_help),
            ]
        ):
            func = click.option(name, type=path, help=text)(func)
        return func

    return decorate


def _tls_context(side: str, cert: Path | None, key: Path | None, ca: Path | None, on=False):
    """The ssl context of `_tls_options`' values (None: plain TCP). A node needs a certificate
    and key for TLS; a client uses TLS when ``on`` or any of the three is given."""
    from primis.dicomnode import client_tls, server_tls

    if (cert is None) != (key is None):
        raise PrimisError("--tls-cert and --tls-key go together")
    if side == "node":
        if cert is None:
            if ca is not None:
                raise PrimisError("--tls-ca needs --tls-cert and --tls-key (the node's own)")
            return None
        return server_tls(cert, key, ca)
    if not (on or cert or ca):
        return None
    return client_tls(ca, cert, key)


def _keep_rate(ctx: click.Context, param: click.Parameter, value: float | None) -> None:
    if value is not None:
        ctx.meta.setdefault("primis.rate", {})[param.name] = value


# Kept for `_share_options` (like --privacy), so every command that shares takes them alike.
_rate_options = [
    click.option(
        "--rate-weight",
        type=float,
        expose_value=False,
        callback=_keep_rate,
        help="weight of a key bit against distortion in the choice of code: 0 for the best "
        "quality, larger for smaller keys (default 0.05 when refining, 0 with --refine-steps 0)",
    ),
    click.option(
        "--key-bpp",
        type=float,
        expose_value=False,
        callback=_keep_rate,
        help="rate control: per image, the best quality whose key has at most this many bits "
        "per pixel (tries several weights: several times the time)",
    ),
    click.option(
        "--quality",
        type=float,
        expose_value=False,
        callback=_keep_rate,
        help="rate control: per image, the smallest key whose restored image reaches this "
        "PSNR in dB (over the image's own range; several times the time)",
    ),
]


def _keep_privacy(ctx: click.Context, _param, value: str | None) -> None:
    ctx.meta["primis.privacy"] = value


_privacy_option = click.option(
    "--privacy",
    type=click.Choice(["strict", "compact", "paper"]),
    expose_value=False,  # kept for `_obfuscation`, so every command that shares takes it alike
    callback=_keep_privacy,
    help="a named privacy mode (docs/privacy.md): strict (default, the only private "
    "one: the public file is independent of the image), compact (half the noise: a smaller "
    "key; the public file links to its image) or paper (public signs: as small a key; "
    "linkable and the image leaks); --fill and --mask-signs change it (recorded as custom)",
)


def _obfuscation(
    model, fill: float | None, mask_signs: bool | None, pad_size_class: bool | None = None
):
    """The model's obfuscation settings, or those of `--privacy`, with the command line's
    overrides, validated (a mode that leaks warns, see `main`)."""
    from primis.api import obfuscation_for

    chosen = {"fill": fill, "mask_signs": mask_signs, "pad_size_class": pad_size_class}
    privacy = click.get_current_context().meta.get("primis.privacy")
    settings = {name: v for name, v in chosen.items() if v is not None}
    return obfuscation_for(model, settings, privacy)


def _parse_ints(text: str | None, option: str) -> list[int] | None:
    """A comma-separated list of integers (sorted, unique), or None when the option is absent."""
    if text is None:
        return None
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise PrimisError(f"{option} {text}: expected numbers like 0,1") from None


def _run_batch(
    items: list[Path],
    work: Callable[[Path], str],
    label: str,
    failed: dict[Path, str],
    workers: int = 1,
) -> None:
    """`batch.run_batch`, then its summary line (see `_summary`)."""
    from primis.batch import run_batch

    _summary(run_batch(items, work, label, failed, workers), label)


def _summary(result, label: str) -> None:
    """A batch's summary line; any failed item makes the exit status 1."""
    summary = [f"{result.done} done", f"{len(result.failures)} failed"]
    if result.skipped:  # said only when some were, with why
        summary.insert(1, f"{result.skipped} skipped (outputs exist; --overwrite to redo)")
    click.echo(f"{label}: {', '.join(summary)}")
    if result.failures:
        raise PrimisError(f"{len(result.failures)} of {result.items} file(s) failed")


def _cluster_option(func):
    return click.option(
        "--cluster",
        metavar="ADDRESS",
        help="run on a Dask cluster: a scheduler's address (tcp://host:8786), or local:N for N "
        "worker processes here; needs pip install 'primis[cluster]' and shared storage",
    )(func)


def _connect(address: str | None, workers: int = 1):
    """`primis.cluster.connect` (a one-line error without the ``cluster`` extra); without an
    address, no client (the batch runs here)."""
    from primis.cluster import connect

    if address is None:
        return nullcontext()
    if workers != 1:
        raise PrimisError("give --workers or --cluster, not both")
    return connect(address)


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@_model_option
@click.option("--public-dir", required=True, type=click.Path(path_type=Path))
@click.option("--key-dir", required=True, type=click.Path(path_type=Path))
@_sharing_options
@click.option("--overwrite", is_flag=True, help="redo inputs whose outputs exist")
@click.option("--shard", help="I/N: process every N-th input from the I-th (0-based)")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="processes sharing the inputs, each on cores/N torch threads",
)
@_cluster_option
@click.option(
    "--names",
    type=click.Choice(["id", "stem", "auto"]),
    default="id",
    show_default=True,
    help="output names: the input's random file id (the mapping stays in the private "
    "manifest), or its stem (names often hold patient names or accession numbers: only for "
    "inputs whose names carry nothing); auto: file id for DICOM inputs, stem for others",
)
@_key_protection_options
def ambiguate(
    inputs,
    model_dir,
    public_dir,
    key_dir,
    k,
    fill,
    mask_signs,
    pad_size_class,
    maps,
    refine_steps,
    keep_header,
    overwrite,
    shard,
    workers,
    cluster,
    names,
    recipients,
    use_passphrase,
    passphrase_file,
) -> None:
    """Turn each image into PUBLIC_DIR/NAME.primis and KEY_DIR/NAME.primiskey, where NAME is
    its random file id (default) or the input's stem (--names stem).

    INPUTS are files, folders (searched recursively) or glob patterns. KEY_DIR/manifest.jsonl
    (0600) maps each input to its file id, public file and key, once per input;
    PUBLIC_DIR/manifest.jsonl lists only file ids, digests and sizes, and may travel with the
    public files. A rerun after an interruption completes what is missing. With --to and/or a
    passphrase, keys are wrapped in memory and written only wrapped (recommended for real
    data: a key holds the image, and with --keep-header the patient header). With --cluster,
    Dask workers share the inputs (docs/cluster.md).
    """
    from primis.batch import expand, select_shard
    from primis.io.images import is_image_file

    items = select_shard(expand(inputs, is_image_file), shard)
    wrapping = _key_wrapping(recipients, use_passphrase, passphrase_file)
    model = _load_model(model_dir)  # then what needs torch
    from primis.cluster import share_many

    options = _share_options(
        model, k, fill, mask_signs, pad_size_class, maps, refine_steps, keep_header
    )
    device = click.get_current_context().meta.get("primis.device", "auto")
    with _connect(cluster, workers) as client:
        result = share_many(
            items,
            public_dir,
            key_dir,
            model,
            client=client,
            workers=workers,
            device=device,
            names=names,
            overwrite=overwrite,
            wrapping=wrapping,
            **options,
        )
    _summary(result, "ambiguate")


def _wrapped_key_options(func):
    """--identity, --passphrase and --passphrase-file: what opens keys wrapped for recipients
    (see `_key_secrets`)."""
    func = click.option(
        "--passphrase-file",
        type=click.Path(path_type=Path),
        help="keys are wrapped with the passphrase on this file's first line",
    )(func)
    func = click.option(
        "--passphrase",
        "ask_passphrase",
        is_flag=True,
        help="keys are wrapped with a passphrase (prompt, or PRIMIS_PASSPHRASE)",
    )(func)
    return click.option(
        "--identity", type=click.Path(path_type=Path), help="private key for wrapped keys"
    )(func)


def _key_secrets(identity: Path | None, ask_passphrase: bool, passphrase_file: Path | None):
    """The loaded identity and the passphrase of `_wrapped_key_options`' values."""
    from primis.keywrap import load_identity, read_passphrase_file

    if ask_passphrase and passphrase_file:
        raise PrimisError("--passphrase and --passphrase-file: give one")
    secret = load_identity(identity) if identity else None
    if passphrase_file:
        return secret, read_passphrase_file(passphrase_file)
    return secret, _passphrase(confirm=False) if ask_passphrase else None


@cli.command()
@click.argument("publics", nargs=-1, required=True)
@_model_option
@click.option("--key-dir", type=click.Path(path_type=Path), help="folder of <stem>.primiskey")
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@click.option("--without-key", is_flag=True, help="write what an attacker decodes instead")
@_wrapped_key_options
@click.option("--overwrite", is_flag=True, help="redo files whose output exists")
@click.option("--shard", help="I/N: process every N-th file from the I-th (0-based)")
@_cluster_option
@click.option(
    "--output-mode",
    default="600",
    show_default=True,
    help="octal permissions of authorized reconstructions (patient images); the attacker's "
    "view follows the umask",
)
def disambiguate(
    publics,
    model_dir,
    key_dir,
    out_dir,
    without_key,
    identity,
    ask_passphrase,
    passphrase_file,
    overwrite,
    shard,
    cluster,
    output_mode,
) -> None:
    """Reconstruct each PUBLIC file with its key (or, --without-key, show the attacker's view).

    PUBLICS are .primis files, folders or glob patterns. DICOM inputs come back as DICOM,
    others in their own type (PNG, TIFF or .npy) with their size, dtype and range, as
    OUT_DIR/<public file's name>.<type>.
    """
    from primis.batch import expand, select_shard

    if key_dir is None and not without_key:
        raise PrimisError("--key-dir is required (or --without-key for the attacker's view)")
    try:
        mode = int(output_mode, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise PrimisError(f"--output-mode {output_mode}: expected octal permissions like 600")
    from primis.formats import is_public_file

    items = select_shard(expand(publics, is_public_file), shard)
    if cluster and (ask_passphrase or passphrase_file):
        raise PrimisError("--cluster opens wrapped keys with --identity only (no passphrase)")
    secret, passphrase = _key_secrets(identity, ask_passphrase, passphrase_file)
    model = _load_model(model_dir)  # then what needs torch
    from primis.cluster import restore_many

    device = click.get_current_context().meta.get("primis.device", "auto")
    with _connect(cluster) as client:
        result = restore_many(
            items,
            key_dir,
            out_dir,
            model,
            client=client,
            device=device,
            identity=identity if cluster else secret,
            passphrase=passphrase,
            mode=mode,
            overwrite=overwrite,
            without_key=without_key,
        )
    _summary(result, "disambiguate")


@cli.command()
@click.option(
    "--ae-title", default=NODE_DEFAULTS.ae_title, show_default=True, help="this node's AE title"
)
@click.option(
    "--require-called-ae",
    is_flag=True,
    help="refuse associations addressed to another AE title than --ae-title",
)
@click.option(
    "--host",
    default=NODE_DEFAULTS.host,
    show_default=True,
    help="address to listen on (0.0.0.0: every interface)",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=NODE_DEFAULTS.port,
    show_default=True,
    help="0: any free",
)
@click.option("--public-dir", required=True, type=click.Path(path_type=Path))
@click.option("--key-dir", required=True, type=click.Path(path_type=Path))
@click.option(
    "--spool-dir",
    type=click.Path(path_type=Path),
    help="received instances wait here until shared (patient data; default KEY_DIR/spool)",
)
@_model_option
@_sharing_options
@click.option(
    "--allow", multiple=True, help="accept associations only from this calling AE (repeatable)"
)
@click.option(
    "--ack",
    type=click.Choice(["after-spool", "after-share"]),
    default=NODE_DEFAULTS.ack,
    show_default=True,
    help="answer C-STORE once the instance is synced in the spool and its header checked "
    "(store-and-forward: seconds, whatever the refinement), or only once it is shared",
)
@click.option(
    "--queue",
    "queue_size",
    type=click.IntRange(min=1),
    help="instances spooled and not yet shared at most; more wait for room (back-pressure) "
    f"[default: {NODE_DEFAULTS.queue_after_spool} with --ack after-spool, "
    f"{NODE_DEFAULTS.queue_after_share} with after-share]",
)
@click.option(
    "--spool-quota-mb",
    type=click.IntRange(min=1),
    default=NODE_DEFAULTS.spool_max_bytes >> 20,
    show_default=True,
    help="MiB of instances spooled and not yet shared at most; more wait for room",
)
@click.option(
    "--queue-timeout",
    type=click.FloatRange(min=0),
    default=NODE_DEFAULTS.queue_timeout,
    show_default=True,
    help="seconds an instance waits for room before it is refused (0xA700)",
)
@click.option(
    "--max-associations",
    type=click.IntRange(min=1),
    default=NODE_DEFAULTS.max_associations,
    show_default=True,
)
@click.option(
    "--sop-classes",
    default="image",
    show_default=True,
    help="storage SOP classes accepted: image (the image storage classes), all, or UIDs "
    "separated by commas",
)
@click.option(
    "--max-pdu-kb",
    type=click.IntRange(min=1),
    default=NODE_DEFAULTS.max_pdu_bytes >> 10,
    show_default=True,
    help="a PDU declaring more closes the connection before it is read",
)
@click.option(
    "--max-instance-mb",
    type=click.IntRange(min=1),
    default=NODE_DEFAULTS.max_instance_bytes >> 20,
    show_default=True,
    help="an instance (data set) larger than this closes the connection while it arrives",
)
@click.option(
    "--failed-keep",
    type=click.IntRange(min=0),
    default=NODE_DEFAULTS.failed_keep,
    show_default=True,
    help="instances kept in SPOOL/failed/ at most (the newest)",
)
@click.option(
    "--failed-days",
    type=click.FloatRange(min=0),
    default=NODE_DEFAULTS.failed_days,
    show_default=True,
    help="days an instance is kept in SPOOL/failed/ at most",
)
@_tls_options("node")
@_key_protection_options
def serve(
    ae_title,
    require_called_ae,
    host,
    port,
    public_dir,
    key_dir,
    spool_dir,
    model_dir,
    k,
    fill,
    mask_signs,
    pad_size_class,
    maps,
    refine_steps,
    keep_header,
    allow,
    ack,
    queue_size,
    spool_quota_mb,
    queue_timeout,
    max_associations,
    sop_classes,
    max_pdu_kb,
    max_instance_mb,
    failed_keep,
    failed_days,
    tls_cert,
    tls_key,
    tls_ca,
    recipients,
    use_passphrase,
    passphrase_file,
) -> None:
    """Run a DICOM node: share every instance received by C-STORE as `ambiguate` does.

    A Storage SCP (the common storage SOP classes, every transfer syntax pydicom decodes) and
    Verification SCP. Each instance is spooled to disk first, then shared into
    PUBLIC_DIR/<file id>.primis and KEY_DIR/<file id>.primiskey; the sender gets success once
    it is synced in the spool and its header passes the fast checks (--ack after-spool), or
    only once both files are on disk (--ack after-share). A restart shares what a killed node
    left in the spool. SIGTERM or Ctrl-C stops it cleanly: queued instances are shared (and,
    with after-share, answered) first.
    """
    import logging
    import signal
    import threading

    tls = _tls_context("node", tls_cert, tls_key, tls_ca)
    classes = _sop_classes(sop_classes)
    wrapping = _key_wrapping(recipients, use_passphrase, passphrase_file)
    model = _load_model(model_dir)  # then what needs torch
    from primis.dicomnode import DicomNode

    node = DicomNode(
        public_dir,
        key_dir,
        model,
        ae_title=ae_title,
        host=host,
        port=port,
        spool_dir=spool_dir,
        allow=allow,
        queue_size=queue_size,
        queue_timeout=queue_timeout,
        ack=ack,
        spool_max_bytes=spool_quota_mb << 20,
        max_pdu_bytes=max_pdu_kb << 10,
        max_instance_bytes=max_instance_mb << 20,
        sop_classes=classes,
        failed_keep=failed_keep,
        failed_days=failed_days,
        max_associations=max_associations,
        tls=tls,
        require_called_ae=require_called_ae,
        wrapping=wrapping,
        **_share_options(
            model, k, fill, mask_signs, pad_size_class, maps, refine_steps, keep_header
        ),
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO log shows data sets
    node.start()
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    listening, bound = node.address
    security = "plain TCP" if tls is None else "TLS" + (" with client certificates" * bool(tls_ca))
    click.echo(
        f"listening as {ae_title} on {listening}:{bound} ({security})"
        + (f" for {', '.join(allow)}" if allow else "")
        + f"; public files -> {public_dir}, keys -> {key_dir}",
        err=True,
    )
    while not stop.wait(0.5):
        pass
    click.echo("stopping: sharing what is queued", err=True)
    stats = node.stop()
    click.echo(
        f"stopped: {stats.received} received, {stats.stored} shared, "
        f"{stats.duplicates} already shared, {stats.failed} failed, {stats.refused} refused",
        err=True,
    )


def _sop_classes(text: str) -> list[str] | None:
    """`serve --sop-classes`: None for image (the node's default), or the classes' UIDs."""
    import re

    from primis.dicomnode import all_storage_classes

    if text == "image":
        return None
    if text == "all":
        return all_storage_classes()
    uids = [part.strip() for part in text.split(",") if part.strip()]
    valid = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
    if not uids or any(len(uid) > 64 or not valid.fullmatch(uid) for uid in uids):
        raise PrimisError(f"--sop-classes: image, all, or UIDs separated by commas, not {text!r}")
    return uids


@cli.command("restore-to")
@click.argument("publics", nargs=-1, required=True)
@_model_option
@click.option("--key-dir", required=True, type=click.Path(path_type=Path))
@click.option("--host", required=True, help="the receiving DICOM node")
@click.option("--port", required=True, type=click.IntRange(1, 65535))
@click.option("--called-ae", required=True, help="the receiving node's AE title")
@click.option(
    "--calling-ae", default=NODE_DEFAULTS.ae_title, show_default=True, help="this side's AE title"
)
@_wrapped_key_options
@click.option("--shard", help="I/N: process every N-th file from the I-th (0-based)")
@click.option("--tls", "use_tls", is_flag=True, help="send over TLS (implied by --tls-*)")
@_tls_options("client")
def restore_to(
    publics,
    model_dir,
    key_dir,
    host,
    port,
    called_ae,
    calling_ae,
    identity,
    ask_passphrase,
    passphrase_file,
    shard,
    use_tls,
    tls_cert,
    tls_key,
    tls_ca,
) -> None:
    """Send the authorized reconstruction of each PUBLIC file to a DICOM node by C-STORE.

    Each is restored in memory as DICOM (the original header where the key holds it, from
    `ambiguate --keep-header`; otherwise a de-identified one) and sent over one association;
    nothing is written to disk.
    """
    from primis.batch import duplicate_stems, expand, select_shard
    from primis.formats import is_public_file

    items = select_shard(expand(publics, is_public_file), shard)
    tls = _tls_context("client", tls_cert, tls_key, tls_ca, on=use_tls)
    secret, passphrase = _key_secrets(identity, ask_passphrase, passphrase_file)
    model = _load_model(model_dir)  # then what needs torch
    from primis.dicomnode import StorageClient
    from primis.dicomnode import restore_to as send_restored

    def work(path: Path) -> str:
        status = send_restored(path, key_dir, node, model, identity=secret, passphrase=passphrase)
        return f"{path.name} -> {called_ae} at {host}:{port} (status 0x{status:04X})"

    with StorageClient(host, port, called_ae, calling_ae, tls=tls) as node:
        _run_batch(items, work, "restore-to", duplicate_stems(items))


def _passphrase(confirm: bool) -> str:
    """PRIMIS_PASSPHRASE, or a hidden prompt on a terminal."""
    import os

    value = os.environ.get("PRIMIS_PASSPHRASE")
    if value:
        return value
    if not sys.stdin.isatty():
        raise PrimisError("no passphrase: set PRIMIS_PASSPHRASE or run on a terminal")
    return click.prompt("passphrase", hide_input=True, confirmation_prompt=confirm)


@cli.group()
def keys() -> None:
    """Recipient key pairs, and key files wrapped for recipients or a passphrase."""


@keys.command("gen")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="NAME: writes NAME (private, 0600) and NAME.pub",
)
def keys_gen(out: Path) -> None:
    """Make a recipient key pair (X25519)."""
    from primis.io.files import write_atomic
    from primis.keywrap import generate_identity

    public_path = out.with_name(out.name + ".pub")
    if out.exists() or public_path.exists():
        raise PrimisError(f"{out}: exists; refusing to overwrite an identity")
    private_pem, public_pem = generate_identity()
    write_atomic(out, private_pem, mode=0o600)
    write_atomic(public_path, public_pem)
    click.echo(f"identity {out} (keep it private); give {public_path} to data owners")


@keys.command("wrap")
@click.argument("keyfiles", nargs=-1, required=True)
@_key_protection_options
def keys_wrap(keyfiles, recipients, use_passphrase, passphrase_file) -> None:
    """Encrypt key files in place for recipients and/or a passphrase (keys written by
    `ambiguate` or `serve` with --to or a passphrase are wrapped already, never in clear)."""
    from primis.batch import expand
    from primis.formats import KeyFile, read_file
    from primis.io.files import write_atomic
    from primis.keywrap import is_wrapped

    wrapping = _key_wrapping(recipients, use_passphrase, passphrase_file)
    if wrapping is None:
        raise PrimisError("keys wrap needs --to NAME.pub, --passphrase or --passphrase-file")

    def work(path: Path) -> str:
        data = read_file(path)
        if is_wrapped(data):
            raise PrimisError(f"{path}: already wrapped")
        KeyFile.from_bytes(data, str(path))  # wrap only valid keys
        write_atomic(path, wrapping.wrap(data), mode=0o600)
        return f"{path}: wrapped"

    from primis.formats import is_key_file

    _run_batch(expand(keyfiles, is_key_file), work, "wrap", {})


@cli.command()
@click.option(
    "--image", type=click.Path(path_type=Path), help="your own image (default: a phantom)"
)
@_model_option
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("primis-demo"), show_default=True
)
@_refine_option
def demo(image, model_dir, out, refine_steps) -> None:
    """Share one image and show what the key holder and an attacker each get (no network)."""
    started = time.perf_counter()
    with _status("starting (importing torch)"):
        from primis.demo import run_demo, train_demo_model
        from primis.modelstore import bundled_models
    if model_dir is None and "cxr" not in bundled_models():
        click.echo("no bundled model: training a small one on synthetic images (minutes)...")
        model_dir = train_demo_model(out / "model")
    model = _load_model(model_dir)
    with _step_bar("refining the code") as progress:
        report = run_demo(model, image, out, refine_steps, progress)
    click.echo(f"input {report['input']} ({report['pixels'][0]}x{report['pixels'][1]})")
    click.echo(
        f"public file {report['public_bytes']} B, key {report['key_bytes']} B "
        f"({report['key_bits_per_pixel']:.3f} bits per pixel)"
    )
    click.echo(
        f"with the key:    PSNR {report['authorized_psnr']:.2f} dB, "
        f"SSIM {report['authorized_ssim']:.3f}"
    )
    click.echo(
        f"without the key: PSNR {report['attacker_psnr']:.2f} dB, "
        f"SSIM {report['attacker_ssim']:.3f}"
    )
    click.echo(f"figure: {report['figure']}  (original | public code | authorized | attacker)")
    click.echo(f"files in {report['files']}; {time.perf_counter() - started:.1f} s in all")


def _study_config(cls, quick_config, config_file: Path | None, quick: bool):
    """The settings of a measuring command: ``--quick``'s, or ``--config``'s file, or the
    defaults."""
    from primis.config import load_config

    if quick and config_file:
        raise PrimisError("--quick and --config exclude each other")
    if quick:
        return quick_config
    return load_config(cls, config_file) if config_file else cls()


@cli.command()
@_model_option
@click.option(
    "--attacker-data",
    required=True,
    type=click.Path(path_type=Path),
    help="the attacker's own images (folder or list)",
)
@click.option(
    "--target-data",
    required=True,
    type=click.Path(path_type=Path),
    help="the images whose public files are attacked (folder or list)",
)
@_privacy_option
@click.option("--fill", type=float, help="obfuscation fill (default: the model's)")
@click.option("--mask-signs/--no-mask-signs", default=None)
@_pad_option
@click.option(
    "--frontier",
    is_flag=True,
    help="attack every obfuscation mode (signs, fill, atom order) instead of one: the "
    "privacy frontier (frontier.md, frontier.json, frontier.png)",
)
@click.option(
    "--budget-check",
    is_flag=True,
    help="train each learned attack twice as long and report its score at both budgets",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("primis-attack"), show_default=True
)
@click.option(
    "--masks",
    type=click.Path(path_type=Path),
    help="lung masks named like the images: adds the segmentation utility study",
)
@_refine_option
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="YAML or JSON: how long the learned attacks train, and the seed (see AttackConfig)",
)
@click.option("--quick", is_flag=True, help="every attack, trained briefly (a smoke test)")
@click.option(
    "--linkage",
    "linkage_only",
    is_flag=True,
    help="only the linkage attack (fast): rank the targets' originals among the attacker's "
    "images for each public file (linkage.md, linkage.json)",
)
def attack(
    model_dir,
    attacker_data,
    target_data,
    fill,
    mask_signs,
    pad_size_class,
    frontier,
    linkage_only,
    budget_check,
    masks,
    out,
    refine_steps,
    config_file,
    quick,
) -> None:
    """Run every attack of the threat model against public files; report vs prior-only."""
    from primis.config import QUICK_ATTACKS, AttackConfig

    if frontier and (fill is not None or mask_signs is not None or pad_size_class is not None):
        raise PrimisError(
            "--frontier attacks every mode: leave out --fill, --mask-signs and --pad-size-class"
        )
    config = _study_config(AttackConfig, QUICK_ATTACKS, config_file, quick)
    config = config.model_copy(update={"budget_check": budget_check or config.budget_check})
    model = _load_model(model_dir)  # then what needs torch
    from primis.attacks import run_attacks, write_report
    from primis.data import resolve_sources

    attackers, targets = resolve_sources(attacker_data), resolve_sources(target_data)
    if linkage_only:
        from primis.linkage import run_linkage

        obfuscation = _obfuscation(model, fill, mask_signs, pad_size_class)
        click.echo(run_linkage(model, attackers, targets, obfuscation, config, refine_steps, out))
        click.echo(f"report: {out / 'linkage.md'}, {out / 'linkage.json'}")
        return
    if frontier:
        from primis.frontier import frontier as measure
        from primis.frontier import write_frontier
        from primis.report import machine_info

        series = measure(model, attackers, {"targets": (targets, masks)}, config, refine_steps)
        click.echo(write_frontier(series, out, machine_info()))
        click.echo(f"report: {out}/frontier.md, frontier.json, frontier.png")
        return
    report, views = run_attacks(
        model,
        attackers,
        targets,
        _obfuscation(model, fill, mask_signs, pad_size_class),
        config,
        masks=masks,
        refine_steps=refine_steps,
    )
    click.echo(write_report(report, views, out))
    click.echo(f"report: {out / 'attack.md'}, {out / 'attack.json'}, {out / 'attacks.png'}")


@cli.command()
@_model_option
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=Path("../shared/data"),
    show_default=True,
    help="folder holding cxr/ (images and lung masks) and cxr-multi/ (the tasks' sources)",
)
@click.option(
    "--attacker-data",
    required=True,
    type=click.Path(path_type=Path),
    help="the attacker's own images (folder or list); study images among them are left out",
)
@click.option(
    "--attackers",
    type=click.IntRange(min=2),
    default=60,
    show_default=True,
    help="at most this many attacker images (a seeded choice)",
)
@click.option(
    "--tasks",
    default="pneumonia,covid",
    show_default=True,
    help="classification tasks (pneumonia, covid; empty: none)",
)
@click.option(
    "--per-source",
    type=click.IntRange(min=2),
    help="at most N images of each source folder per task (a seeded choice)",
)
@click.option(
    "--masked-images",
    type=click.IntRange(min=0),
    help="at most N of cxr's masked images for texture and segmentation (0: none)",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("primis-utility"), show_default=True
)
@_privacy_option
@_refine_option
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="YAML or JSON: image size, classifier, bootstrap, U-Net, bins, attacks (UtilityConfig)",
)
@click.option("--quick", is_flag=True, help="every study, briefly (a smoke test)")
def utility(
    model_dir,
    data,
    attacker_data,
    attackers,
    tasks,
    per_source,
    masked_images,
    out,
    refine_steps,
    config_file,
    quick,
) -> None:
    """Classification, texture and segmentation on originals, authorized reconstructions,
    JPEG 2000 at the key's bytes, the best attack and prior-only (utility.md, .json, plots)."""
    from primis.config import QUICK_UTILITY, UtilityConfig

    config = _study_config(UtilityConfig, QUICK_UTILITY, config_file, quick)
    model = _load_model(model_dir)
    import primis.utility_report as study
    from primis.data import resolve_sources
    from primis.report import machine_info

    names = tuple(n.strip() for n in tasks.split(",") if n.strip())
    inputs = study.UtilityInputs(
        study.standard_tasks(data, per_source, config.seed, names) if names else [],
        [] if masked_images == 0 else study.masked_images(data / "cxr", masked_images, config.seed),
        resolve_sources(attacker_data),
        attackers,
    )
    report, views = study.utility_report(
        model, inputs, config, refine_steps, _obfuscation(model, None, None)
    )
    click.echo(study.write_utility_report(report, views, out, machine_info()))
    click.echo(f"report: {out / 'utility.md'}, {out / 'utility.json'}, plots in {out}")


@cli.command()
@_model_option
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path),
    help="images to measure (folder or list)",
)
@click.option("--ks", help="k values for the rate-distortion table, e.g. 1,2,4 (default 1..k)")
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("primis-evaluate"), show_default=True
)
@_refine_option
@click.option("--quick", is_flag=True, help="at most 4 images (for tests)")
def evaluate(model_dir, data, ks, out, refine_steps, quick) -> None:
    """Authorized quality, key size and speed per image; rate-distortion vs JPEG/JPEG 2000."""
    ks = _parse_ints(ks, "--ks")
    model = _load_model(model_dir)  # then what needs torch
    from primis.data import resolve_sources
    from primis.evaluation import evaluate as measure
    from primis.evaluation import write_report

    paths = resolve_sources(data)[: 4 if quick else None]
    report = measure(model, paths, ks, refine_steps)
    click.echo(write_report(report, out))
    click.echo(f"report: {out / 'evaluate.md'}, {out / 'evaluate.json'}")


@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--half", is_flag=True, help="store weights as float16 (half the size)")
@click.option(
    "--key-data",
    type=click.Path(path_type=Path),
    help="folder or list file: fit the key model to these images' codes (context-coded keys)",
)
@click.option("--key-refine-steps", type=int, default=0, show_default=True)
@click.option(
    "--base",
    help="bundled model: store only the tensors that differ from it (for the bundled zoo)",
)
def export(
    run: Path, out: Path, half: bool, key_data: Path | None, key_refine_steps: int, base: str | None
) -> None:
    """Copy a run's model into a standalone model directory (e.g. for the bundled zoo)."""
    from primis.api import export_model
    from primis.data import resolve_sources

    images = resolve_sources(key_data) if key_data else None
    digest = export_model(
        run, out, half=half, key_images=images, key_refine_steps=key_refine_steps, base=base
    )
    click.echo(f"model {digest} -> {out}")


def _bundled(name: str) -> bool:
    """Whether ``name`` is a bundled model's (loads torch: ask only when no file has the name)."""
    from primis.modelstore import bundled_models

    return name in bundled_models()


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
def info(file: Path) -> None:
    """Describe a public file, a key file, a wrapped key or a model directory (as JSON)."""
    from primis.formats import describe

    if file.is_dir() or (not file.exists() and _bundled(str(file))):
        from primis.modelstore import load_model

        model = load_model(file)
        cfg = model.network.config
        report = {
            "kind": "model",
            "hash": model.hash,
            "model": cfg.model_dump(),
            "downsampling": cfg.downsampling,
            "obfuscation": model.obfuscation.model_dump(),
        }
    else:
        report = describe(file)
    click.echo(json.dumps(report, indent=2))


def _show_warning(show: Callable[..., None]) -> Callable[..., None]:
    """``show`` (`warnings.showwarning`), but a `PrivacyWarning` as one 'warning: ...' line."""

    def shown(message, category, *args, **kwargs) -> None:
        if issubclass(category, PrivacyWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            show(message, category, *args, **kwargs)

    return shown


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command; PrimisError becomes 'error: ...' and exit status 1."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", PrivacyWarning)  # the API says it once per call
            warnings.showwarning = _show_warning(warnings.showwarning)
            result = cli.main(args=argv, prog_name="primis", standalone_mode=False)
        sys.exit(result if isinstance(result, int) else 0)
    except PrimisError as err:
        _fail(str(err))
        sys.exit(1)
    except OSError as err:
        from primis.batch import describe_os_error

        _fail(describe_os_error(err))
        sys.exit(1)
    except click.exceptions.Abort:
        _fail("aborted")
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted")
        sys.exit(130)
