"""The `primis` command line. Every failure ends in one line on stderr and a non-zero exit."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click

from primis.errors import PrimisError


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
    from primis.imageio import write_atomic

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
    from primis.config import RunConfig, load_run_config, parse_config
    from primis.data import resolve_sources, scan_images, split_paths
    from primis.imageio import write_atomic
    from primis.train import load_run
    from primis.train import train as run_training

    if resume is not None:
        out = Path(resume) if resume else out
        if out is None:
            raise PrimisError("--resume needs the run directory (--resume RUN or --out RUN)")
        if config_file or data or valid:
            raise PrimisError("--resume takes its config and data from the run directory")
        config = load_run(out)
        data, valid = out / "train.txt", out / "valid.txt"
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
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        merged = config.model_dump()
        merged["train"].update(overrides)
        config = parse_config(RunConfig, merged, "command line")
    paths = resolve_sources(data)
    if resume is None:
        if valid is not None:
            valid_paths = resolve_sources(valid)
        else:
            parts = split_paths(paths, (0.95, 0.05, 0.0), config.train.seed)
            paths, valid_paths = parts["train"], parts["valid"] or parts["train"][:1]
        paths, problems = scan_images(paths, strict)
        valid_paths, valid_problems = scan_images(valid_paths, strict)
        problems += valid_problems
        for problem in problems:
            click.echo(f"skipped: {problem}", err=True)
        if not paths or not valid_paths:
            raise PrimisError("no readable training or validation images")
        out.mkdir(parents=True, exist_ok=True)
        for name, part in (("train.txt", paths), ("valid.txt", valid_paths)):
            write_atomic(out / name, "".join(f"{p.resolve()}\n" for p in part).encode())
    else:
        valid_paths, problems = resolve_sources(valid), []
    click.echo(f"training on {len(paths)} images, validating on {len(valid_paths)}; run: {out}")
    result = run_training(config, paths, valid_paths, out, resume=resume is not None)
    click.echo(
        f"done: step {result.steps} after {result.seconds / 60:.1f} min; best pure-ternary "
        f"validation PSNR {result.best_psnr:.2f} dB; model in {out}"
        + (f"; {len(problems)} unreadable file(s) skipped" if problems else "")
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
    from primis.config import FinetuneConfig, load_config, parse_config
    from primis.data import resolve_sources
    from primis.finetune import finetune as run_finetune
    from primis.modelstore import load_model

    config = load_config(FinetuneConfig, config_file) if config_file else FinetuneConfig()
    overrides = {"max_minutes": max_minutes, "threads": threads}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        config = parse_config(FinetuneConfig, config.model_dump() | overrides, "command line")
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


def _load_model(model_dir):
    """The model of --model on the device of --device."""
    from primis.modelstore import load_model, pick_device

    device = click.get_current_context().meta.get("primis.device", "auto")
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


def _obfuscation(model, fill: float | None, mask_signs: bool | None):
    """The model's obfuscation settings with the command line's overrides, validated."""
    from primis.config import ObfuscationConfig, parse_config

    settings = model.obfuscation.model_dump()
    chosen = {"fill": fill, "mask_signs": mask_signs}
    settings.update({name: v for name, v in chosen.items() if v is not None})
    return parse_config(ObfuscationConfig, settings, "obfuscation options")


def _parse_ints(text: str | None, option: str) -> list[int] | None:
    """A comma-separated list of integers (sorted, unique), or None when the option is absent."""
    if text is None:
        return None
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise PrimisError(f"{option} {text}: expected numbers like 0,1") from None


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@_model_option
@click.option("--public-dir", required=True, type=click.Path(path_type=Path))
@click.option("--key-dir", required=True, type=click.Path(path_type=Path))
@click.option("--k", "k", type=int, help="non-zeros per sign (at most the model's k)")
@click.option("--fill", type=float, help="fraction of zero entries filled with noise")
@click.option("--mask-signs/--no-mask-signs", default=None, help="hide the signs of true entries")
@click.option("--maps", help="issue keys for these code maps only, e.g. 0 or 0,1")
@_refine_option
@click.option("--keep-header", is_flag=True, help="put the original DICOM header in the key")
@click.option("--overwrite", is_flag=True, help="redo inputs whose outputs exist")
@click.option("--shard", help="I/N: process every N-th input from the I-th (0-based)")
@click.option(
    "--names",
    type=click.Choice(["auto", "stem", "id"]),
    default="auto",
    show_default=True,
    help="output names: the input's stem, or its random file id (the mapping stays in the "
    "private manifest); auto: file id for DICOM inputs, whose names often hold UIDs",
)
def ambiguate(
    inputs,
    model_dir,
    public_dir,
    key_dir,
    k,
    fill,
    mask_signs,
    maps,
    refine_steps,
    keep_header,
    overwrite,
    shard,
    names,
) -> None:
    """Turn each image into PUBLIC_DIR/NAME.primis and KEY_DIR/NAME.primiskey, where NAME is
    the input's stem or its random file id (--names).

    INPUTS are files, folders (searched recursively) or glob patterns. KEY_DIR/manifest.jsonl
    (0600) maps each input to its file id, public file and key, once per input;
    PUBLIC_DIR/manifest.jsonl lists only file ids, digests and sizes, and may travel with the
    public files. A rerun after an interruption completes what is missing.
    """
    import base64

    from primis.batch import (
        SKIPPED,
        Manifest,
        clean_stale_parts,
        duplicate_stems,
        expand,
        output_folders,
        run_batch,
        select_shard,
        write_together,
    )
    from primis.dicomio import original_header
    from primis.formats import sha256
    from primis.imageio import is_dicom, is_image_file, read_source
    from primis.sharing import share_image

    model = _load_model(model_dir)
    obfuscation = _obfuscation(model, fill, mask_signs)
    key_maps = _parse_ints(maps, "--maps")
    items = select_shard(expand(inputs, is_image_file), shard)
    output_folders(public_dir, key_dir)
    for folder in (public_dir, key_dir):
        clean_stale_parts(folder)
    private = Manifest(key_dir / "manifest.jsonl", "input", mode=0o600)
    # One folder for both: the private manifest alone (it holds everything the public one does).
    same_folder = public_dir.resolve() == key_dir.resolve()
    public_manifest = None if same_folder else Manifest(public_dir / "manifest.jsonl", "file_id")
    known = private.records()

    def by_id(path: Path) -> bool:
        return names == "id" or (names == "auto" and is_dicom(path))

    def dicom_header(path: Path, image) -> str | None:
        if not keep_header or image.details.get("format") != "dicom":
            return None
        return base64.b64encode(original_header(path)).decode()

    def work(path: Path) -> str:
        source = str(path.absolute())
        record = known.get(source) or (
            None if by_id(path) else _existing_pair(source, public_dir, key_dir, path.stem)
        )
        if not overwrite and record is not None and _pair_complete(record):
            if source not in known:  # a pair from before manifests were written first
                private.append(record)
                known[source] = record
            return SKIPPED
        started = time.perf_counter()
        image = read_source(path)
        mapping = image.mapping
        shared = share_image(
            mapping.forward(image.pixels),
            mapping,
            model,
            obfuscation,
            k,
            key_maps,
            image.details,
            dicom_header(path, image),
            refine_steps,
        )
        name = shared.file_id if by_id(path) else path.stem
        public_path = (public_dir / f"{name}.primis").absolute()
        key_path = (key_dir / f"{name}.primiskey").absolute()
        new = {
            "input": source,
            "file_id": shared.file_id,
            "public": str(public_path),
            "key": str(key_path),
            "public_sha256": sha256(shared.public),
        }
        write_together(
            [(key_path, shared.key, 0o600), (public_path, shared.public, None)],
            lambda: private.append(new),
        )
        known[source] = new
        _remove_replaced(record, new)
        if public_manifest is not None:
            public_manifest.append(_public_entry(new, len(shared.public)))
        return (
            f"{path.name}: public {len(shared.public)} B, key {len(shared.key)} B "
            f"({8 * len(shared.key) / shared.pixels:.3f} bpp; "
            f"ideal support {shared.ideal_key_bits / 8:.0f} B) "
            f"in {time.perf_counter() - started:.2f} s"
        )

    def finish() -> None:
        records = private.compact()
        if public_manifest is not None:
            with public_manifest.locked():
                public_manifest.replace(
                    _public_entry(r, Path(r["public"]).stat().st_size)
                    for r in records.values()
                    if isinstance(r.get("public"), str) and Path(r["public"]).is_file()
                )

    try:
        run_batch(items, work, "ambiguate", duplicate_stems([p for p in items if not by_id(p)]))
    except BaseException:
        with contextlib.suppress(OSError, PrimisError):
            finish()  # best effort: the rerun compacts what this one could not
        raise
    finish()


def _public_entry(record: dict, size: int) -> dict:
    """A public manifest line: file id, digest and size, nothing about the input."""
    return {"file_id": record["file_id"], "public_sha256": record["public_sha256"], "bytes": size}


def _existing_pair(source: str, public_dir: Path, key_dir: Path, stem: str) -> dict | None:
    """The manifest record of a complete stem-named pair already on disk (written by a run that
    left no manifest line for it), or None."""
    from primis.formats import PublicFile, read_file, sha256

    public_path, key_path = public_dir / f"{stem}.primis", key_dir / f"{stem}.primiskey"
    try:
        public = read_file(public_path)
        file_id = PublicFile.from_bytes(public).header.file_id
    except PrimisError:
        return None
    record = {
        "input": source,
        "file_id": file_id,
        "public": str(public_path.absolute()),
        "key": str(key_path.absolute()),
        "public_sha256": sha256(public),
    }
    return record if _pair_complete(record) else None


def _remove_replaced(old: dict | None, new: dict) -> None:
    """Delete the outputs an input had before it was redone under other names (file-id names
    change on every run); only files beside the new ones, of the same kind, are touched."""
    for field in ("public", "key"):
        before = old.get(field) if old else None
        if not isinstance(before, str):
            continue
        before, after = Path(before), Path(new[field])
        beside = (before.parent, before.suffix) == (after.parent, after.suffix)
        if before.is_absolute() and beside and before != after:
            before.unlink(missing_ok=True)


def _pair_complete(record: dict) -> bool:
    """Whether a manifest record's public file and key are both in place and belong together
    (a wrapped key counts as its key)."""
    from primis.formats import KeyFile, read_file, sha256
    from primis.keywrap import is_wrapped

    try:
        public, key = read_file(Path(record["public"])), read_file(Path(record["key"]))
        if sha256(public) != record.get("public_sha256"):
            return False
        return is_wrapped(key) or KeyFile.from_bytes(key).header.public_sha256 == sha256(public)
    except (PrimisError, KeyError, TypeError):
        return False


@cli.command()
@click.argument("publics", nargs=-1, required=True)
@_model_option
@click.option("--key-dir", type=click.Path(path_type=Path), help="folder of <stem>.primiskey")
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@click.option("--without-key", is_flag=True, help="write what an attacker decodes instead")
@click.option("--identity", type=click.Path(path_type=Path), help="private key for wrapped keys")
@click.option(
    "--passphrase",
    "ask_passphrase",
    is_flag=True,
    help="keys are wrapped with a passphrase (prompt, or PRIMIS_PASSPHRASE)",
)
@click.option("--overwrite", is_flag=True, help="redo files whose output exists")
@click.option("--shard", help="I/N: process every N-th file from the I-th (0-based)")
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
    overwrite,
    shard,
    output_mode,
) -> None:
    """Reconstruct each PUBLIC file with its key (or, --without-key, show the attacker's view).

    PUBLICS are .primis files, folders or glob patterns. DICOM inputs come back as DICOM,
    others in their own type (PNG, TIFF or .npy) with their size, dtype and range, as
    OUT_DIR/<public file's name>.<type>.
    """
    import base64

    import numpy as np

    from primis.batch import (
        SKIPPED,
        clean_stale_parts,
        duplicate_stems,
        expand,
        output_folders,
        run_batch,
        select_shard,
    )
    from primis.dicomio import encode_dicom
    from primis.formats import read_file
    from primis.imageio import OUTPUT_SUFFIXES, encode_image, output_suffix, write_atomic
    from primis.keywrap import is_wrapped, load_identity, unwrap
    from primis.sharing import attacker_view, reconstruct

    if key_dir is None and not without_key:
        raise PrimisError("--key-dir is required (or --without-key for the attacker's view)")
    model = _load_model(model_dir)
    secret = load_identity(identity) if identity else None
    passphrase = _passphrase(confirm=False) if ask_passphrase else None
    try:
        mode = int(output_mode, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise PrimisError(f"--output-mode {output_mode}: expected octal permissions like 600")
    items = select_shard(expand(publics, lambda p: p.suffix == ".primis"), shard)
    output_folders(out_dir)
    clean_stale_parts(out_dir)
    suffixes = (".png",) if without_key else OUTPUT_SUFFIXES

    def work(path: Path) -> str:
        if not overwrite and any((out_dir / f"{path.stem}{s}").exists() for s in suffixes):
            return SKIPPED
        public = read_file(path)
        if without_key:
            view = attacker_view(public, model, str(path))
            target = out_dir / f"{path.stem}.png"
            write_atomic(target, encode_image(np.rint(view * 255).astype(np.uint8), ".png"))
            return f"{path.name} -> {target} (attacker's view)"
        key_path = key_dir / f"{path.stem}.primiskey"
        key_bytes = read_file(key_path)
        if is_wrapped(key_bytes):
            key_bytes = unwrap(key_bytes, secret, passphrase, str(key_path))
        pixels, key = reconstruct(public, key_bytes, model, str(path), str(key_path))
        details = key.header.source
        if details.get("format") == "dicom":
            target = out_dir / f"{path.stem}.dcm"
            header = base64.b64decode(key.header.dicom_header) if key.header.dicom_header else None
            data = encode_dicom(pixels, details, header, key.header.file_id)
        else:
            target = out_dir / f"{path.stem}{output_suffix(details, pixels.dtype)}"
            data = encode_image(pixels, target.suffix)
        write_atomic(target, data, mode)
        return f"{path.name} -> {target}"

    run_batch(items, work, "disambiguate", duplicate_stems(items))


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
    from primis.imageio import write_atomic
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
@click.option(
    "--to",
    "recipients",
    multiple=True,
    type=click.Path(path_type=Path),
    help="recipient public key NAME.pub (repeatable)",
)
@click.option(
    "--passphrase",
    "use_passphrase",
    is_flag=True,
    help="also wrap for a passphrase (prompt, or PRIMIS_PASSPHRASE)",
)
def keys_wrap(keyfiles, recipients, use_passphrase) -> None:
    """Encrypt key files in place for recipients and/or a passphrase."""
    from primis.batch import expand, run_batch
    from primis.formats import KeyFile, read_file
    from primis.imageio import write_atomic
    from primis.keywrap import is_wrapped, load_recipient, wrap

    publics = [load_recipient(path) for path in recipients]
    passphrase = _passphrase(confirm=True) if use_passphrase else None
    if not publics and not passphrase:
        raise PrimisError("keys wrap needs --to NAME.pub or --passphrase")

    def work(path: Path) -> str:
        data = read_file(path)
        if is_wrapped(data):
            raise PrimisError(f"{path}: already wrapped")
        KeyFile.from_bytes(data, str(path))  # wrap only valid keys
        write_atomic(path, wrap(data, publics, passphrase), mode=0o600)
        return f"{path}: wrapped"

    run_batch(expand(keyfiles, lambda p: p.suffix == ".primiskey"), work, "wrap", {})


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
    from primis.demo import run_demo, train_demo_model
    from primis.modelstore import bundled_models

    started = time.perf_counter()
    if model_dir is None and "cxr" not in bundled_models():
        click.echo("no bundled model: training a small one on synthetic images (< 2 min)...")
        model_dir = train_demo_model(out / "model")
    model = _load_model(model_dir)
    report = run_demo(model, image, out, refine_steps)
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
@click.option("--fill", type=float, help="obfuscation fill (default: the model's)")
@click.option("--mask-signs/--no-mask-signs", default=None)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("primis-attack"), show_default=True
)
@click.option(
    "--masks",
    type=click.Path(path_type=Path),
    help="lung masks named like the images: adds the segmentation utility study",
)
@_refine_option
@click.option("--quick", is_flag=True, help="short attack training (for tests)")
def attack(
    model_dir, attacker_data, target_data, fill, mask_signs, masks, out, refine_steps, quick
) -> None:
    """Run every attack of the threat model against public files; report vs prior-only."""
    from primis.attacks import run_attacks, target_checks
    from primis.data import resolve_sources
    from primis.report import image_rows, markdown_table, write_json

    model = _load_model(model_dir)
    obfuscation = _obfuscation(model, fill, mask_signs)
    report, views = run_attacks(
        model,
        resolve_sources(attacker_data),
        resolve_sources(target_data),
        obfuscation,
        quick,
        masks=masks,
        refine_steps=refine_steps,
    )
    report["model_hash"] = model.hash
    rows = [
        [name, r["psnr"], r["ssim"], r["psnr_above_prior"], r["ssim_above_prior"]]
        for name, r in report["attacks"].items()
    ]
    table = markdown_table(["image", "PSNR dB", "SSIM", "PSNR - prior", "SSIM - prior"], rows)
    d = report["distinguisher"]
    text = (
        f"# PRIMIS attack report\n\nModel `{model.hash[:16]}`, obfuscation "
        f"{obfuscation.model_dump()}; {report['attacker_images']} attacker images, "
        f"{report['target_images']} targets (disjoint).\n\n{table}\n\n"
        f"Distinguisher (true vs noise entries): ROC AUC {d['auc']:.3f}, balanced accuracy "
        f"{d['balanced_accuracy']:.3f} on {d['test_entries']} target entries; the same "
        f"classifier on atom and map index alone (prior only, no public data): ROC AUC "
        f"{report['distinguisher_prior_only']['auc']:.3f}.\n\n"
        f"Key space: median {report['key_space_bits_per_image']['median']:.0f} bits per image "
        f"(minimum {report['key_space_bits_per_image']['min']:.0f}).\n\n![attacks](attacks.png)\n"
    )
    report["targets"] = target_checks(report)
    if "utility_dice" in report:
        dice_table = markdown_table(
            ["image", "Dice (U-Net on originals)", "Dice (U-Net on reconstructions)"],
            [
                [name, d["trained_on_originals"], d["trained_on_reconstructions"]]
                for name, d in report["utility_dice"].items()
            ],
        )
        text += f"\n## Lung segmentation utility\n\n{dice_table}\n"
        click.echo(dice_table)
    targets = markdown_table(
        ["target", "measured", "holds"],
        [[c["target"], c["value"], "yes" if c["holds"] else "NO"] for c in report["targets"]],
    )
    text += f"\n## Targets\n\n{targets}\n"
    click.echo(targets)
    write_json(out / "attack.json", report)
    from primis.imageio import write_atomic

    write_atomic(out / "attack.md", text.encode())
    image_rows({"original": views.pop("originals"), **views}, 4, out / "attacks.png")
    click.echo(table)
    click.echo(
        f"distinguisher AUC {d['auc']:.3f}; key space median "
        f"{report['key_space_bits_per_image']['median']:.0f} bits/image"
    )
    click.echo(f"report: {out / 'attack.md'}, {out / 'attack.json'}, {out / 'attacks.png'}")


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
    from primis.data import resolve_sources
    from primis.evaluation import measure_sharing, rate_distortion, rd_plot, summarize
    from primis.imageio import write_atomic
    from primis.report import markdown_table, write_json

    model = _load_model(model_dir)
    paths = resolve_sources(data)[: 4 if quick else None]
    model_k = model.network.config.k
    k_values = _parse_ints(ks, "--ks") or list(range(1, model_k + 1))
    records_by_k = {
        k: [measure_sharing(model, p, model.obfuscation, k, refine_steps) for p in paths]
        for k in sorted(set(k_values) | {model_k})
    }
    summary = summarize(records_by_k[model_k])
    rows = rate_distortion(paths, {k: records_by_k[k] for k in k_values})
    report = {"model_hash": model.hash, "images": len(paths), "summary": summary, "rd": rows}
    write_json(out / "evaluate.json", report)
    rd_plot(rows, out / "rate_distortion.png")
    table = markdown_table(
        ["k", "key bpp", "PRIMIS PSNR", "JPEG bpp", "JPEG PSNR", "JPEG2000 bpp", "JPEG2000 PSNR"],
        [
            [
                r["k"],
                r["key_bpp"],
                r["primis_psnr"],
                r["jpeg_bpp"],
                r["jpeg_psnr"],
                r["jpeg2000_bpp"],
                r["jpeg2000_psnr"],
            ]
            for r in rows
        ],
    )
    text = (
        f"# PRIMIS evaluation\n\nModel `{model.hash[:16]}` on {len(paths)} images.\n\n"
        f"Authorized PSNR {summary['mean_authorized_psnr']:.2f} dB (mean), SSIM "
        f"{summary['mean_authorized_ssim']:.4f}, MS-SSIM "
        f"{summary['mean_authorized_ms_ssim'] or float('nan'):.4f}; "
        f"key {summary['median_key_bytes']:.0f} B per "
        f"image, {summary['median_key_bits_per_pixel']:.3f} bits per pixel (medians).\n\n"
        f"{table}\n\n![rate-distortion](rate_distortion.png)\n"
    )
    write_atomic(out / "evaluate.md", text.encode())
    click.echo(text)
    click.echo(f"report: {out / 'evaluate.md'}, {out / 'evaluate.json'}")


@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--half", is_flag=True, help="store weights as float16 (half the size)")
def export(run: Path, out: Path, half: bool) -> None:
    """Copy a run's model into a standalone model directory (e.g. for the bundled zoo)."""
    import torch

    from primis.modelstore import load_model, save_model

    model = load_model(run)
    dtype = torch.float16 if half else torch.float32
    digest = save_model(out, model.network, model.obfuscation, dtype)
    click.echo(f"model {digest} -> {out}")


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
def info(file: Path) -> None:
    """Describe a public file, a key file, a wrapped key or a model directory (as JSON)."""
    from primis.formats import KEY_MAGIC, PUBLIC_MAGIC, KeyFile, PublicFile, read_file
    from primis.keywrap import describe, is_wrapped
    from primis.modelstore import bundled_models

    if file.is_dir() or str(file) in bundled_models():
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
        data = read_file(file)
        if data[:8] == KEY_MAGIC:
            key = KeyFile.from_bytes(data, str(file))
            report = key.header.model_dump() | {
                "bytes": len(data),
                "payload_bytes": len(key.payload),
            }
        elif data[:8] == PUBLIC_MAGIC:
            from primis.obfuscation import key_size

            public = PublicFile.from_bytes(data, str(file))
            h = public.header
            ideal, packed = key_size(public.vectors, h.k, h.mask_signs, h.permuted)
            report = public.header.model_dump() | {
                "bytes": len(data),
                "vectors": int(public.vectors.shape[0]),
                "ideal_key_bits": round(ideal, 1),
                "key_payload_bytes": packed,
            }
        elif is_wrapped(data):
            report = describe(data, str(file))
        else:
            raise PrimisError(f"{file}: not a PRIMIS public, key or wrapped key file")
    click.echo(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command; PrimisError becomes 'error: ...' and exit status 1."""
    try:
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
