"""`surd eval`: adapters against the base model (floor) and the keyword prompt (ceiling) on SURD's test split and
the probe sets, scored by CLIP or another scorer."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import ValidationError

from surd.errors import SurdError, explain_validation


def _csv(value: str, flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise SurdError(f"{flag} {value!r}: expected a comma-separated list")
    return items


def _seeds(value: str) -> list[int]:
    try:
        return list(dict.fromkeys(int(v) for v in _csv(value, "--seeds")))
    except ValueError:
        raise SurdError(f"--seeds {value!r}: expected integers, e.g. 0,1") from None


def _floats(value: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in _csv(value, flag)]
    except ValueError:
        raise SurdError(f"{flag} {value!r}: expected numbers, e.g. 3,7.5") from None


def _adapters(values: list[str]) -> tuple[Path | None, dict[str, Path]]:
    """`--adapter PATH` is the arm `adapter`; `--adapter NAME=PATH` the arm NAME."""
    plain: Path | None = None
    named: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            if plain is not None:
                raise SurdError(f"--adapter {value}: a second unnamed adapter; name them, e.g. --adapter mine={value}")
            plain = Path(value)
        elif name.strip() in named or not name.strip() or not path:
            raise SurdError(f"--adapter {value}: expected NAME=PATH with a new name")
        else:
            named[name.strip()] = Path(path)
    return plain, named


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        base: str = typer.Option(..., "--base", help="diffusers SD folder, hub id, or one .safetensors/.ckpt file"),
        base_config: str | None = typer.Option(None, "--base-config", help="single-file --base: its configs' folder"),
        out: Path = typer.Option(..., "--out", "-o", help="evaluation folder (created; rerun to resume)"),
        adapter: list[str] = typer.Option([], "--adapter",
                                          help="`surd train` run folder (arm `adapter`), or NAME=FOLDER; repeatable"),
        clip: str | None = typer.Option(None, "--clip",
                                        help="open_clip folder, or NAME/PRETRAINED (e.g. ViT-L-14/openai)"),
        scorer: str = typer.Option("clip", "--scorer", help="clip, attributes, or a plug-in package.module:factory"),
        judge: str | None = typer.Option(None, "--judge", help="the model folder of a scorer other than clip"),
        keyword: bool = typer.Option(True, "--keyword/--no-keyword",
                                     help="the keyword arm: base model on the keyword prompt (the ceiling)"),
        data: Path | None = typer.Option(None, "--data", help="run folder with an exported dataset (DIR/surd)"),
        probes: str = typer.Option("counting,colour,action", "--probes",
                                   help="probe sets (shipped names or YAML files), comma-separated; 'none' for none"),
        limit: int | None = typer.Option(None, "--limit", min=1, help="at most N prompts per prompt set"),
        seeds: str = typer.Option("0,1", "--seeds", help="seeds, comma-separated; every arm uses the same ones"),
        steps: int = typer.Option(30, "--steps", min=1, help="inference steps"),
        guidance: str = typer.Option("7.5", "--guidance", help="classifier-free guidance scale(s), e.g. 3,7.5"),
        negative_prompt: str = typer.Option("", "--negative-prompt", help="negative prompt for every arm"),
        adapt_unconditional: bool = typer.Option(True, "--adapt-unconditional/--stock-unconditional",
                                                 help="adapter arms: the negative/empty prompt through the adapter "
                                                      "too, or as stock"),
        size: int | None = typer.Option(None, "--size", min=8, help="image side in pixels (default: the model's)"),
        batch_size: int = typer.Option(4, "--batch-size", min=1, help="images per pipeline call"),
        device: str | None = typer.Option(None, "--device", help="cuda, cpu, ... (default: cuda when available)"),
        llm: str | None = typer.Option(None, "--llm", help="control: base model on prompts expanded by this LLM"),
        llm_url: str | None = typer.Option(None, "--llm-url", help="OpenAI-compatible base URL serving --llm"),
        finetune: str | None = typer.Option(None, "--finetune", help="control: a plain fine-tune (diffusers model)"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    ) -> None:
        """Generate with the base model, the keyword prompt and each adapter from the same seeds; score; reports."""
        from adapter.config import EvalConfig
        from adapter.evaluate import run_eval

        plain, named = _adapters(adapter)
        try:
            config = EvalConfig(
                base=base, base_config=base_config, adapter=plain, adapters=named, scorer=scorer, clip=clip,
                judge=judge, keyword=keyword,
                data=data, probes=[] if probes.strip().lower() == "none" else _csv(probes, "--probes"),
                limit=limit, seeds=_seeds(seeds), steps=steps, guidance_scale=_floats(guidance, "--guidance"),
                negative_prompt=negative_prompt, adapt_unconditional=adapt_unconditional, height=size, width=size,
                batch_size=batch_size, device=device,
                llm=llm, llm_url=llm_url, finetune=finetune,
            )
        except ValidationError as e:
            raise SurdError(explain_validation(e, "eval option")) from None
        results = run_eval(config, out, progress=not quiet)
        images = results["images"]
        typer.echo(f"{images['total']} images ({images['generated']} generated, {images['reused']} reused)")
        typer.echo((out / "results.md").read_text())
        typer.echo(f"report: {out / 'report.html'}")
