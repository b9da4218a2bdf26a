"""The options the commands of `primis.cli` share, the callbacks that check and convert their
values, and the command line's terminal output (status lines, progress, batch summaries).

Nothing here imports torch: `primis info` and argument errors answer without it.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from primis.bundled import DEFAULT_MODEL, bundled_models
from primis.config import NODE_DEFAULTS, REFINE_STEPS, Strict, study_config
from primis.errors import PrimisError, PrivacyWarning
from primis.privacy import PRIVACY_MODES, privacy_help

if TYPE_CHECKING:
    import ssl

    from primis.api import ShareOptions
    from primis.batch import BatchResult
    from primis.keywrap import KeyWrapping
    from primis.modelstore import LoadedModel

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
PATH = click.Path(path_type=Path)


def bundle(name: str, options: list[Decorator], make: Callable[..., Any]) -> Decorator:
    """A decorator that adds ``options`` to a command, whose values reach it as one parameter
    ``name``: ``make`` called with them (its parameters are the options' names)."""
    names = list(inspect.signature(make).parameters)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {key: kwargs.pop(key) for key in names}
            return func(*args, **kwargs, **{name: make(**values)})

        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def int_list(option: str) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    """A callback: a comma-separated list of integers (sorted, unique), None when absent."""

    def parse(_ctx: click.Context, _param: click.Parameter, text: str | None) -> list[int] | None:
        if text is None:
            return None
        try:
            return sorted({int(part) for part in text.split(",") if part.strip()})
        except ValueError:
            raise PrimisError(f"{option} {text}: expected numbers like 0,1") from None

    return parse


def octal_mode(_ctx: click.Context, _param: click.Parameter, text: str) -> int:
    """The callback of `disambiguate --output-mode`: octal permissions."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise PrimisError(f"--output-mode {text}: expected octal permissions like 600")
    return mode


# --model and --device: where the model comes from and where it runs (see `load_model`).
model_options = [
    click.option(
        "--model",
        "model_dir",
        help="trained run directory or bundled model name: "
        + ", ".join(bundled_models())
        + f" (default: {DEFAULT_MODEL}; MODEL_CARD.md describes each)",
    ),
    click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda", "mps"]),
        default="auto",
        show_default=True,
        help="where the model runs (auto: CUDA, then MPS, then CPU)",
    ),
]


def with_model(func: Callable[..., Any]) -> Callable[..., Any]:
    """--model and --device, as the parameters ``model_dir`` and ``device``."""
    for option in reversed(model_options):
        func = option(func)
    return func


def load_model(model_dir: str | None, device: str) -> LoadedModel:
    """The model of --model on the device of --device, said on a terminal while it loads."""
    with status("loading the model"):  # importing torch included
        from primis.modelstore import load_model, pick_device

        return load_model(model_dir, pick_device(device))


refine_option = click.option(
    "--refine-steps",
    type=click.IntRange(min=0),
    default=REFINE_STEPS,
    show_default=True,
    help="optimisation steps that improve each image's code (0: the encoder's code, fastest)",
)


def _chosen(
    privacy: str | None, fill: float | None, mask_signs: bool | None, pad_size_class: bool | None
) -> ShareOptions:
    """The obfuscation the options ask for: a named mode, and the settings given."""
    given = {"fill": fill, "mask_signs": mask_signs, "pad_size_class": pad_size_class}
    return {
        "privacy": privacy,
        "obfuscation": {name: value for name, value in given.items() if value is not None},
    }


privacy_option = click.option(
    "--privacy", type=click.Choice(list(PRIVACY_MODES)), help=privacy_help()
)
_obfuscation_options = [
    privacy_option,
    click.option(
        "--fill",
        type=float,
        help="fraction of zero entries filled with noise (default: the model's)",
    ),
    click.option(
        "--mask-signs/--no-mask-signs", default=None, help="hide the signs of true entries"
    ),
    click.option(
        "--pad-size-class/--no-pad-size-class",
        default=None,
        help="strict mode: pad the public grid to a coarse size class (the key alone holds the "
        "image's size; no key bits, a larger public file)",
    ),
]
# --privacy, --fill, --mask-signs, --pad-size-class: ``chosen``, for `api.obfuscation_for`.
obfuscation_options = bundle("chosen", _obfuscation_options, _chosen)


def _share_options(
    k: int | None,
    privacy: str | None,
    fill: float | None,
    mask_signs: bool | None,
    pad_size_class: bool | None,
    maps: list[int] | None,
    refine_steps: int,
    rate_weight: float | None,
    key_bpp: float | None,
    quality: float | None,
    keep_header: bool,
) -> ShareOptions:
    return {
        "k": k,
        "maps": maps,
        "refine_steps": refine_steps,
        **_chosen(privacy, fill, mask_signs, pad_size_class),
        "keep_header": keep_header,
        "rate_weight": rate_weight,
        "key_bpp": key_bpp,
        "quality": quality,
    }


# How an image is shared, as `ambiguate` and `serve` take it: ``options``, `api.ShareOptions`.
sharing_options = bundle(
    "options",
    [
        click.option("--k", "k", type=int, help="non-zeros per sign (at most the model's k)"),
        *_obfuscation_options,
        click.option(
            "--maps",
            callback=int_list("--maps"),
            help="issue keys for these code maps only, e.g. 0 or 0,1",
        ),
        refine_option,
        click.option(
            "--rate-weight",
            type=float,
            help="weight of a key bit against distortion in the choice of code: 0 for the best "
            "quality, larger for smaller keys (default 0.05 when refining, 0 with "
            "--refine-steps 0)",
        ),
        click.option(
            "--key-bpp",
            type=float,
            help="rate control: per image, the best quality whose key has at most this many "
            "bits per pixel (tries several weights: several times the time)",
        ),
        click.option(
            "--quality",
            type=float,
            help="rate control: per image, the smallest key whose restored image reaches this "
            "PSNR in dB (over the image's own range; several times the time)",
        ),
        click.option(
            "--keep-header", is_flag=True, help="put the original DICOM header in the key"
        ),
    ],
    _share_options,
)


def _node_option(
    name: str, kind: click.ParamType, default: object, help: str | None = None
) -> Decorator:
    """An option of `serve` whose default, shown, is the node's (`NODE_DEFAULTS`)."""
    return click.option(name, type=kind, default=default, show_default=True, help=help)


def _listen(ae_title: str, require_called_ae: bool, host: str, port: int) -> dict[str, Any]:
    return {
        "ae_title": ae_title,
        "require_called_ae": require_called_ae,
        "host": host,
        "port": port,
    }


# Where `serve` listens and as whom, defaults from NODE_DEFAULTS: ``listen``, for `DicomNode`.
listen_options = bundle(
    "listen",
    [
        click.option(
            "--ae-title",
            default=NODE_DEFAULTS.ae_title,
            show_default=True,
            help="this node's AE title",
        ),
        click.option(
            "--require-called-ae",
            is_flag=True,
            help="refuse associations addressed to another AE title than --ae-title",
        ),
        click.option(
            "--host",
            default=NODE_DEFAULTS.host,
            show_default=True,
            help="address to listen on (0.0.0.0: every interface)",
        ),
        _node_option("--port", click.IntRange(0, 65535), NODE_DEFAULTS.port, "0: any free"),
    ],
    _listen,
)


# `ambiguate --workers`: processes that share the inputs.
workers_option = click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="processes sharing the inputs, each on cores/N torch threads",
)


# `ambiguate --names`: how outputs are named.
names_option = click.option(
    "--names",
    type=click.Choice(["id", "stem", "auto"]),
    default="id",
    show_default=True,
    help="output names: the input's random file id (the mapping stays in the private "
    "manifest), or its stem (names often hold patient names or accession numbers: only for "
    "inputs whose names carry nothing); auto: file id for DICOM inputs, stem for others",
)


# `disambiguate --output-mode`, as an int (`octal_mode`).
output_mode_option = click.option(
    "--output-mode",
    default="600",
    show_default=True,
    callback=octal_mode,
    help="octal permissions of authorized reconstructions (patient images); the attacker's "
    "view follows the umask",
)


def _sop_classes(sop_classes: str) -> list[str] | None:
    """`serve --sop-classes`: None for image (the node's default), or the classes' UIDs."""
    from primis.dicomnode import all_storage_classes

    if sop_classes == "image":
        return None
    if sop_classes == "all":
        return all_storage_classes()
    uids = [part.strip() for part in sop_classes.split(",") if part.strip()]
    valid = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
    if not uids or any(len(uid) > 64 or not valid.fullmatch(uid) for uid in uids):
        raise PrimisError(
            f"--sop-classes: image, all, or UIDs separated by commas, not {sop_classes!r}"
        )
    return uids


def _node_limits(
    ack: str,
    queue_size: int | None,
    spool_quota_mb: int,
    queue_timeout: float,
    max_associations: int,
    sop_classes: str,
    max_pdu_kb: int,
    max_instance_mb: int,
    failed_keep: int,
    failed_days: float,
) -> dict[str, Any]:
    """The `DicomNode` arguments of `node_options`' values."""
    return {
        "ack": ack,
        "queue_size": queue_size,
        "spool_max_bytes": spool_quota_mb << 20,
        "queue_timeout": queue_timeout,
        "max_associations": max_associations,
        "sop_classes": _sop_classes(sop_classes),
        "max_pdu_bytes": max_pdu_kb << 10,
        "max_instance_bytes": max_instance_mb << 20,
        "failed_keep": failed_keep,
        "failed_days": failed_days,
    }


# `serve`'s queue, spool and limits, defaults from NODE_DEFAULTS: ``limits``, for `DicomNode`.
node_options = bundle(
    "limits",
    [
        _node_option(
            "--ack",
            click.Choice(["after-spool", "after-share"]),
            NODE_DEFAULTS.ack,
            "answer C-STORE once the instance is synced in the spool and its header "
            "checked (store-and-forward: seconds, whatever the refinement), or only once it is "
            "shared",
        ),
        click.option(
            "--queue",
            "queue_size",
            type=click.IntRange(min=1),
            help="instances spooled and not yet shared at most; more wait for room "
            f"(back-pressure) [default: {NODE_DEFAULTS.queue_after_spool} with --ack "
            f"after-spool, {NODE_DEFAULTS.queue_after_share} with after-share]",
        ),
        _node_option(
            "--spool-quota-mb",
            click.IntRange(min=1),
            NODE_DEFAULTS.spool_max_bytes >> 20,
            "MiB of instances spooled and not yet shared at most; more wait for room",
        ),
        _node_option(
            "--queue-timeout",
            click.FloatRange(min=0),
            NODE_DEFAULTS.queue_timeout,
            "seconds an instance waits for room before it is refused (0xA700)",
        ),
        _node_option("--max-associations", click.IntRange(min=1), NODE_DEFAULTS.max_associations),
        click.option(
            "--sop-classes",
            default="image",
            show_default=True,
            help="storage SOP classes accepted: image (the image storage classes), all, or UIDs "
            "separated by commas",
        ),
        _node_option(
            "--max-pdu-kb",
            click.IntRange(min=1),
            NODE_DEFAULTS.max_pdu_bytes >> 10,
            "a PDU declaring more closes the connection before it is read",
        ),
        _node_option(
            "--max-instance-mb",
            click.IntRange(min=1),
            NODE_DEFAULTS.max_instance_bytes >> 20,
            "an instance (data set) larger than this closes the connection while it arrives",
        ),
        _node_option(
            "--failed-keep",
            click.IntRange(min=0),
            NODE_DEFAULTS.failed_keep,
            "instances kept in SPOOL/failed/ at most (the newest)",
        ),
        _node_option(
            "--failed-days",
            click.FloatRange(min=0),
            NODE_DEFAULTS.failed_days,
            "days an instance is kept in SPOOL/failed/ at most",
        ),
    ],
    _node_limits,
)


def study_options(
    cls: type[Strict], quick_config: Strict, config_help: str, quick_help: str
) -> Decorator:
    """--config and --quick of a measuring command, as ``config``: ``quick_config`` with
    --quick, or --config's file read as ``cls``, or its defaults (`config.study_config`)."""
    return bundle(
        "config",
        [
            click.option("--config", "config_file", type=PATH, help=f"YAML or JSON: {config_help}"),
            click.option("--quick", is_flag=True, help=quick_help),
        ],
        lambda config_file, quick: study_config(cls, quick_config, config_file, quick),
    )


def passphrase(confirm: bool) -> str:
    """PRIMIS_PASSPHRASE, or a hidden prompt on a terminal."""
    value = os.environ.get("PRIMIS_PASSPHRASE")
    if value:
        return value
    if not sys.stdin.isatty():
        raise PrimisError("no passphrase: set PRIMIS_PASSPHRASE or run on a terminal")
    return click.prompt("passphrase", hide_input=True, confirmation_prompt=confirm)


def _one_passphrase(asked: bool, passphrase_file: Path | None) -> None:
    if asked and passphrase_file:
        raise PrimisError("--passphrase and --passphrase-file: give one")


def key_protection_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--to, --passphrase and --passphrase-file: who the keys written are wrapped for (see
    `key_wrapping`)."""
    func = click.option(
        "--passphrase-file",
        type=PATH,
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
        type=PATH,
        help="wrap keys for this recipient's public key NAME.pub (repeatable); keys are then "
        "never written in clear",
    )(func)


def key_wrapping(
    recipients: tuple[Path, ...], use_passphrase: bool, passphrase_file: Path | None
) -> KeyWrapping | None:
    """The `KeyWrapping` of `key_protection_options`' values, or None (plain keys)."""
    from primis.keywrap import KeyWrapping, read_passphrase_file

    _one_passphrase(use_passphrase, passphrase_file)
    secret = read_passphrase_file(passphrase_file) if passphrase_file else None
    if use_passphrase:
        secret = passphrase(confirm=True)
    if not recipients and not secret:
        return None
    return KeyWrapping(recipients, secret)


def wrapped_key_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--identity, --passphrase and --passphrase-file: what opens keys wrapped for recipients
    (see `key_secrets`)."""
    func = click.option(
        "--passphrase-file",
        type=PATH,
        help="keys are wrapped with the passphrase on this file's first line",
    )(func)
    func = click.option(
        "--passphrase",
        "ask_passphrase",
        is_flag=True,
        help="keys are wrapped with a passphrase (prompt, or PRIMIS_PASSPHRASE)",
    )(func)
    return click.option("--identity", type=PATH, help="private key for wrapped keys")(func)


def key_secrets(
    identity: Path | None, ask_passphrase: bool, passphrase_file: Path | None
) -> tuple[Any, str | None]:
    """The loaded identity and the passphrase of `wrapped_key_options`' values."""
    from primis.keywrap import load_identity, read_passphrase_file

    _one_passphrase(ask_passphrase, passphrase_file)
    secret = load_identity(identity) if identity else None
    if passphrase_file:
        return secret, read_passphrase_file(passphrase_file)
    return secret, passphrase(confirm=False) if ask_passphrase else None


def tls_options(side: str) -> Decorator:
    """--tls-cert, --tls-key, --tls-ca of `serve` (side "node") and `restore-to` ("client");
    see `tls_context`."""
    ca_help = {
        "node": "PEM bundle of the authorities whose client certificates are accepted: "
        "mutual TLS, a client without one is refused",
        "client": "PEM bundle of the authorities trusted to sign the node's certificate "
        "(default with --tls: the system's)",
    }[side]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for name, text in reversed(
            [
                ("--tls-cert", f"this {side}'s certificate chain (PEM); with --tls-key: TLS"),
                ("--tls-key", f"this {side}'s private key (PEM)"),
                ("--tls-ca", ca_help),
            ]
        ):
            func = click.option(name, type=PATH, help=text)(func)
        return func

    return decorate


def tls_context(
    side: str, cert: Path | None, key: Path | None, ca: Path | None, on: bool = False
) -> ssl.SSLContext | None:
    """The ssl context of `tls_options`' values (None: plain TCP). A node needs a certificate
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


cluster_option = click.option(
    "--cluster",
    metavar="ADDRESS",
    help="run on a Dask cluster: a scheduler's address (tcp://host:8786), or local:N for N "
    "worker processes here; needs pip install 'primis[cluster]' and shared storage",
)


def connect(address: str | None, workers: int = 1) -> AbstractContextManager[Any]:
    """`primis.cluster.connect` (a one-line error without the ``cluster`` extra); without an
    address, no client (the batch runs here)."""
    from primis.cluster import connect

    if address is None:
        return nullcontext()
    if workers != 1:
        raise PrimisError("give --workers or --cluster, not both")
    return connect(address)


@contextmanager
def status(text: str) -> Iterator[None]:
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
def step_bar(label: str) -> Iterator[Callable[[int, int], None]]:
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


def show_warning(show: Callable[..., None]) -> Callable[..., None]:
    """``show`` (`warnings.showwarning`), but a `PrivacyWarning` as one 'warning: ...' line."""

    def shown(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, PrivacyWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            show(message, category, *args, **kwargs)

    return shown


def summary(result: BatchResult, label: str) -> None:
    """A batch's summary line; any failed item makes the exit status 1."""
    said = [f"{result.done} done", f"{len(result.failures)} failed"]
    if result.skipped:  # said only when some were, with why
        said.insert(1, f"{result.skipped} skipped (outputs exist; --overwrite to redo)")
    click.echo(f"{label}: {', '.join(said)}")
    if result.failures:
        raise PrimisError(f"{len(result.failures)} of {result.items} file(s) failed")


def run_batch(
    items: list[Path],
    work: Callable[[Path], str],
    label: str,
    failed: dict[Path, str],
) -> None:
    """`batch.run_batch` here, then its summary line."""
    from primis.batch import run_batch

    summary(run_batch(items, work, label, failed), label)


class Command(click.Command):
    """A command whose line in `primis --help` is its docstring's whole first paragraph (click
    would cut it at 45 characters)."""

    def get_short_help_str(self, limit: int = 45) -> str:
        first = (self.help or "").split("\n\n")[0]
        return self.short_help or " ".join(first.split())


class Group(click.Group):
    """A group of `Command`s (and of groups like itself), its own line in `primis --help`
    whole too."""

    command_class = Command
    group_class = type
    get_short_help_str = Command.get_short_help_str
