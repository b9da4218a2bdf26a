"""The `primis` command line: each command a short function over the API, with the options
of `primis.cli_options`. Every failure ends in one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from primis import cli_options as opt
from primis.config import NODE_DEFAULTS, QUICK_ATTACKS, QUICK_UTILITY, AttackConfig, UtilityConfig
from primis.errors import PrimisError, PrivacyWarning

if TYPE_CHECKING:
    from primis.api import ShareOptions


@click.group(cls=opt.Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="primis")
def cli() -> None:
    """PRIMIS: share medical images as public sparse codes plus small private keys."""


@cli.command()
@click.argument("root", type=opt.PATH)
@click.option("--out", "out_dir", required=True, type=opt.PATH, help="folder of the lists")
@click.option("--ratios", nargs=3, type=float, default=(0.9, 0.05, 0.05), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--group-by", help="regex on file names; its first group keeps images together")
def split(root: Path, out_dir: Path, ratios, seed: int, group_by: str | None) -> None:
    """Write train.txt, valid.txt and test.txt (paths relative to --out) for ROOT's images."""
    from primis.data import resolve_sources, write_split_lists

    written = write_split_lists(resolve_sources(root), out_dir, ratios, seed, group_by)
    for name, (count, path) in written.items():
        click.echo(f"{name}: {count} images -> {path}")


@cli.command()
@click.option("--config", "config_file", type=opt.PATH, help="YAML or JSON")
@click.option("--data", type=opt.PATH, help="folder or list file")
@click.option("--valid", type=opt.PATH, help="validation folder or list file")
@click.option("--out", type=opt.PATH, help="run directory")
@click.option("--resume", is_flag=False, flag_value="", help="continue RUN (or --out)")
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
    overrides = dict(steps=max_steps, max_minutes=max_minutes, device=device, threads=threads)
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
@click.option("--data", required=True, type=opt.PATH, help="training images")
@click.option("--valid", required=True, type=opt.PATH, help="validation images")
@click.option("--out", required=True, type=opt.PATH, help="model directory")
@click.option("--config", "config_file", type=opt.PATH, help="YAML or JSON")
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
    model, train_paths = load_model(model_dir), resolve_sources(data)
    result = run_finetune(model, train_paths, resolve_sources(valid), out, config)
    click.echo(
        f"done: {result.steps} decoder steps; refined validation PSNR {result.start_psnr:.2f} -> "
        f"{result.best_psnr:.2f} dB; model in {out}"
    )


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@opt.with_model
@click.option("--public-dir", required=True, type=opt.PATH, help="where public files go")
@click.option("--key-dir", required=True, type=opt.PATH, help="where keys go (0700, keys 0600)")
@opt.sharing_options
@click.option("--overwrite", is_flag=True, help="redo inputs whose outputs exist")
@click.option("--shard", help="I/N: process every N-th input from the I-th (0-based)")
@opt.workers_option
@opt.cluster_option
@opt.names_option
@opt.key_protection_options
def ambiguate(
    inputs, model_dir, device, public_dir, key_dir, options: ShareOptions, overwrite, shard,
    workers, cluster, names, recipients, use_passphrase, passphrase_file,
) -> None:  # fmt: skip
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
    wrapping = opt.key_wrapping(recipients, use_passphrase, passphrase_file)
    model = opt.load_model(model_dir, device)  # then what needs torch
    from primis.cluster import share_many

    with opt.connect(cluster, workers) as client:
        result = share_many(
            items, public_dir, key_dir, model, client=client, workers=workers, device=device,
            names=names, overwrite=overwrite, wrapping=wrapping, **options,
        )  # fmt: skip
    opt.summary(result, "ambiguate")


@cli.command()
@click.argument("publics", nargs=-1, required=True)
@opt.with_model
@click.option("--key-dir", type=opt.PATH, help="folder of <stem>.primiskey")
@click.option("--out-dir", required=True, type=opt.PATH, help="where reconstructions go")
@click.option("--without-key", is_flag=True, help="write what an attacker decodes instead")
@opt.wrapped_key_options
@click.option("--overwrite", is_flag=True, help="redo files whose output exists")
@click.option("--shard", help="I/N: process every N-th file from the I-th (0-based)")
@opt.cluster_option
@opt.output_mode_option
def disambiguate(
    publics, model_dir, device, key_dir, out_dir, without_key, identity, ask_passphrase,
    passphrase_file, overwrite, shard, cluster, output_mode: int,
) -> None:  # fmt: skip
    """Reconstruct each PUBLIC file with its key (or, --without-key, show the attacker's view).

    PUBLICS are .primis files, folders or glob patterns. DICOM inputs come back as DICOM,
    others in their own type (PNG, TIFF or .npy) with their size, dtype and range, as
    OUT_DIR/<public file's name>.<type>.
    """
    from primis.batch import expand, select_shard
    from primis.formats import is_public_file

    if key_dir is None and not without_key:
        raise PrimisError("--key-dir is required (or --without-key for the attacker's view)")
    items = select_shard(expand(publics, is_public_file), shard)
    if cluster and (ask_passphrase or passphrase_file):
        raise PrimisError("--cluster opens wrapped keys with --identity only (no passphrase)")
    secret, passphrase = opt.key_secrets(identity, ask_passphrase, passphrase_file)
    model = opt.load_model(model_dir, device)  # then what needs torch
    from primis.cluster import restore_many

    with opt.connect(cluster) as client:
        result = restore_many(
            items, key_dir, out_dir, model, client=client, device=device,
            identity=identity if cluster else secret, passphrase=passphrase, mode=output_mode,
            overwrite=overwrite, without_key=without_key,
        )  # fmt: skip
    opt.summary(result, "disambiguate")


@cli.command()
@opt.listen_options
@click.option("--public-dir", required=True, type=opt.PATH, help="where public files go")
@click.option("--key-dir", required=True, type=opt.PATH, help="where keys go (0700, keys 0600)")
@click.option(
    "--spool-dir",
    type=opt.PATH,
    help="received instances wait here until shared (patient data; default KEY_DIR/spool)",
)
@opt.with_model
@opt.sharing_options
@click.option(
    "--allow", multiple=True, help="accept associations only from this calling AE (repeatable)"
)
@opt.node_options
@opt.tls_options("node")
@opt.key_protection_options
def serve(
    listen: dict[str, Any], public_dir, key_dir, spool_dir, model_dir, device,
    options: ShareOptions, allow, limits: dict[str, Any], tls_cert, tls_key, tls_ca, recipients,
    use_passphrase, passphrase_file,
) -> None:  # fmt: skip
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

    tls = opt.tls_context("node", tls_cert, tls_key, tls_ca)
    wrapping = opt.key_wrapping(recipients, use_passphrase, passphrase_file)
    model = opt.load_model(model_dir, device)  # then what needs torch
    from primis.dicomnode import DicomNode

    node = DicomNode(
        public_dir, key_dir, model, spool_dir=spool_dir, allow=allow, tls=tls, wrapping=wrapping,
        **listen, **limits, **options,
    )  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO log shows data sets
    node.serve(lambda line: click.echo(line, err=True))


@cli.command("restore-to")
@click.argument("publics", nargs=-1, required=True)
@opt.with_model
@click.option("--key-dir", required=True, type=opt.PATH, help="folder of the keys")
@click.option("--host", required=True, help="the receiving DICOM node")
@click.option("--port", required=True, type=click.IntRange(1, 65535))
@click.option("--called-ae", required=True, help="the receiving node's AE title")
@click.option(
    "--calling-ae", default=NODE_DEFAULTS.ae_title, show_default=True, help="this side's AE title"
)
@opt.wrapped_key_options
@click.option("--shard", help="I/N: process every N-th file from the I-th (0-based)")
@click.option("--tls", "use_tls", is_flag=True, help="send over TLS (implied by --tls-*)")
@opt.tls_options("client")
def restore_to(
    publics, model_dir, device, key_dir, host, port, called_ae, calling_ae, identity,
    ask_passphrase, passphrase_file, shard, use_tls, tls_cert, tls_key, tls_ca,
) -> None:  # fmt: skip
    """Send the authorized reconstruction of each PUBLIC file to a DICOM node by C-STORE.

    Each is restored in memory as DICOM (the original header where the key holds it, from
    `ambiguate --keep-header`; otherwise a de-identified one) and sent over one association;
    nothing is written to disk.
    """
    from primis.batch import duplicate_stems, expand, select_shard
    from primis.formats import is_public_file

    items = select_shard(expand(publics, is_public_file), shard)
    tls = opt.tls_context("client", tls_cert, tls_key, tls_ca, on=use_tls)
    secret, passphrase = opt.key_secrets(identity, ask_passphrase, passphrase_file)
    model = opt.load_model(model_dir, device)  # then what needs torch
    from primis.dicomnode import StorageClient
    from primis.dicomnode import restore_to as send_restored

    def work(path: Path) -> str:
        answer = send_restored(path, key_dir, node, model, identity=secret, passphrase=passphrase)
        return f"{path.name} -> {called_ae} at {host}:{port} (status 0x{answer:04X})"

    with StorageClient(host, port, called_ae, calling_ae, tls=tls) as node:
        opt.run_batch(items, work, "restore-to", duplicate_stems(items))


@cli.group()
def keys() -> None:
    """Recipient key pairs, and key files wrapped for recipients or a passphrase."""


@keys.command("gen")
@click.option(
    "--out", required=True, type=opt.PATH, help="NAME: writes NAME (private, 0600) and NAME.pub"
)
def keys_gen(out: Path) -> None:
    """Make a recipient key pair (X25519)."""
    from primis.keywrap import write_identity

    public_path = write_identity(out)
    click.echo(f"identity {out} (keep it private); give {public_path} to data owners")


@keys.command("wrap")
@click.argument("keyfiles", nargs=-1, required=True)
@opt.key_protection_options
def keys_wrap(keyfiles, recipients, use_passphrase, passphrase_file) -> None:
    """Encrypt key files in place for recipients and/or a passphrase (keys written by
    `ambiguate` or `serve` with --to or a passphrase are wrapped already, never in clear)."""
    from primis.batch import expand
    from primis.formats import is_key_file
    from primis.keywrap import wrap_key_file

    wrapping = opt.key_wrapping(recipients, use_passphrase, passphrase_file)
    if wrapping is None:
        raise PrimisError("keys wrap needs --to NAME.pub, --passphrase or --passphrase-file")
    opt.run_batch(expand(keyfiles, is_key_file), lambda p: wrap_key_file(p, wrapping), "wrap", {})


@cli.command()
@click.argument("out_dir", type=opt.PATH)
def samples(out_dir: Path) -> None:
    """Copy the bundled sample radiographs (two CRs; provenance in SOURCES.md) to OUT_DIR."""
    from primis.samples import copy_samples

    click.echo("\n".join(str(path) for path in copy_samples(out_dir)))


@cli.command()
@click.option("--image", type=opt.PATH, help="your own image (default: a bundled chest CR)")
@opt.with_model
@click.option("--out", type=opt.PATH, default=Path("primis-demo"), show_default=True)
@opt.refine_option
def demo(image, model_dir, device, out, refine_steps) -> None:
    """Share one image and show what the key holder and an attacker each get (no network)."""
    started = time.perf_counter()
    with opt.status("starting (importing torch)"):
        from primis.demo import report_lines, run_demo, train_demo_model
        from primis.modelstore import bundled_models
    if model_dir is None and "cxr" not in bundled_models():
        click.echo("no bundled model: training a small one on synthetic images (minutes)...")
        model_dir = train_demo_model(out / "model")
    model = opt.load_model(model_dir, device)
    with opt.step_bar("refining the code") as progress:
        report = run_demo(model, image, out, refine_steps, progress)
    click.echo("\n".join(report_lines(report)))
    click.echo(f"files in {report['files']}; {time.perf_counter() - started:.1f} s in all")


@cli.command()
@opt.with_model
@click.option(
    "--attacker-data",
    required=True,
    type=opt.PATH,
    help="the attacker's own images (folder or list)",
)
@click.option(
    "--target-data",
    required=True,
    type=opt.PATH,
    help="the images whose public files are attacked (folder or list)",
)
@opt.obfuscation_options
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
@click.option("--out", type=opt.PATH, default=Path("primis-attack"), show_default=True)
@click.option(
    "--masks",
    type=opt.PATH,
    help="lung masks named like the images: adds the segmentation utility study",
)
@opt.refine_option
@opt.study_options(
    AttackConfig,
    QUICK_ATTACKS,
    "how long the learned attacks train, and the seed (see AttackConfig)",
    "every attack, trained briefly (a smoke test)",
)
@click.option(
    "--linkage",
    "linkage_only",
    is_flag=True,
    help="only the linkage attack (fast): rank the targets' originals among the attacker's "
    "images for each public file (linkage.md, linkage.json)",
)
def attack(
    model_dir, device, attacker_data, target_data, chosen: ShareOptions, frontier, budget_check,
    out, masks, refine_steps, config, linkage_only,
) -> None:  # fmt: skip
    """Run every attack of the threat model against public files; report vs prior-only."""
    if frontier and chosen["obfuscation"]:
        raise PrimisError(
            "--frontier attacks every mode: leave out --fill, --mask-signs and --pad-size-class"
        )
    config = config.model_copy(update={"budget_check": budget_check or config.budget_check})
    model = opt.load_model(model_dir, device)  # then what needs torch
    from primis.api import obfuscation_for
    from primis.attacks import run_attacks, write_report
    from primis.data import resolve_sources

    attackers, targets = resolve_sources(attacker_data), resolve_sources(target_data)
    if frontier and not linkage_only:
        from primis.frontier import frontier as measure
        from primis.frontier import write_frontier
        from primis.report import machine_info

        series = measure(model, attackers, {"targets": (targets, masks)}, config, refine_steps)
        click.echo(write_frontier(series, out, machine_info()))
        click.echo(f"report: {out}/frontier.md, frontier.json, frontier.png")
        return
    obfuscation = obfuscation_for(model, chosen["obfuscation"], chosen["privacy"])
    if linkage_only:
        from primis.linkage import run_linkage

        click.echo(run_linkage(model, attackers, targets, obfuscation, config, refine_steps, out))
        click.echo(f"report: {out / 'linkage.md'}, {out / 'linkage.json'}")
        return
    report, views = run_attacks(
        model, attackers, targets, obfuscation, config, masks=masks, refine_steps=refine_steps
    )
    click.echo(write_report(report, views, out))
    click.echo(f"report: {out / 'attack.md'}, {out / 'attack.json'}, {out / 'attacks.png'}")


@cli.command()
@opt.with_model
@click.option(
    "--data",
    type=opt.PATH,
    default=Path("../shared/data"),
    show_default=True,
    help="folder holding cxr/ (images and lung masks) and cxr-multi/ (the tasks' sources)",
)
@click.option(
    "--attacker-data",
    required=True,
    type=opt.PATH,
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
@click.option("--out", type=opt.PATH, default=Path("primis-utility"), show_default=True)
@opt.obfuscation_options
@opt.refine_option
@opt.study_options(
    UtilityConfig,
    QUICK_UTILITY,
    "image size, classifier, bootstrap, U-Net, bins, attacks (UtilityConfig)",
    "every study, briefly (a smoke test)",
)
def utility(
    model_dir, device, data, attacker_data, attackers, tasks, per_source, masked_images, out,
    chosen: ShareOptions, refine_steps, config,
) -> None:  # fmt: skip
    """Classification, texture and segmentation on originals, authorized reconstructions,
    JPEG 2000 at the key's bytes, the best attack and prior-only (utility.md, .json, plots).

    Each completed stage is kept in OUT/stages: the same command run again resumes after the
    last one (a long study runs in slices); any changed option starts afresh."""
    model = opt.load_model(model_dir, device)
    import primis.utility_report as study
    from primis.api import obfuscation_for
    from primis.report import machine_info

    obfuscation = obfuscation_for(model, chosen["obfuscation"], chosen["privacy"])
    inputs = study.study_inputs(
        data, attacker_data, attackers, tasks, per_source, masked_images, config.seed
    )
    report, views = study.utility_report(
        model, inputs, config, refine_steps, obfuscation, cache=out / "stages"
    )
    click.echo(study.write_utility_report(report, views, out, machine_info()))
    click.echo(f"report: {out / 'utility.md'}, {out / 'utility.json'}, plots in {out}")


@cli.command()
@opt.with_model
@click.option("--data", required=True, type=opt.PATH, help="images to measure (folder or list)")
@click.option(
    "--ks",
    callback=opt.int_list("--ks"),
    help="k values for the rate-distortion table, e.g. 1,2,4 (default 1..k)",
)
@click.option("--out", type=opt.PATH, default=Path("primis-evaluate"), show_default=True)
@opt.refine_option
@click.option("--quick", is_flag=True, help="at most 4 images (for tests)")
def evaluate(model_dir, device, data, ks, out, refine_steps, quick) -> None:
    """Authorized quality, key size and speed per image; rate-distortion vs JPEG/JPEG 2000."""
    model = opt.load_model(model_dir, device)  # then what needs torch
    from primis.data import resolve_sources
    from primis.evaluation import evaluate as measure
    from primis.evaluation import write_report

    report = measure(model, resolve_sources(data)[: 4 if quick else None], ks, refine_steps)
    click.echo(write_report(report, out))
    click.echo(f"report: {out / 'evaluate.md'}, {out / 'evaluate.json'}")


@cli.command()
@click.argument("run", type=opt.PATH)
@click.option("--out", required=True, type=opt.PATH, help="the new model directory")
@click.option("--half", is_flag=True, help="store weights as float16 (half the size)")
@click.option(
    "--key-data",
    type=opt.PATH,
    help="folder or list file: fit the key model to these images' codes (context-coded keys)",
)
@click.option("--key-refine-steps", type=int, default=0, show_default=True)
@click.option(
    "--key-couplings/--no-key-couplings",
    default=True,
    show_default=True,
    help="key model with couplings: smaller keys, coded in somewhat more time",
)
@click.option(
    "--base",
    help="bundled model: store only the tensors that differ from it (for the bundled zoo)",
)
@click.option(
    "--residual-psnr",
    type=click.FloatRange(0, 100, min_open=True),
    help="keys also carry a high-fidelity layer: the residual coded up to this PSNR (dB)",
)
def export(
    run: Path,
    out: Path,
    half: bool,
    key_data: Path | None,
    key_refine_steps: int,
    key_couplings: bool,
    base: str | None,
    residual_psnr: float | None,
) -> None:
    """Copy a run's model into a standalone model directory (e.g. for the bundled zoo)."""
    from primis.api import export_model
    from primis.data import resolve_sources

    images = resolve_sources(key_data) if key_data else None
    digest = export_model(
        run,
        out,
        half=half,
        key_images=images,
        key_refine_steps=key_refine_steps,
        key_couplings=key_couplings,
        base=base,
        residual_psnr=residual_psnr,
    )
    click.echo(f"model {digest} -> {out}")


@cli.command()
@click.argument("file", type=opt.PATH)
def info(file: Path) -> None:
    """Describe a public file, a key file, a wrapped key or a model directory (as JSON)."""
    from primis.formats import describe

    if file.is_dir() or not file.exists():
        from primis.modelstore import bundled_models, describe_model

        if file.is_dir() or str(file) in bundled_models():  # loads torch: only then
            click.echo(json.dumps(describe_model(file), indent=2))
            return
    click.echo(json.dumps(describe(file), indent=2))


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command; PrimisError becomes 'error: ...' and exit status 1."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", PrivacyWarning)  # the API says it once per call
            warnings.showwarning = opt.show_warning(warnings.showwarning)
            result = cli.main(args=argv, prog_name="primis", standalone_mode=False)
        sys.exit(result if isinstance(result, int) else 0)
    except (PrimisError, OSError) as err:
        from primis.batch import describe_os_error

        _fail(str(err) if isinstance(err, PrimisError) else describe_os_error(err))
        sys.exit(1)
    except click.exceptions.Abort:
        _fail("aborted")
        sys.exit(130)
    except click.exceptions.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted")
        sys.exit(130)
